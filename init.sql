-- Schema of one regional database. Both regions run this same file, then
-- us_seed.sql and eu_seed.sql, so that the two databases start identical.
--
-- The file is idempotent (IF NOT EXISTS everywhere) so that running it twice, as
-- a restarted local stack may, changes nothing.

-- The rules a listing's values obey, as domains: types with a CHECK. The
-- service validates every value before it writes, so these are the last line
-- of defence, against a bug or a hand-written UPDATE.
--
-- Why domains rather than CHECK constraints on the table: PostgreSQL 15 parses
-- and plans a table's CHECK expressions again for every INSERT or UPDATE
-- statement, while a domain's checks are parsed once and cached. On the
-- update path that parsing was a measurable share of the server's work (the
-- figures are in docs/benchmarks.md).
--
-- CREATE DOMAIN has no IF NOT EXISTS, hence the block.
DO $$
BEGIN
    IF to_regtype('listing_price') IS NULL THEN
        -- Exact decimal money: never a binary float anywhere on its way.
        CREATE DOMAIN listing_price AS DECIMAL(12, 2) CHECK (VALUE > 0);
    END IF;
    IF to_regtype('room_count') IS NULL THEN
        CREATE DOMAIN room_count AS INTEGER CHECK (VALUE BETWEEN 0 AND 100);
    END IF;
    IF to_regtype('region_code') IS NULL THEN
        CREATE DOMAIN region_code AS VARCHAR(2) CHECK (VALUE IN ('us', 'eu'));
    END IF;
    IF to_regtype('row_version') IS NULL THEN
        -- BIGINT rather than the seed's INTEGER: version + 1 can then never
        -- overflow.
        CREATE DOMAIN row_version AS BIGINT CHECK (VALUE >= 1);
    END IF;
END
$$;

-- properties is the listing itself, with the seed's column names.
CREATE TABLE IF NOT EXISTS properties (
    id            BIGINT PRIMARY KEY,
    price         listing_price NOT NULL,
    bedrooms      room_count,
    bathrooms     room_count,
    -- The region that wrote the current version of the row.
    region_origin region_code NOT NULL,
    version       row_version NOT NULL DEFAULT 1,
    -- TIMESTAMPTZ rather than TIMESTAMP: an instant, which no session time zone
    -- can shift. Replication compares it across regions, so it must be exact.
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A deleted listing stays as a tombstone: the delete is a write like any
    -- other, with the next version, so that the conflict rule orders it
    -- against a concurrent update and no older event can bring the listing
    -- back. The other columns keep the last state's values.
    deleted       BOOLEAN NOT NULL DEFAULT false
);

CREATE INDEX IF NOT EXISTS properties_region_origin_idx ON properties (region_origin);

-- What the current version of a row was written by and built on: the
-- request id of its write, and the tag (version-region, as the ETag names
-- it) of the state that write replaced; NULL for a seed or a create. With
-- them a region that replaces a write by one not built on it, or receives a
-- write its row was not built on, knows an acknowledged write was lost and
-- records it (conflict.go).
ALTER TABLE properties ADD COLUMN IF NOT EXISTS request_id TEXT;
ALTER TABLE properties ADD COLUMN IF NOT EXISTS parent TEXT;

-- The ids of new listings. Each region allocates from a sequence of its own,
-- US the odd ids and EU the even ones from 1001 on (the seeds hold 1-1000),
-- so the two can never hand out the same id, even while they cannot talk to
-- each other.
CREATE SEQUENCE IF NOT EXISTS property_ids_us START 1001 INCREMENT 2;
CREATE SEQUENCE IF NOT EXISTS property_ids_eu START 1002 INCREMENT 2;
CREATE INDEX IF NOT EXISTS properties_updated_at_idx ON properties (updated_at);

