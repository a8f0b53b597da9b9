//go:build integration

package main

// Exposure: what the service can reach and do beyond its job. The backends
// connect to PostgreSQL as a role of their own, which may read and write the
// service's tables and nothing more (service_role.sql).

import (
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestServiceRoleCanOnlyReadAndWrite(t *testing.T) {
	newStack(t)
	for _, region := range []string{"us", "eu"} {
		t.Run(region, func(t *testing.T) {
			admin, service := stackDB(t, region), serviceDB(t, region)
			user := setting("SERVICE_DB_USER", "")
			var connected int
			if err := admin.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()`, user).Scan(&connected); err != nil {
				t.Fatal(err)
			}
			if connected == 0 {
				t.Errorf("no session of %s in %s's database: the backend does not connect as its own role", user, region)
			}
			var super bool
			if err := service.QueryRow(`SELECT rolsuper FROM pg_roles WHERE rolname = current_user`).Scan(&super); err != nil || super {
				t.Errorf("%s is a superuser (%v, %v)", user, super, err)
			}
			// What it needs, inside a transaction rolled back at once.
			tx, err := service.Begin()
			if err != nil {
				t.Fatal(err)
			}
			for _, stmt := range []string{
				`SELECT count(*) FROM properties`,
				`UPDATE properties SET price = price WHERE id = 1`,
				`DELETE FROM outbox WHERE seq < 0`,
				`SELECT count(*) FROM processed_requests`,
				`SELECT count(*) FROM replication_watermarks`,
			} {
				if _, err := tx.Exec(stmt); err != nil {
					t.Errorf("%s may not %q: %v", user, stmt, err)
				}
			}
			tx.Rollback()
			// And nothing more.
			for _, stmt := range []string{
				`CREATE TABLE intruder (id int)`,
				`DROP TABLE outbox`,
				`ALTER TABLE properties ADD COLUMN intruder int`,
				`TRUNCATE properties`,
				`CREATE ROLE intruder SUPERUSER`,
				`CREATE DATABASE intruder`,
			} {
				_, err := service.Exec(stmt)
				var pgErr *pgconn.PgError
				if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
					t.Errorf("%s may %q (%v), want insufficient privilege (42501)", user, stmt, err)
				}
			}
		})
	}
}
