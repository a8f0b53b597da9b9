#!/usr/bin/env bash
# stack.sh starts the same topology as docker-compose.yml from local processes,
# for machines without Docker:
#
#   db-us, db-eu   two PostgreSQL clusters   127.0.0.1:5433, 127.0.0.1:5434
#   kafka          one KRaft Kafka broker    127.0.0.1:9092 (controller 9093)
#   backend-us     the service, REGION=us    127.0.0.1:8001 (pprof 127.0.0.1:6061)
#   backend-eu     the service, REGION=eu    127.0.0.1:8002 (pprof 127.0.0.1:6062)
#   nginx          the project's nginx.conf  127.0.0.1:8080 (HTTPS 127.0.0.1:8443)
#   prometheus     prometheus/*.yml          127.0.0.1:9090
#
# Usage: ./stack.sh up [single|ha] | down | ps | logs SERVICE | stop SERVICE | start SERVICE
#                  | kill SERVICE | pause SERVICE | unpause SERVICE
#                  | partition REGION|BACKEND | heal REGION|BACKEND | skew DATABASE OFFSET | unskew DATABASE
#                  | backup DATABASE | restore DATABASE | wipe DATABASE | rejoin REGION [--from-nothing]
#                  | test | check | bench | soak [DURATION [RATE [NAME]]] | chaos [DURATION [SEED [NAME]]]
#                  | cpu COMMAND...
#
#   test    about 3 minutes: gofmt, vet, the compose check, promtool, and the
#           unit and integration tests with the race detector
#   check   about 8 minutes: Schemathesis, fuzzing, each benchmark once, the
#           hostile clients, a 60 s fault campaign, a 2 minute soak
#
# The subcommands mirror docker compose's, over the same service names, so the
# integration tests drive either stack through one command. All state (database
# clusters, Kafka's data and jars, logs, pid files) lives in .stack/, which git
# ignores; `down` stops everything, `rm -rf .stack` forgets it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state="$root/.stack"

# The topology: "single" (above), or "ha", chosen by `up ha` and kept in
# .stack/topology until the next `up`: a three-broker KRaft cluster (kafka,
# kafka-2, kafka-3; topics with three replicas, min.insync.replicas 2) and
# two backends per region (backend-us-2 and backend-eu-2 beside the first),
# as docker-compose.ha.yml adds to docker-compose.yml.
topology() { cat "$state/topology" 2>/dev/null || echo single; }
set_services() {
	if [ "$(topology)" = ha ]; then
		services=(db-us db-eu kafka kafka-2 kafka-3 backend-us backend-us-2 backend-eu backend-eu-2 nginx prometheus)
	else
		services=(db-us db-eu kafka backend-us backend-eu nginx prometheus)
	fi
}
set_services

# The Kafka version of the apache/kafka image in docker-compose.yml.
kafka_version=4.1.1

# Credentials come from .env like compose's, or from .env.example when there
# is no .env: a local throwaway stack needs no secret of its own.
envfile="$root/.env"
[ -f "$envfile" ] || envfile="$root/.env.example"
set -a
# shellcheck disable=SC1090
. "$envfile"
set +a
: "${POSTGRES_USER:?set POSTGRES_USER in .env (see .env.example)}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env (see .env.example)}"
: "${POSTGRES_DB:?set POSTGRES_DB in .env (see .env.example)}"
: "${SERVICE_DB_USER:?set SERVICE_DB_USER in .env (see .env.example)}"
: "${SERVICE_DB_PASSWORD:?set SERVICE_DB_PASSWORD in .env (see .env.example)}"

log() { printf '%s stack: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_of() {
	case "$1" in
	db-us) echo 5433 ;; db-eu) echo 5434 ;; kafka) echo 9092 ;; kafka-2) echo 9094 ;; kafka-3) echo 9096 ;;
	backend-us) echo 8001 ;; backend-eu) echo 8002 ;; backend-us-2) echo 8003 ;; backend-eu-2) echo 8004 ;;
	nginx) echo 8080 ;; prometheus) echo 9090 ;;
	*) die "unknown service $1 (one of: ${services[*]})" ;;
	esac
}

db_url() { # db_url SERVICE [DATABASE]: as the superuser
	printf 'postgres://%s:%s@127.0.0.1:%s/%s' "$POSTGRES_USER" "$POSTGRES_PASSWORD" "$(port_of "$1")" "${2:-$POSTGRES_DB}"
}

service_db_url() { # service_db_url SERVICE: as the backends' own role
	printf 'postgres://%s:%s@127.0.0.1:%s/%s' "$SERVICE_DB_USER" "$SERVICE_DB_PASSWORD" "$(port_of "$1")" "$POSTGRES_DB"
}

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)

