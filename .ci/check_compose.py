#!/usr/bin/python3
"""Checks docker-compose.yml's invariants on its normalized form.

Compose cannot run on the CI machine (no Docker engine), so this reads what
`docker-compose config` makes of the file, with the variables of
.env.example, and checks what a running stack would otherwise prove:

  - every stateful service keeps its data on a volume (a recreated container
    must not lose the databases, Kafka's log or the consumer offsets);
  - nothing but NGINX, the one entry for clients, is published beyond
    127.0.0.1;
  - every service has a healthcheck;
  - the backends get every variable the service requires (loadConfig in
    main.go), and connect as their own role, not the database superuser;
  - no service waits for another's health at start: one region's database or
    Kafka down at cold start must not keep the other region or NGINX from
    serving (a backend answers 503 until its database answers, and NGINX
    fails over).

It prints each broken invariant and exits 1 if there is any. Debian's
/usr/bin/python3 has PyYAML, which docker-compose itself depends on.
"""

import subprocess
import sys

import yaml

# The data directory of each stateful service. Kafka's is whatever
# KAFKA_LOG_DIRS says: unset, the apache/kafka image writes to
# /tmp/kraft-combined-logs, inside the container.
DATA_DIRS = {"db-us": "/var/lib/postgresql/data", "db-eu": "/var/lib/postgresql/data", "kafka": None,
             "kafka-2": None, "kafka-3": None, "prometheus": "/prometheus"}

# What the service cannot start without (main.go, loadConfig): a region, a
# broker, and a database as DATABASE_URL or as its parts.
REQUIRED = ["REGION", "KAFKA_BROKER"]
DATABASE_PARTS = ["DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME"]

PUBLIC = {"nginx"}

# The topic keeps whole segments up to retention.ms + segment.ms (the
# service creates it with 7 days and 1 day: topicRetention and topicSegment
# in replicate.go). A consumer group's offsets must outlive that, though the
# service keeps its position in its own database: an operator's tools read
# the group's.
TOPIC_KEEPS_MINUTES = (7 + 1) * 24 * 60


def volume_targets(service):
    """The container paths that are mounted from a volume or the host."""
    targets = set()
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            targets.add(v["target"])
        else:
            parts = v.split(":")
            targets.add(parts[1] if len(parts) > 1 else parts[0])
    return targets


def host_ip(port):
    """The host address a published port binds, "" for every interface."""
    if isinstance(port, dict):
        return port.get("host_ip", "")
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""


def problems(config):
    services = config["services"]
    for name, data_dir in DATA_DIRS.items():
        if name not in services:
            continue
        service = services[name]
        if data_dir is None:
            data_dir = service.get("environment", {}).get("KAFKA_LOG_DIRS")
            if not data_dir:
                yield f"{name}: KAFKA_LOG_DIRS is not set: the log goes to /tmp/kraft-combined-logs, inside the container"
                continue
        if data_dir not in volume_targets(service):
            yield f"{name}: its data directory {data_dir} is not on a volume"
    for name, service in services.items():
        if name.startswith("kafka"):
            minutes = int(service.get("environment", {}).get("KAFKA_OFFSETS_RETENTION_MINUTES", 7 * 24 * 60))
            if minutes <= TOPIC_KEEPS_MINUTES:
                yield f"{name}: offsets.retention.minutes {minutes} is not above the topic's retention.ms + segment.ms ({TOPIC_KEEPS_MINUTES} minutes)"
        for port in service.get("ports", []):
            if name not in PUBLIC and host_ip(port) != "127.0.0.1":
                yield f"{name}: port {port} is published beyond 127.0.0.1"
        logging = service.get("logging", {})
        if logging.get("driver") != "json-file" or not logging.get("options", {}).get("max-size"):
            yield f"{name}: its log is not rotated (logging: json-file with max-size)"
        if "healthcheck" not in service or service["healthcheck"].get("disable"):
            yield f"{name}: no healthcheck"
        for dep, how in service.get("depends_on", {}).items():
            if how.get("condition") == "service_healthy":
                yield f"{name}: waits for {dep} to be healthy before it starts"
        if name.startswith("backend-"):
            env = service.get("environment", {})
            need = REQUIRED + ([] if env.get("DATABASE_URL") else DATABASE_PARTS)
            for var in need:
                if not str(env.get(var, "")):
                    yield f"{name}: {var} is not set"
            region = name.removeprefix("backend-").removesuffix("-2")
            superuser = services["db-" + region]["environment"]["POSTGRES_USER"]
            if env.get("DB_USER") == superuser:
                yield f"{name}: connects as the database superuser {superuser}"


# Each topology: the files, and what to call it in messages.
TOPOLOGIES = [(["docker-compose.yml"], "docker-compose.yml"),
              (["docker-compose.yml", "docker-compose.ha.yml"], "docker-compose.yml + docker-compose.ha.yml")]


def main():
    failed = False
    for files, name in TOPOLOGIES:
        args = ["docker-compose", "--env-file", ".env.example"]
        for f in files:
            args += ["-f", f]
        # Every profile's services, Prometheus's (monitoring) included.
        out = subprocess.run(args + ["--profile", "monitoring", "config"], check=True, capture_output=True, text=True).stdout
        config = yaml.safe_load(out)
        found = list(problems(config))
        if len(files) > 1:
            found += list(ha_problems(config))
        for p in found:
            print(f"{name}:", p)
        failed = failed or bool(found)
        if not found:
            print(f"{name}: valid, and every invariant holds")
    if failed:
        sys.exit(1)


def ha_problems(config):
    """The scaled-out topology: three KRaft voters that agree, topics with
    three replicas, and each region's second backend reachable by its
    region's name (NGINX's upstreams resolve it)."""
    services = config["services"]
    brokers = ["kafka", "kafka-2", "kafka-3"]
    voters = {services[b]["environment"].get("KAFKA_CONTROLLER_QUORUM_VOTERS") for b in brokers}
    if len(voters) != 1 or len(next(iter(voters)).split(",")) != 3:
        yield f"the brokers do not name the same three voters: {voters}"
    ids = sorted(str(services[b]["environment"].get("KAFKA_NODE_ID")) for b in brokers)
    if ids != ["1", "2", "3"]:
        yield f"the brokers' node ids are {ids}, not 1, 2, 3"
    for b in brokers:
        if str(services[b]["environment"].get("KAFKA_MIN_INSYNC_REPLICAS")) != "2":
            yield f"{b}: min.insync.replicas is not 2"
    for region in ("us", "eu"):
        for name in (f"backend-{region}", f"backend-{region}-2"):
            env = services[name]["environment"]
            if str(env.get("KAFKA_REPLICATION_FACTOR")) != "3":
                yield f"{name}: KAFKA_REPLICATION_FACTOR is not 3"
            if len(str(env.get("KAFKA_BROKER", "")).split(",")) != 3:
                yield f"{name}: KAFKA_BROKER does not list the three brokers"
        aliases = services[f"backend-{region}-2"].get("networks", {}).get("default", {}).get("aliases", [])
        if f"backend-{region}" not in aliases:
            yield f"backend-{region}-2: not reachable as backend-{region}, so NGINX would not send it requests"


if __name__ == "__main__":
    main()
