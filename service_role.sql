-- The role the backends connect as: it may read and write the service's
-- eight tables and use its sequences, and nothing more. It owns nothing, so
-- it cannot alter or drop a table; PostgreSQL 15 gives PUBLIC no CREATE on
-- the public schema, so it cannot make one; it is no superuser. A bug or an
-- injected statement in the service can therefore change listings, but not
-- the schema, other databases or the server.
--
-- Run by psql as the superuser after init.sql (the postgres image runs it from
-- docker-entrypoint-initdb.d, ./stack.sh when it creates a cluster), with the
-- role's name and password in SERVICE_DB_USER and SERVICE_DB_PASSWORD. It is
-- psql, not plain SQL, because the password comes from the environment and
-- must not be written in a file; run twice, it changes nothing.
\getenv service_user SERVICE_DB_USER
\getenv service_password SERVICE_DB_PASSWORD

SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'service_user', :'service_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'service_user') \gexec

GRANT SELECT, INSERT, UPDATE, DELETE
    ON properties, processed_requests, outbox, outbox_published, replication_watermarks, replication_positions, conflicts, rejoin
    TO :"service_user";
GRANT USAGE ON SEQUENCE outbox_seq_seq, conflicts_seq_seq, property_ids_us, property_ids_eu TO :"service_user";
-- A region that rejoins reads its outbox and id sequences and moves them
-- past what its peer holds of it (rejoin.go): SELECT and UPDATE (setval).
GRANT SELECT, UPDATE ON SEQUENCE outbox_seq_seq, property_ids_us, property_ids_eu TO :"service_user";