# PostgreSQL refuses to run as root; as root, run it as the postgres user.
as_pg() {
	if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# ---------------------------------------------------------------- installing

install_missing() {
	local need=()
	command -v nginx >/dev/null || need+=(nginx)
	command -v curl >/dev/null || need+=(curl)
	[ -n "$pgbin" ] || need+=(postgresql)
	command -v java >/dev/null || need+=(openjdk-17-jre-headless)
	command -v mvn >/dev/null || need+=(maven)
	command -v prometheus >/dev/null || need+=(prometheus)
	if [ ${#need[@]} -gt 0 ]; then
		[ "$(id -u)" = 0 ] || die "missing ${need[*]}: install them, or run as root"
		log "installing ${need[*]} with apt"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
		pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
	fi
	# Debian starts its own nginx on port 80 after installing; ours is separate.
	if [ -f /run/nginx.pid ] && [ "$(id -u)" = 0 ]; then nginx -s quit 2>/dev/null || true; fi
	kafka_jars
}

# kafka_jars resolves the broker and its dependencies from Maven Central into
# the local Maven repository and records the classpath.
kafka_jars() {
	local dir="$state/kafka"
	[ -s "$dir/classpath-$kafka_version" ] && return
	mkdir -p "$dir"
	cat >"$dir/pom.xml" <<-EOF
		<project xmlns="http://maven.apache.org/POM/4.0.0">
		  <modelVersion>4.0.0</modelVersion>
		  <groupId>local.stack</groupId>
		  <artifactId>kafka-runtime</artifactId>
		  <version>1</version>
		  <dependencies>
		    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$kafka_version</version></dependency>
		    <!-- Kafka logs through SLF4J; these route it to Log4j 2, as the broker's own distribution does. -->
		    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
		    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
		    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
		  </dependencies>
		</project>
	EOF
	log "resolving Kafka $kafka_version jars from Maven Central"
	mvn -q -B -f "$dir/pom.xml" dependency:build-classpath -Dmdep.outputFile="$dir/classpath-$kafka_version" >"$dir/maven.log" 2>&1 ||
		die "maven could not resolve Kafka: see $dir/maven.log"
}

# ------------------------------------------------------------- the services

pidfile() { echo "$state/run/$1.pid"; }

running() { # running SERVICE: is its process alive?
	local pid
	case "$1" in
	db-*) pid=$(head -n 1 "$state/pg/$1/postmaster.pid" 2>/dev/null || true) ;;
	*) pid=$(cat "$(pidfile "$1")" 2>/dev/null || true) ;;
	esac
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# spawn SERVICE CMD...: run CMD in the background in its own session, logging
# to .stack/logs/SERVICE.log.
spawn() {
	local svc=$1
	shift
	mkdir -p "$state/run" "$state/logs"
	setsid "$@" >>"$state/logs/$svc.log" 2>&1 </dev/null &
	echo $! >"$(pidfile "$svc")"
}

init_db() {
	local svc=$1 data="$state/pg/$1"
	[ -f "$data/PG_VERSION" ] && return
	log "creating the $svc cluster"
	mkdir -p "$data" "$state/logs"
	local pw="$state/pg/.pw-$svc"
	printf '%s\n' "$POSTGRES_PASSWORD" >"$pw"
	if [ "$(id -u)" = 0 ]; then chown -R postgres "$state/pg"; fi
	chmod 700 "$data"
	# As in the postgres image: POSTGRES_USER is the superuser, a password is
	# required over TCP, and the local socket is trusted.
	as_pg "$pgbin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$pw" -E UTF8 --locale=C.UTF-8 \
		--auth-local=trust --auth-host=scram-sha-256 >"$state/logs/$svc-initdb.log" 2>&1 ||
		die "initdb failed: see $state/logs/$svc-initdb.log"
	rm -f "$pw"
	start_db "$svc"
	local psql=("$pgbin/psql" -q -v ON_ERROR_STOP=1 -h "$state/pg" -p "$(port_of "$svc")" -U "$POSTGRES_USER")
	as_pg "${psql[@]}" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
	# Both seeds into both regions, in the order the postgres image runs
	# docker-entrypoint-initdb.d: the schema, the seeds, the backends' role.
	for f in init.sql us_seed.sql eu_seed.sql service_role.sql; do
		as_pg "${psql[@]}" -d "$POSTGRES_DB" -f - <"$root/$f" >/dev/null
	done
}

# migrate_db SERVICE: the schema and the role's grants again, on a cluster
# made by an older version (both files change nothing when run twice).
migrate_db() {
	local svc=$1
	local psql=("$pgbin/psql" -q -v ON_ERROR_STOP=1 -h "$state/pg" -p "$(port_of "$svc")" -U "$POSTGRES_USER" -d "$POSTGRES_DB")
	for f in init.sql service_role.sql; do
		PGOPTIONS='-c client_min_messages=warning' as_pg "${psql[@]}" -f - <"$root/$f" >/dev/null 2>>"$state/logs/$svc-migrate.log" ||
			die "applying $f to $svc failed: see $state/logs/$svc-migrate.log"
	done
}

start_db() {
	local svc=$1
	running "$svc" && return
	mkdir -p "$state/logs"
	if [ "$(id -u)" = 0 ]; then chown postgres "$state/logs"; touch "$state/logs/$svc.log"; chown postgres "$state/logs/$svc.log"; fi
	# A skewed clock (cmd_skew): the cluster's processes see their time
	# shifted by libfaketime, fractions of a second included.
	local env=()
	if [ -s "$state/run/$svc.skew" ]; then
		env=(env "FAKETIME=$(cat "$state/run/$svc.skew")" "LD_PRELOAD=$(faketime_lib)")
	fi
	# max_connections leaves room for both services' pools, the tests and
	# pgbench; the socket lives in .stack/pg so that nothing outside is touched.
	as_pg "${env[@]}" "$pgbin/pg_ctl" -D "$state/pg/$svc" -l "$state/logs/$svc.log" -w -t 60 \
		-o "-p $(port_of "$svc") -c listen_addresses=127.0.0.1 -k $state/pg -c max_connections=200" start >/dev/null
}

# faketime_lib is libfaketime's multi-threaded library, installed if need be.
faketime_lib() {
	local lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
	if [ ! -f "$lib" ]; then
		[ "$(id -u)" = 0 ] || die "a skewed clock needs libfaketime: apt-get install faketime"
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; } >&2
	fi
	echo "$lib"
}

# cmd_skew DATABASE OFFSET restarts a regional database with its clock
# shifted by OFFSET seconds (e.g. +0.9 or -0.9), as a region whose clock
# runs ahead or behind; unskew DATABASE restarts it on the true clock. The
# backends take every time they compare from their database (Go reads the
# clock without libc, so libfaketime would not reach them anyway). A
# restart is an immediate shutdown: a database outage too.
cmd_skew() {
	local svc=${1:?usage: stack.sh skew db-us|db-eu OFFSET} offset=${2:?usage: stack.sh skew db-us|db-eu OFFSET}
	case "$svc" in db-us | db-eu) ;; *) die "only a database's clock can be skewed, not $svc" ;; esac
	mkdir -p "$state/run"
	faketime_lib >/dev/null
	echo "$offset" >"$state/run/$svc.skew"
	stop_service "$svc" KILL
	start_db "$svc"
}

cmd_unskew() {
	local svc=${1:?usage: stack.sh unskew db-us|db-eu}
	[ -s "$state/run/$svc.skew" ] || { running "$svc" || start_db "$svc"; return 0; }
	rm -f "$state/run/$svc.skew"
	stop_service "$svc" KILL
	start_db "$svc"
}

# kafka_brokers: the brokers' client addresses, as KAFKA_BROKER lists them.
kafka_brokers() {
	if [ "$(topology)" = ha ]; then echo 127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096; else echo 127.0.0.1:9092; fi
}

