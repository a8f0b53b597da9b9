-- Schema of one regional database. Both regions run this same file, then
-- us_seed.sql and eu_seed.sql, so that the two databases start identical.
--
-- The file is idempotent (IF NOT EXISTS everywhere) so that running it twice, as
-- a restarted local stack may, changes nothing.

-- properties is the listing itself, with the seed's column names.
CREATE TABLE IF NOT EXISTS properties (
    id            BIGINT PRIMARY KEY,
    -- Exact decimal money: never a binary float anywhere on its way.
    price         DECIMAL(12, 2) NOT NULL CHECK (price > 0),
    bedrooms      INTEGER CHECK (bedrooms BETWEEN 0 AND 100),
    bathrooms     INTEGER CHECK (bathrooms BETWEEN 0 AND 100),
    -- The region that wrote the current version of the row.
    region_origin VARCHAR(2) NOT NULL CHECK (region_origin IN ('us', 'eu')),
    -- BIGINT rather than the seed's INTEGER: version + 1 can then never overflow.
    version       BIGINT NOT NULL DEFAULT 1 CHECK (version >= 1),
    -- TIMESTAMPTZ rather than TIMESTAMP: an instant, which no session time zone
    -- can shift. Replication compares it across regions, so it must be exact.
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS properties_region_origin_idx ON properties (region_origin);
CREATE INDEX IF NOT EXISTS properties_updated_at_idx ON properties (updated_at);

-- processed_requests remembers every X-Request-ID that produced a successful
-- update, here or in the other region, with the response the client got. A
-- request id is written in the same transaction as its update, so it exists if
-- and only if the update does.
CREATE TABLE IF NOT EXISTS processed_requests (
    request_id   TEXT PRIMARY KEY,
    property_id  BIGINT NOT NULL,
    -- The region that served the original request.
    region       VARCHAR(2) NOT NULL,
    -- The 200 body of the original request, returned with a 422 to a retry.
    response     JSONB NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- outbox holds the replication events of local writes until Kafka has
-- acknowledged them (the transactional outbox pattern, see replicate.go). Rows
-- are inserted by the update's own transaction and deleted by the relay.
CREATE TABLE IF NOT EXISTS outbox (
    -- seq orders the events of one property: two updates of the same row are
    -- serialized by its row lock, so the later one also takes the later seq.
    seq         BIGSERIAL PRIMARY KEY,
    property_id BIGINT NOT NULL,
    payload     JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

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