-- processed_requests remembers, for RETENTION (retention.go), every
-- X-Request-ID that produced a successful write (update, create or delete),
-- here or in the other region, with the row that write made: that
-- row is the original response a retry gets with its 422. A request id is
-- written by the same statement as its write, so it exists if and only if
-- the write does (until the purge). When one request
-- was written in both regions (a retry replayed in the other region before
-- the first write arrived there), both regions keep the same record: the
-- greater write under the conflict rule (see idempotency.go).
CREATE TABLE IF NOT EXISTS processed_requests (
    request_id    TEXT PRIMARY KEY,
    -- What the request asked for (method, resource, body), hashed: the same
    -- id with another request is told from a retry (idempotency.go).
    fingerprint   TEXT NOT NULL,
    property_id   BIGINT NOT NULL,
    price         DECIMAL(12, 2) NOT NULL,
    bedrooms      INTEGER,
    bathrooms     INTEGER,
    -- The region that served the original request.
    region_origin VARCHAR(2) NOT NULL,
    version       BIGINT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT false,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The state the request's write was built on (properties.parent), so that
-- the chain of writes a row was built on can be followed.
ALTER TABLE processed_requests ADD COLUMN IF NOT EXISTS parent TEXT;

-- The purge (retention.go) finds expired request ids and tombstones by these,
-- oldest first. The tombstones' index is partial: only deletes enter it.
CREATE INDEX IF NOT EXISTS processed_requests_processed_at_idx ON processed_requests (processed_at);
CREATE INDEX IF NOT EXISTS properties_tombstones_idx ON properties (updated_at) WHERE deleted;

-- outbox holds the events of local writes that Kafka has not acknowledged
-- yet (the transactional outbox pattern, see relay.go). Every write inserts
-- its event in the same statement as the change; the relay publishes it and
-- deletes it once Kafka has it. An event is never changed: it is the write as
-- it was made, even after the request's record here has given way to the
-- other region's twin (idempotency.go).
CREATE TABLE IF NOT EXISTS outbox (
    -- seq orders the events of one property: two updates of the same row are
    -- serialized by its row lock, so the later one also takes the later seq.
    seq           BIGSERIAL PRIMARY KEY,
    -- The request's record in processed_requests, written by the same
    -- statement. Not a declared foreign key: its check cost every write a
    -- look-up, and the purge one per row it deleted (more than half of a
    -- purge batch's time); the purge keeps a record while its event waits
    -- here instead (retention.go).
    request_id    TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    property_id   BIGINT NOT NULL,
    price         DECIMAL(12, 2) NOT NULL,
    bedrooms      INTEGER,
    bathrooms     INTEGER,
    region_origin VARCHAR(2) NOT NULL,
    version       BIGINT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT false,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An event carries the state its write was built on (properties.parent).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS parent TEXT;

-- The relay's heartbeats (relay.go) read the oldest event waiting here, and
-- the lag report how long it has waited: by this index, in O(log n),
-- however long the backlog an outage of Kafka left.
CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON outbox (created_at);

-- outbox_published holds the highest seq of an event the relay has published
-- and deleted from the outbox (relay.go). With the outbox's own highest seq
-- it is the highest seq this database has written, which the region compares
-- with what the peer saw it publish (rejoin.go): a database below it lost
-- writes that had left it. The sequence's last_value cannot tell: PostgreSQL
-- logs a sequence 32 values ahead, and a database restored from a backup
-- resumes past writes it lost, so up to 32 of them looked like writes it
-- never made (seen in the fault campaign: a restored region served on
-- without them, for good). No row is 0. A database from before this table
-- starts from its sequence.
CREATE TABLE IF NOT EXISTS outbox_published (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    seq BIGINT NOT NULL
);
INSERT INTO outbox_published (seq)
SELECT last_value FROM outbox_seq_seq WHERE is_called
ON CONFLICT (one) DO NOTHING;

-- replication_watermarks records, per Kafka partition, the peer region's
-- heartbeat time up to which everything the peer committed has been applied
-- here. The replication lag is now() minus the smallest of them (see lag.go).
-- It is written in the same transaction as the events it covers.
CREATE TABLE IF NOT EXISTS replication_watermarks (
    peer_region VARCHAR(2) NOT NULL,
    partition   INTEGER NOT NULL,
    partitions  INTEGER NOT NULL,
    watermark   TIMESTAMPTZ NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (peer_region, partition)
);
-- seen is the echo the peer's heartbeat carried: this region's own
-- watermark as the peer had applied it when it sent the heartbeat, in this
-- region's clock. A stand-in compares it with this database's clock, never
-- with the peer's (standin.go).
ALTER TABLE replication_watermarks ADD COLUMN IF NOT EXISTS seen TIMESTAMPTZ;
-- echo_bound is the latest echoing heartbeat's watermark carried into this
-- database's clock, at its earliest, and echo_seen the echo it came from:
-- what lets the lag be measured without trusting the clocks (lag.go).
ALTER TABLE replication_watermarks ADD COLUMN IF NOT EXISTS echo_bound TIMESTAMPTZ;
ALTER TABLE replication_watermarks ADD COLUMN IF NOT EXISTS echo_seen TIMESTAMPTZ;
ALTER TABLE replication_watermarks DROP COLUMN IF EXISTS echo_offset_us;

-- replication_positions is where this region stands in the topic: for each
-- partition, the offset of the next record its consumer reads (consume.go).
-- It is written in the same transaction as the events it moves past, so it
-- is exactly as old as the rows: never ahead of what was applied (which a
-- position kept only in Kafka could be after a restore from a backup), and
-- never lost with a consumer group Kafka expired. No row for a partition:
-- read it from its oldest retained record.
CREATE TABLE IF NOT EXISTS replication_positions (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    PRIMARY KEY (topic, partition)
);

-- conflicts records every acknowledged write this region found lost: replaced
-- by a write not built on it, or arriving after a write that was not built
-- on it won (conflict.go). lost and won are the two writes as the API shows
-- a listing, with their request ids; lost_tag names the lost write, so that
-- its record goes if a later write turns out to be built on it after all.
-- Kept for RETENTION, like request ids (retention.go), and served newest
-- first at GET /{region}/conflicts.
CREATE TABLE IF NOT EXISTS conflicts (
    seq             BIGSERIAL PRIMARY KEY,
    property_id     BIGINT NOT NULL,
    lost_request_id TEXT NOT NULL UNIQUE,
    lost_tag        TEXT NOT NULL,
    lost            JSONB NOT NULL,
    won             JSONB NOT NULL,
    found_in        VARCHAR(2) NOT NULL,
    found_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conflicts_property_idx ON conflicts (property_id);
CREATE INDEX IF NOT EXISTS conflicts_found_at_idx ON conflicts (found_at);

-- published is the highest outbox seq of the peer's events applied from
-- the partition: a number this region holds for the peer. The peer asks
-- for it (GET /internal/published/{region}) and compares it with its own
-- outbox sequence: a database that hands out a seq below it has lost
-- writes that left it, restored from an older backup or replaced by an
-- empty one (rejoin.go).
ALTER TABLE replication_positions ADD COLUMN IF NOT EXISTS published BIGINT NOT NULL DEFAULT 0;
ALTER TABLE replication_watermarks DROP COLUMN IF EXISTS published;

-- rejoin holds one row while this region rejoins: it found its database is
-- not what its position says (rejoin.go), and rebuilds its copy from the
-- peer, a snapshot and then the log after it. While the row exists the
-- region sends its clients away (503, so NGINX goes to the peer), and its
-- consumers apply nothing until the snapshot is in (phase 'snapshot'); in
-- phase 'log' they catch up from the snapshot's low watermark on. The row
-- is deleted when the region has caught up. from_nothing asks for the
-- region's copy to be emptied first (property-listing rejoin --from-nothing).
CREATE TABLE IF NOT EXISTS rejoin (
    one          BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    reason       TEXT NOT NULL,
    from_nothing BOOLEAN NOT NULL DEFAULT false,
    phase        TEXT NOT NULL DEFAULT 'waiting' CHECK (phase IN ('waiting', 'snapshot', 'log')),
    listings     BIGINT NOT NULL DEFAULT 0,
    requests     BIGINT NOT NULL DEFAULT 0,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