start_kafka() {
	local svc=${1:-kafka}
	running "$svc" && return
	local dir="$state/kafka" node=1 replicas=1 voters="1@127.0.0.1:9093" data
	data="$dir/data"
	if [ "$(topology)" = ha ]; then
		# Three nodes, each broker and controller, one data directory each.
		node=${svc#kafka-}
		[ "$node" = kafka ] && node=1
		replicas=3
		voters="1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"
		data="$state/kafka-ha/$svc"
	fi
	local port
	port=$(port_of "$svc")
	mkdir -p "$data"
	cat >"$data/../$svc.properties" <<-EOF
		# The settings of the apache/kafka service in docker-compose.yml
		# (and docker-compose.ha.yml for three brokers).
		process.roles=broker,controller
		node.id=$node
		controller.quorum.voters=$voters
		listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$((port + 1))
		advertised.listeners=PLAINTEXT://127.0.0.1:$port
		controller.listener.names=CONTROLLER
		listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
		log.dirs=$data
		offsets.topic.replication.factor=$replicas
		transaction.state.log.replication.factor=$replicas
		transaction.state.log.min.isr=$((replicas / 2 + 1))
		min.insync.replicas=$((replicas / 2 + 1))
		group.initial.rebalance.delay.ms=0
		offsets.retention.minutes=12960
		auto.create.topics.enable=false
	EOF
	cat >"$dir/log4j2.yaml" <<-EOF
		Configuration:
		  Appenders:
		    Console:
		      name: STDOUT
		      PatternLayout:
		        pattern: "[%d] %p %m (%c)%n"
		  Loggers:
		    Root:
		      level: INFO
		      AppenderRef:
		        - ref: STDOUT
	EOF
	local cp cluster
	cp=$(cat "$dir/classpath-$kafka_version")
	if [ ! -f "$data/meta.properties" ]; then
		# The nodes of one cluster share its id.
		cluster="$data/../cluster-id"
		[ -s "$cluster" ] || java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$cluster"
		log "formatting $svc's KRaft storage"
		java -cp "$cp" kafka.tools.StorageTool format -t "$(cat "$cluster")" \
			-c "$data/../$svc.properties" >"$state/logs/$svc-format.log" 2>&1 ||
			die "formatting Kafka storage failed: see $state/logs/$svc-format.log"
	fi
	# A modest heap: the broker shares two cores and the memory with the rest.
	# All of it from the start (Xms = Xmx) and touched at start (the JVM's
	# AlwaysPreTouch), as Kafka's operations guide advises: the heap never
	# resizes, and the broker's resident memory is its working size at once,
	# so that a soak sees growth only where there is some (soak_test.go).
	# The client compiler only (TieredStopAtLevel=1): on these two cores the
	# optimizing compiler was still compiling after 80,000 writes, and took
	# more of the broker's CPU than the requests it serves did
	# (docs/benchmarks.md).
	spawn "$svc" java -Xms512m -Xmx512m -XX:+AlwaysPreTouch -XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$dir/log4j2.yaml" -cp "$cp" kafka.Kafka "$data/../$svc.properties"
}

build_backend() {
	mkdir -p "$state/bin"
	(cd "$root" && go build -o "$state/bin/property-listing" .) || die "go build failed"
}

start_backend() {
	local svc=$1 region=${1#backend-}
	region=${region%-2}
	running "$svc" && return
	[ -x "$state/bin/property-listing" ] || build_backend
	local debug=$(($(port_of "$svc") - 8001 + 6061))
	# As root, each backend runs as a user id of its own (backend_uid), as
	# in a container: that is what lets `partition` drop its packets alone.
	local as=()
	[ "$(id -u)" = 0 ] && as=(setpriv --reuid="$(backend_uid "$svc")" --regid="$(backend_uid "$svc")" --clear-groups)
	spawn "$svc" "${as[@]}" env $(backend_env "$region") LISTEN_ADDR="127.0.0.1:$(port_of "$svc")" \
		DEBUG_ADDR="127.0.0.1:$debug" \
		"$state/bin/property-listing"
}

# backend_env REGION: the environment of a backend of REGION, but where it
# listens: what `rejoin` runs the binary with too.
backend_env() {
	local region=$1 peer replicas=1
	peer=$( [ "$region" = us ] && echo eu || echo us)
	[ "$(topology)" = ha ] && replicas=3
	local peers="http://127.0.0.1:$(port_of "backend-$peer")"
	[ "$(topology)" = ha ] && peers+=",http://127.0.0.1:$(port_of "backend-$peer-2")"
	echo REGION="$region" DATABASE_URL="$(service_db_url "db-$region")" PEER_URL="$peers" \
		KAFKA_BROKER="$(kafka_brokers)" KAFKA_REPLICATION_FACTOR=$replicas KAFKA_TOPIC=property-updates RETENTION="${RETENTION:-9d}"
}

# ------------------------------------------------------ backups and rejoining

# backup DATABASE: a physical copy of the cluster as it is now
# (pg_basebackup), kept in .stack/backups/DATABASE for `restore`.
cmd_backup() {
	local svc=${1:?usage: stack.sh backup db-us|db-eu}
	case "$svc" in db-us | db-eu) ;; *) die "backup takes db-us or db-eu, not $svc" ;; esac
	mkdir -p "$state/backups"
	if [ "$(id -u)" = 0 ]; then chown postgres "$state/backups"; fi
	as_pg rm -rf "$state/backups/$svc.new"
	as_pg "$pgbin/pg_basebackup" -h "$state/pg" -p "$(port_of "$svc")" -U "$POSTGRES_USER" \
		-D "$state/backups/$svc.new" -X stream -c fast >>"$state/logs/$svc-backup.log" 2>&1 ||
		die "pg_basebackup of $svc failed: see $state/logs/$svc-backup.log"
	as_pg rm -rf "$state/backups/$svc"
	as_pg mv "$state/backups/$svc.new" "$state/backups/$svc"
}

# restore DATABASE: the cluster goes back to the copy `backup` took: it
# stops at once, as if it died, its data is replaced by the copy's, and it
# starts again, its backends still running.
cmd_restore() {
	local svc=${1:?usage: stack.sh restore db-us|db-eu}
	[ -d "$state/backups/$svc" ] || die "no backup of $svc: run ./stack.sh backup $svc first"
	stop_service "$svc" KILL
	as_pg rm -rf "$state/pg/$svc"
	as_pg cp -a "$state/backups/$svc" "$state/pg/$svc"
	start_db "$svc"
}

# wipe DATABASE: the cluster is replaced by a new one that holds the schema
# and the seeds only, as a lost disk would be replaced.
cmd_wipe() {
	local svc=${1:?usage: stack.sh wipe db-us|db-eu}
	case "$svc" in db-us | db-eu) ;; *) die "wipe takes db-us or db-eu, not $svc" ;; esac
	stop_service "$svc" KILL
	as_pg rm -rf "$state/pg/$svc"
	init_db "$svc"
}

