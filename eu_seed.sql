-- Listings 501–1000, first written in the EU region.
--
-- Both seed files load into BOTH regional databases, so the two regions start
-- byte-identical and either backend can serve any listing when the other is
-- down. The values are a pure function of the id (no random()) and every row
-- has the same updated_at, so every load produces exactly the same rows.
-- ON CONFLICT DO NOTHING makes a second load a no-op that keeps later updates.
-- Ids from 1001 on are for new listings, from each region's own sequence
-- (init.sql); the seeds hold no tombstones: every seed listing is live.
INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT id,
       -- 150,000.00 plus a step per id; the cents vary so that the two-decimal
       -- path is exercised from the first request.
       150000 + id * 1250 + (id % 4) * 0.25,
       1 + id % 5,
       1 + id % 3,
       'eu',
       1,
       TIMESTAMPTZ '2026-01-01 00:00:00+00'
FROM generate_series(501, 1000) AS id
ON CONFLICT (id) DO NOTHING;