# rejoin REGION [--from-nothing]: makes REGION rebuild its copy from the
# other region, and waits until it serves again (property-listing rejoin).
cmd_rejoin() {
	local region=${1:?usage: stack.sh rejoin us|eu [--from-nothing]}
	shift
	case "$region" in us | eu) ;; *) die "rejoin takes us or eu, not $region" ;; esac
	[ -x "$state/bin/property-listing" ] || build_backend
	env $(backend_env "$region") "$state/bin/property-listing" rejoin "$@"
}

# backend_uid BACKEND: the user id a backend runs as, under root: one per
# instance, so that a fault can cut off one instance of a region alone.
backend_uid() {
	case "$1" in
	backend-us) echo 4301 ;; backend-eu) echo 4302 ;; backend-us-2) echo 4303 ;; backend-eu-2) echo 4304 ;;
	*) die "unknown backend $1" ;;
	esac
}

# cut_off_uids TARGET: the user ids of what `partition TARGET` cuts off: a
# region's every backend (us, eu) or one backend (backend-us-2).
cut_off_uids() {
	case "$1" in
	us | eu) for svc in "backend-$1" "backend-$1-2"; do backend_uid "$svc"; done ;;
	backend-*) backend_uid "$1" ;;
	*) die "unknown region or backend $1" ;;
	esac
}

# ------------------------------------------------------------------ faults
# What the fault campaign (chaos_test.go) does to the stack, beside kill,
# stop and start.

# signal_service SERVICE SIGNAL: pause (STOP) or resume (CONT) a process,
# as `docker compose pause` and `unpause` do with a container's.
signal_service() {
	local svc=$1 sig=$2
	case "$svc" in db-*) die "pause a database with kill (immediate shutdown) instead" ;; esac
	running "$svc" || die "$svc is not running"
	kill -s "$sig" "$(cat "$(pidfile "$svc")")"
}

# partition_rules ACTION UID: add (-A) or delete (-D) the rules that drop
# every packet between one backend (by its user id) and Kafka, both ways: its own
# packets by their owner, Kafka's answers by the connection they belong to
# (marked as the backend's). Dropped, not refused: the backend's Kafka client
# sees silence and times out, as it would behind a dead link. HTTP and the
# database are untouched.
partition_rules() {
	local action=$1 uid=$2
	local ports=9092,9094,9096 # every broker of either topology
	iptables -w -t mangle "$action" OUTPUT -o lo -p tcp -m multiport --dports $ports -m owner --uid-owner "$uid" -j CONNMARK --set-mark "$uid" &&
		iptables -w "$action" OUTPUT -o lo -p tcp -m multiport --dports $ports -m owner --uid-owner "$uid" -j DROP &&
		iptables -w "$action" INPUT -i lo -p tcp -m multiport --sports $ports -m connmark --mark "$uid" -j DROP
}

# partition cuts a region (us, eu: every instance of it) or one backend
# (backend-us-2) off from Kafka; heal joins it again.
cmd_partition() {
	local target=${1:?usage: stack.sh partition REGION|BACKEND} uid
	[ "$(id -u)" = 0 ] || die "partition needs root (iptables, and backends under their own user ids)"
	command -v iptables >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null; }
	for uid in $(cut_off_uids "$target"); do
		partitioned "$uid" || { partition_rules -A "$uid" && cut_open_connections "$uid"; }
	done
}

# cut_open_connections UID: drops Kafka's packets on the connections the
# backend already holds. The connection mark is set by the backend's next
# packet, and a consumer waiting on a long fetch sends none: the answer to
# that fetch would still get through (seen: a write applied across the
# partition 10 ms after it). So each open connection's own port gets a rule
# too, named after the user id for heal to find.
cut_open_connections() {
	local uid=$1 port
	for port in $(ss -tnHe state established '( dport = :9092 or dport = :9094 or dport = :9096 )' |
		awk -v who="uid:$1" '$0 ~ who" " { n = split($3, a, ":"); print a[n] }'); do
		iptables -w -A INPUT -i lo -p tcp --dport "$port" -m multiport --sports 9092,9094,9096 \
			-m comment --comment "cut-off-$uid" -j DROP
	done
}

cmd_heal() {
	local target=${1:?usage: stack.sh heal REGION|BACKEND} uid rule
	for uid in $(cut_off_uids "$target"); do
		while partitioned "$uid"; do partition_rules -D "$uid"; done
		iptables -w -S INPUT | { grep -e "--comment \"\?cut-off-$uid\"\? " || true; } | while read -r rule; do
			eval "iptables -w ${rule/#-A/-D}"
		done
	done
}

# partitioned UID: whether the backend of that user id is cut off.
partitioned() {
	[ "$(id -u)" = 0 ] && command -v iptables >/dev/null &&
		iptables -w -C OUTPUT -o lo -p tcp -m multiport --dports 9092,9094,9096 -m owner --uid-owner "$1" -j DROP 2>/dev/null
}

# tls_cert makes the stack's own certificate for NGINX's HTTPS port, once:
# self-signed, for localhost and 127.0.0.1, valid for a year.
tls_cert() {
	local dir="$state/tls"
	[ -s "$dir/cert.pem" ] && return
	mkdir -p "$dir"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
		-subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
		-keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
}

# nginx_conf writes the project's nginx.conf with local addresses: the only
# changes are the backend addresses, the file paths, and the directives an
# older NGINX spells otherwise or lacks (before 1.25.1, "http2 on" is a
# parameter of listen; before 1.27.3, upstream servers cannot "resolve").
nginx_conf() {
	local dir="$state/nginx" version
	mkdir -p "$dir" "$state/logs" "$state/run"
	tls_cert
	version=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
	older() { [ "$(printf '%s\n%s\n' "$version" "$1" | sort -V | head -n 1)" != "$1" ]; }
	local strip_resolve="" old_http2=""
	if older 1.27.3; then
		strip_resolve='/^[[:space:]]*resolver /d; s/ resolve;/;/'
	fi
	if older 1.25.1; then
		old_http2='/^[[:space:]]*http2 on;/d; s/listen 8443 ssl;/listen 8443 ssl http2;/'
	fi
	# Under "ha", each upstream line of a backend is doubled for its second
	# instance, as compose's DNS gives NGINX two addresses for one name.
	local second=""
	[ "$(topology)" = ha ] && second='/server backend-\(us\|eu\):8000/{p;s/:8000/:8000-2/}'
	sed -e "$second" "$root/nginx.conf" |
	sed -e "s|backend-us:8000-2|127.0.0.1:$(port_of backend-us-2)|g" \
		-e "s|backend-eu:8000-2|127.0.0.1:$(port_of backend-eu-2)|g" \
		-e "s|backend-us:8000|127.0.0.1:$(port_of backend-us)|g" \
		-e "s|backend-eu:8000|127.0.0.1:$(port_of backend-eu)|g" \
		-e "s|/var/log/nginx/access.log|$state/logs/nginx.log|" \
		-e "s|/var/log/nginx/error.log|$state/logs/nginx.log|" \
		-e "s|/var/run/nginx.pid|$state/run/nginx.master.pid|" \
		-e "s|/etc/nginx/tls/|$state/tls/|g" \
		-e "$strip_resolve" \
		-e "$old_http2" >"$dir/nginx.conf"
	nginx -t -q -c "$dir/nginx.conf" -p "$dir" 2>>"$state/logs/nginx.log" || die "nginx rejected the config: see $state/logs/nginx.log"
}

start_nginx() {
	running nginx && return
	nginx_conf
	spawn nginx nginx -c "$state/nginx/nginx.conf" -p "$state/nginx" -g 'daemon off;'
}

# start_prometheus runs Prometheus on the project's prometheus.yml and
# alerts.yml, with the backends' local addresses.
start_prometheus() {
	running prometheus && return
	local dir="$state/prometheus"
	mkdir -p "$dir/data" "$state/logs"
	# prometheus.yml's settings and rules, and the local instances of each
	# region as static targets (compose finds them by DNS).
	local region svc targets
	{
		sed -n '1,/^scrape_configs:/p' "$root/prometheus/prometheus.yml"
		printf '  - job_name: listing-backend\n    static_configs:\n'
		for region in us eu; do
			targets=()
			for svc in "${services[@]}"; do
				case "$svc" in "backend-$region" | "backend-$region-2") targets+=("\"127.0.0.1:$(port_of "$svc")\"") ;; esac
			done
			printf '      - targets: [%s]\n        labels:\n          region: %s\n' "$(IFS=,; echo "${targets[*]}")" "$region"
		done
	} >"$dir/prometheus.yml"
	cp "$root/prometheus/alerts.yml" "$dir/alerts.yml"
	spawn prometheus prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
		--storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$(port_of prometheus)"
}

start_service() {
	case "$1" in
	db-*) start_db "$1" ;;
	kafka*) start_kafka "$1" ;;
	backend-*) start_backend "$1" ;;
	nginx) start_nginx ;;
	prometheus) start_prometheus ;;
	*) port_of "$1" >/dev/null ;;
	esac
}

# stop_service SERVICE SIGNAL: TERM is an orderly stop, KILL a crash. An
# orderly stop that had to be finished with SIGKILL fails: a backend must
# stop within its shutdown budget (main.go), far inside the 30 s given
# here, and the tests and the fault campaign must see one that does not.
stop_service() {
	local svc=$1 sig=$2
	case "$svc" in
	db-*)
		running "$svc" || return 0
		local mode=fast
		[ "$sig" = KILL ] && mode=immediate
		as_pg "$pgbin/pg_ctl" -D "$state/pg/$svc" -m "$mode" -w stop >/dev/null
		;;
	*)
		port_of "$svc" >/dev/null
		running "$svc" || return 0
		local pid
		pid=$(cat "$(pidfile "$svc")")
		kill -s "$sig" "$pid" 2>/dev/null || true
		kill -s CONT "$pid" 2>/dev/null || true # a paused process too
		for _ in $(seq 1 300); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "$svc did not stop in 30s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
			rm -f "$(pidfile "$svc")"
			[ "$sig" = KILL ] || return 1
		fi
		rm -f "$(pidfile "$svc")"
		;;
	esac
}

# ------------------------------------------------------------------- logs

# The services' log files are rotated by size, as compose's json-file
# driver rotates theirs: every 10 s a rotator (a process of its own,
# started by up and stopped by down) copies a file grown past
# log_max_bytes to FILE.1 (the copy before that moves to FILE.2, and the
# one before that is dropped) and empties it in place. Every service has
# its log open for appending, so it goes on writing at the start of the
# emptied file. At most three files of 10 MiB a service; a line written
# between the copy and the emptying is lost, as with logrotate's
# copytruncate.
log_max_bytes=$((10 * 1024 * 1024))

rotate_logs() {
	local f
	for f in "$state"/logs/*.log; do
		[ "$(stat -c %s "$f" 2>/dev/null || echo 0)" -gt "$log_max_bytes" ] || continue
		if [ -f "$f.1" ]; then mv -f "$f.1" "$f.2"; fi
		cp "$f" "$f.1" && : >"$f"
	done
}

start_log_rotation() {
	local pid
	pid=$(cat "$(pidfile logrotate)" 2>/dev/null || true)
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return
	spawn logrotate "$root/stack.sh" rotate-logs
}

stop_log_rotation() {
	local pid
	pid=$(cat "$(pidfile logrotate)" 2>/dev/null || true)
	# Its whole session: the loop and the sleep it waits in.
	[ -n "$pid" ] && kill -- "-$pid" 2>/dev/null || true
	rm -f "$(pidfile logrotate)"
}

# ------------------------------------------------------------ health checks

healthy() {
	local svc=$1
	running "$svc" || return 1
	case "$svc" in
	db-*) "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$(port_of "$svc")" ;;
	kafka*) grep -q "Kafka Server started" "$state/logs/$svc.log" 2>/dev/null && (: </dev/tcp/127.0.0.1/"$(port_of "$svc")") 2>/dev/null ;;
	backend-*) curl -fsS -o /dev/null -m 2 "http://127.0.0.1:$(port_of "$svc")/health" 2>/dev/null ;;
	nginx) curl -fsS -o /dev/null -m 2 "http://127.0.0.1:8080/nginx-health" ;;
	prometheus) curl -fsS -o /dev/null -m 2 "http://127.0.0.1:$(port_of prometheus)/-/ready" ;;
	esac
}

wait_healthy() {
	local svc=$1 deadline=$((SECONDS + ${2:-120}))
	until healthy "$svc"; do
		running "$svc" || die "$svc exited: see $state/logs/$svc.log"
		[ $SECONDS -lt $deadline ] || die "$svc not healthy in time: see $state/logs/$svc.log"
		sleep 0.2
	done
}

# ---------------------------------------------------------------- commands

# cmd_up [single|ha]: start the stack, in the topology named (the one it
# last ran in when none is named).
cmd_up() {
	mkdir -p "$state"
	local want=${1:-$(topology)} svc
	case "$want" in single | ha) ;; *) die "unknown topology $want (single or ha)" ;; esac
	local switched=""
	if [ "$want" != "$(topology)" ]; then
		for svc in "${services[@]}"; do
			running "$svc" && die "the stack runs as $(topology): ./stack.sh down first"
		done
		echo "$want" >"$state/topology"
		set_services
		switched=1
	fi
	install_missing
	build_backend
	for db in db-us db-eu; do
		init_db "$db"
		start_db "$db"
		migrate_db "$db"
		# The two topologies have Kafka clusters of their own (their own
		# data directories) over the same databases. A region's position
		# in one cluster's topic means nothing in the other's: read there,
		# it is a position the broker does not hold, which stops
		# replication loudly (consume.go). The watermarks are per
		# partition too, and the two topics need not have as many.
		# Switching is an operator's deliberate move to another cluster, so
		# both are forgotten, and each region reads the new cluster's topic
		# from its start.
		if [ -n "$switched" ]; then
			as_pg "$pgbin/psql" -q -v ON_ERROR_STOP=1 -h "$state/pg" -p "$(port_of "$db")" -U "$POSTGRES_USER" -d "$POSTGRES_DB" \
				-c "DELETE FROM replication_positions" -c "DELETE FROM replication_watermarks" >/dev/null
		fi
	done
	local kafkas=() rest=()
	for svc in "${services[@]}"; do
		case "$svc" in kafka*) kafkas+=("$svc") ;; db-*) ;; *) rest+=("$svc") ;; esac
	done
	# The brokers all at once: a KRaft quorum forms only when a majority runs.
	for svc in "${kafkas[@]}"; do start_kafka "$svc"; done
	for svc in db-us db-eu "${kafkas[@]}"; do wait_healthy "$svc"; done
	for svc in "${rest[@]}"; do start_service "$svc"; done
	for svc in "${rest[@]}"; do wait_healthy "$svc"; done
	start_log_rotation
	write_test_env
	cmd_ps
}

cmd_down() {
	local i
	rm -f "$state/stack.env"
	for ((i = ${#services[@]} - 1; i >= 0; i--)); do
		# Everything goes down, whatever one service did.
		stop_service "${services[i]}" TERM || true
	done
	stop_log_rotation
	log "stopped everything"
}

cmd_ps() {
	printf '%-12s %-8s %-8s %s\n' SERVICE STATE HEALTH ADDRESS
	for svc in "${services[@]}"; do
		local st=stopped h=-
		if running "$svc"; then
			st=running
			if healthy "$svc"; then h=healthy; else h=unhealthy; fi
		fi
		printf '%-12s %-8s %-8s 127.0.0.1:%s\n' "$svc" "$st" "$h" "$(port_of "$svc")"
	done
}

cmd_start() {
	local svc=${1:?usage: stack.sh start SERVICE}
	start_service "$svc"
	wait_healthy "$svc"
}

# write_test_env writes .stack/stack.env, which says how to reach this stack:
# the tests read it (main_test.go), so that a bare `go test -tags=integration
# ./...` finds the stack that `up` started. `down` removes it. Variables set
# in the environment still win over the file.
write_test_env() {
	cat >"$state/stack.env" <<-EOF
		# Written by ./stack.sh up, removed by ./stack.sh down: how the tests reach this stack.
		STACK_URL=http://127.0.0.1:8080
		STACK_CMD=$root/stack.sh
		STACK_DB_US=$(db_url db-us)
		STACK_DB_EU=$(db_url db-eu)
		STACK_KAFKA=$(kafka_brokers)
		# Where the local stack keeps its pid files and data (./stack.sh soak reads them).
		STACK_STATE=$state
		# single, or ha: three brokers and two backends per region (chaos_test.go reads it).
		STACK_TOPOLOGY=$(topology)
		STACK_PROMETHEUS=http://127.0.0.1:$(port_of prometheus)
		# NGINX's HTTPS port, and the certificate that signs it (self-signed).
		STACK_TLS_URL=https://127.0.0.1:8443
		STACK_TLS_CERT=$state/tls/cert.pem
		# The unit tests make (and drop) a scratch database on db-us's server.
		TEST_DATABASE_URL=$(db_url db-us postgres)
		# The backends' own role, for the tests of what it may do.
		SERVICE_DB_USER=$SERVICE_DB_USER
		SERVICE_DB_PASSWORD=$SERVICE_DB_PASSWORD
	EOF
}

# test_env exports what stack.env says, for the commands of this script.
test_env() {
	set -a
	# shellcheck disable=SC1091
	. "$state/stack.env"
	set +a
}

# check_compose checks docker-compose.yml's invariants on its normalized
# form (.ci/check_compose.py), with Debian's docker-compose, which parses the
# file without a Docker engine.
check_compose() {
	if ! command -v docker-compose >/dev/null; then
		[ "$(id -u)" = 0 ] || die "missing docker-compose: install it, or run as root"
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
	fi
	(cd "$root" && /usr/bin/python3 .ci/check_compose.py)
}

# schemathesis_version is the Schemathesis that ./stack.sh test installs
# (from PyPI, into .stack/venv) and runs against openapi.yaml.
schemathesis_version=4.32.5

# check_prometheus checks the Prometheus files and both backends' metrics
# with promtool, and unit-tests every alert rule.
check_prometheus() {
	log "promtool: the config, the rules and their tests, both backends' /metrics"
	(cd "$root/prometheus" && promtool check config prometheus.yml >/dev/null && promtool test rules alerts_test.yml >/dev/null) || return 1
	local svc
	for svc in backend-us backend-eu; do
		curl -fsS "http://127.0.0.1:$(port_of "$svc")/metrics" | promtool check metrics || { log "$svc: /metrics fails promtool"; return 1; }
	done
	echo "promtool: prometheus.yml, alerts.yml, alerts_test.yml and both backends' /metrics pass"
}

# run_schemathesis runs Schemathesis with every check against the stack
# through NGINX (schemathesis.toml says which statuses are the API's own;
# schemathesis_hooks.py keeps its deletes off the seed listings).
# SCHEMATHESIS_EXAMPLES sets the cases per operation and phase.
run_schemathesis() {
	local venv="$state/venv"
	if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version | grep -q "$schemathesis_version"; then
		log "installing Schemathesis $schemathesis_version from PyPI"
		/usr/bin/python3 -m venv "$venv" && "$venv/bin/pip" install -q "schemathesis==$schemathesis_version" || return 1
	fi
	log "Schemathesis: openapi.yaml against NGINX, every check"
	(cd "$root" && STACK_URL=http://127.0.0.1:8080 SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH="$root" \
		"$venv/bin/st" run openapi.yaml --checks all \
		--max-examples "${SCHEMATHESIS_EXAMPLES:-300}" --seed "${SCHEMATHESIS_SEED:-1}" --no-color) >"$state/logs/schemathesis.log" 2>&1
	local status=$?
	grep -E '^\s+[0-9]+ generated|failures? in|passed in|warning in|^Seed' "$state/logs/schemathesis.log" || true
	return $status
}

# fuzz_briefly runs every fuzz target for FUZZ_TIME (20,000 executions)
# each: enough to catch a parser that panics on its seed corpus'
# neighbours; a long run is docs/testing.md's command. A count, not a duration:
# with a duration, Go's fuzzing coordinator can report its own deadline as
# a failure on a loaded machine (golang/go#75804).
fuzz_briefly() {
	local target
	for target in $(cd "$root" && grep -ho '^func Fuzz[A-Za-z]*' ./*_test.go | sed 's/^func //'); do
		log "fuzzing $target for ${FUZZ_TIME:-20000x}"
		(cd "$root" && go test -run '^$' -fuzz "^$target\$" -fuzztime "${FUZZ_TIME:-20000x}" .) >>"$state/logs/fuzz.log" 2>&1 ||
			{ tail -n 20 "$state/logs/fuzz.log"; return 1; }
	done
	echo "fuzz: every target ran ${FUZZ_TIME:-20000x} without a failure"
}

# cmd_test is the README's test command, about three minutes against a
# running stack: gofmt, go vet under every build tag, the compose file's
# invariants, promtool, and every unit and integration test once with the
# race detector. The longer checks are cmd_check's.
cmd_test() {
	cmd_up >/dev/null
	test_env
	cd "$root"
	local unformatted tags
	unformatted=$(gofmt -l .)
	[ -z "$unformatted" ] || die "gofmt would change: $unformatted"
	for tags in "" integration integration,soak integration,chaos integration,hostile integration,ha; do
		go vet ${tags:+-tags=$tags} ./...
	done
	check_compose
	local out="$state/logs/test.log" status=0
	check_prometheus || { status=1; echo "promtool: FAILED"; }
	# One run: the integration tag adds the stack's tests to the unit tests,
	# so every test runs exactly once and the count below counts each once.
	log "unit and integration tests, with the race detector"
	go test -race -count=1 -v -tags=integration -timeout 30m -run "${TEST_RUN:-.}" ./... >"$out" 2>&1 || status=$?
	grep -E '^\s*(--- FAIL|FAIL|ok )|^\s+\S+_test\.go:[0-9]+:' "$out" || true
	local passed failed
	passed=$(grep -c -- '--- PASS' "$out" || true)
	failed=$(grep -c -- '--- FAIL' "$out" || true)
	echo "full log: $out"
	echo "$passed passed, $failed failed (tests and subtests)"
	return "$status"
}

# cmd_check runs what ./stack.sh test leaves out, about eight minutes:
# Schemathesis, the fuzz targets, each benchmark once, the hostile-client
# run, a one-minute fault campaign and a two-minute soak. CI runs both.
cmd_check() {
	cmd_up >/dev/null
	test_env
	cd "$root"
	local out="$state/logs/check.log" status=0
	run_schemathesis || { status=1; echo "Schemathesis: FAILED, see $state/logs/schemathesis.log"; }
	: >"$state/logs/fuzz.log"
	fuzz_briefly || { status=1; echo "fuzz: FAILED, see $state/logs/fuzz.log"; }
	log "benchmarks, once each (figures come from ./stack.sh bench)"
	go test -tags=integration -run '^$' -bench . -benchtime=1x -count=1 ./... >"$out" 2>&1 || status=$?
	grep -E '^\s*(--- FAIL|FAIL|ok )|^\s+\S+_test\.go:[0-9]+:|^Benchmark' "$out" || true
	# Hostile clients for 40 s, beside a steady load (hostile_test.go).
	log "hostile clients"
	go test -count=1 -tags=integration,hostile -run '^TestHostileClients$' -v . >"$state/logs/hostile.log" 2>&1 || status=1
	grep -E '^(---|ok|FAIL)|hostile_test' "$state/logs/hostile.log" || true
	# A short fault campaign with a fixed seed: every checker rule must pass.
	(cmd_chaos 60s 10) || status=1
	# Last: it restarts the backends (with a short retention, then back).
	(cmd_soak 2m 100) | grep -E '^\s*\||^(--- |ok|FAIL|PASS)|slope|Statuses|not judged' || status=1
	[ "$status" = 0 ] && log "check: everything passed" || log "check: FAILED"
	return "$status"
}

# cmd_soak DURATION RATE runs the soak (soak_test.go) against the local
# stack: RATE requests a second through NGINX for DURATION, with the
# retention shortened so that purges happen, sampling memory, files,
# threads, goroutines, heap, table and log sizes and latency; it writes
# .stack/soak/report.md and .stack/soak/soak.svg and fails a figure that
# keeps growing.
# cmd_soak DURATION RATE [NAME] runs the soak (soak_test.go); its report,
# picture and samples go to .stack/soak, and with NAME also to
# docs/NAME.md, .svg and .csv, where the measured runs are kept.
cmd_soak() {
	local duration=${1:-2m} rate=${2:-200} name=${3:-} status=0
	log "soak: $rate requests/s for $duration"
	SOAK_DURATION=$duration SOAK_RATE=$rate SOAK_OUT="$state/soak" long_test soak TestSoak || status=$?
	if [ -n "$name" ] && [ -f "$state/soak/report.md" ]; then
		cp "$state/soak/report.md" "$root/docs/$name.md"
		cp "$state/soak/soak.svg" "$root/docs/$name.svg"
		cp "$state/soak/samples.csv" "$root/docs/$name.csv"
		log "soak: report in docs/$name.md"
	fi
	return "$status"
}

# cmd_chaos DURATION SEED runs the fault campaign (chaos_test.go) against
# the local stack: clients writing through NGINX while faults chosen by SEED
# come and go, then the checker; it writes .stack/chaos/report.md.
cmd_chaos() {
	local duration=${1:-60s} seed=${2:-$RANDOM} name=${3:-} status=0
	log "chaos: $duration, seed $seed, topology $(topology)"
	CHAOS_DURATION=$duration CHAOS_SEED=$seed CHAOS_OUT="$state/chaos" long_test chaos TestChaos || status=$?
	if [ -n "$name" ] && [ -f "$state/chaos/report.md" ]; then
		cp "$state/chaos/report.md" "$root/docs/$name.md"
		log "chaos: report in docs/$name.md"
	fi
	return "$status"
}

# cmd_cpu COMMAND...: the CPU time each service of the running stack spent
# while COMMAND ran (a benchmark, or `sleep 20` for an idle stack), read
# from /proc: utime and stime of the service's process and of its
# descendants, with the children it has reaped (cutime, cstime), so that
# PostgreSQL's connection processes that came and went count too. It
# prints, per service, for the stack and for the whole machine (the stack,
# COMMAND and the kernel: machine_ticks), the CPU seconds and the share of
# one core over the command's wall time, and with CPU_OPS=N the
# microseconds per operation: `CPU_OPS=30000 ./stack.sh cpu go test
# -tags=integration -run '^$' -bench PutProperty -benchtime=30000x .`
cmd_cpu() {
	[ $# -gt 0 ] || { echo "usage: stack.sh cpu COMMAND..." >&2; return 2; }
	local before after start end status=0
	before="$(cpu_ticks)
$(machine_ticks)"
	start=$(date +%s.%N)
	"$@" || status=$?
	end=$(date +%s.%N)
	after="$(cpu_ticks)
$(machine_ticks)"
	awk -v hz="$(getconf CLK_TCK)" -v start="$start" -v end="$end" -v ops="${CPU_OPS:-0}" '
		BEGIN { wall = end - start }
		NR == FNR { before[$1] = $2; next }
		$1 == "machine" { machine = ($2 - before[$1]) / hz; next }
		{ order[++n] = $1; spent[$1] = ($2 - before[$1]) / hz; total += spent[$1] }
		END {
			printf "%-12s %10s %12s", "SERVICE", "CPU s", "% of a core"
			if (ops > 0) printf " %14s", "µs per op"
			printf "   (%.1f s of wall time%s)\n", wall, (ops > 0 ? ", " ops " ops" : "")
			order[++n] = "stack"; spent["stack"] = total
			order[++n] = "machine"; spent["machine"] = machine
			for (i = 1; i <= n; i++) {
				s = order[i]
				printf "%-12s %10.2f %11.1f%%", s, spent[s], 100 * spent[s] / wall
				if (ops > 0) printf " %14.0f", 1e6 * spent[s] / ops
				printf "\n"
			}
		}' <(echo "$before") <(echo "$after")
	return "$status"
}

# machine_ticks prints "machine TICKS": the clock ticks the whole machine
# has been busy so far, over all its cores (the first line of /proc/stat:
# user, nice, system, irq, softirq; not steal, the time the hypervisor gave
# to others), which counts COMMAND itself and the kernel's work no process
# is charged for, such as loopback packets handled in softirq.
machine_ticks() { awk '$1 == "cpu" { print "machine", $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

# cpu_ticks prints, for each running service, "SERVICE TICKS": the CPU
# clock ticks its process tree has spent so far (cmd_cpu).
cpu_ticks() {
	local table svc root
	table=$(ps -e -o pid=,ppid=)
	for svc in "${services[@]}"; do
		running "$svc" || continue
		case "$svc" in
		db-*) root=$(head -n 1 "$state/pg/$svc/postmaster.pid") ;;
		*) root=$(cat "$(pidfile "$svc")") ;;
		esac
		# The tree under root, from the parent links.
		local tree
		tree=$(awk -v root="$root" '{ parent[$1] = $2; pids[NR] = $1 }
			END { keep[root] = 1; for (changed = 1; changed; ) { changed = 0
				for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } } }
				for (p in keep) print p }' <<<"$table")
		local ticks=0 pid fields
		for pid in $tree; do
			# Fields 14 to 17 of /proc/PID/stat, counted after the command
			# name, which may hold spaces: utime stime cutime cstime.
			fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
			ticks=$((ticks + $(awk '{ print $12 + $13 + $14 + $15 }' <<<"$fields")))
		done
		echo "$svc $ticks"
	done
}

# long_test TAG TEST: bring the stack up and run one long test, behind its
# own build tag, verbosely; the log goes to .stack/logs/TAG.log too.
long_test() {
	cmd_up
	test_env
	cd "$root"
	go test -tags="integration,$1" -count=1 -run "^$2\$" -timeout 24h -v . 2>&1 | tee "$state/logs/$1.log" |
		grep -vE '^=== RUN'
	return "${PIPESTATUS[0]}"
}

main() {
	local cmd=${1:-}
	shift || true
	case "$cmd" in
	up) cmd_up "$@" ;;
	down) cmd_down ;;
	ps) cmd_ps ;;
	logs) cat "$state/logs/${1:?usage: stack.sh logs SERVICE}.log" 2>/dev/null || port_of "$1" >/dev/null ;;
	start) cmd_start "$@" ;;
	stop) stop_service "${1:?usage: stack.sh stop SERVICE}" TERM ;;
	kill) stop_service "${1:?usage: stack.sh kill SERVICE}" KILL ;;
	test) cmd_test ;;
	check) cmd_check ;;
	soak) cmd_soak "$@" ;;
	chaos) cmd_chaos "$@" ;;
	cpu) cmd_cpu "$@" ;;
	pause) signal_service "${1:?usage: stack.sh pause SERVICE}" STOP ;;
	unpause) signal_service "${1:?usage: stack.sh unpause SERVICE}" CONT ;;
	partition) cmd_partition "$@" ;;
	heal) cmd_heal "$@" ;;
	skew) cmd_skew "$@" ;;
	unskew) cmd_unskew "$@" ;;
	bench) exec "$root/bench.sh" ;;
	backup) cmd_backup "$@" ;;
	restore) cmd_restore "$@" ;;
	wipe) cmd_wipe "$@" ;;
	rejoin) cmd_rejoin "$@" ;;
	rotate-logs) while sleep 10; do rotate_logs; done ;; # the rotator itself (start_log_rotation)
	*) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
	esac
}

# Run only when executed: bench.sh sources this file for its functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	main "$@"
fi
