package main

import (
	"context"
	"database/sql"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestPurge ages some request ids and tombstones past the retention and
// purges, in batches of two: the expired go, the young stay, and so do an
// expired request id whose event is still in the outbox and a live listing
// however old. While another instance holds the purge lock, nothing is
// purged.
func TestPurge(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	exec := func(query string, args ...any) {
		t.Helper()
		if _, err := db.ExecContext(ctx, query, args...); err != nil {
			t.Fatalf("%s: %v", query, err)
		}
	}
	record := func(id string, age time.Duration) {
		t.Helper()
		exec(`INSERT INTO processed_requests (request_id, fingerprint, property_id, price, region_origin, version, updated_at, processed_at)
		      VALUES ($1, 'f', 1, 1, 'us', 2, now(), now() - make_interval(secs => $2))`, id, age.Seconds())
	}
	for _, id := range []string{"purge-old-1", "purge-old-2", "purge-old-3", "purge-old-4", "purge-old-5"} {
		record(id, 2*time.Hour)
	}
	record("purge-young", time.Minute)
	record("purge-old-in-outbox", 2*time.Hour)
	// Its event, stamped in the same transaction as its record. (Removed
	// after the test: an event two hours old in the outbox holds every
	// younger record, in the tests that follow too.)
	exec(`INSERT INTO outbox (request_id, fingerprint, property_id, price, region_origin, version, updated_at, created_at)
	      SELECT request_id, 'f', 1, 1, 'us', 2, now(), processed_at FROM processed_requests WHERE request_id = 'purge-old-in-outbox'`)
	t.Cleanup(func() { db.Exec(`DELETE FROM outbox WHERE request_id = 'purge-old-in-outbox'`) })
	exec(`UPDATE properties SET deleted = true, updated_at = now() - interval '2 hours' WHERE id = 90`) // an old tombstone
	exec(`UPDATE properties SET deleted = true, updated_at = now() WHERE id = 91`)                      // a young one
	exec(`UPDATE properties SET updated_at = now() - interval '2 hours' WHERE id = 92`)                 // old, but live

	replicatedUntil(t, db, time.Now())
	p := newTestPurger(db, time.Hour)
	p.batchSize = 2

	// Another instance purging: this one leaves everything.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, purgeLockKey); err != nil {
		t.Fatal(err)
	}
	if err := p.round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.stats(); got.RequestIDs != 0 || got.Tombstones != 0 {
		t.Errorf("purged %+v while another instance held the lock, want nothing", got)
	}
	tx.Rollback()

	if err := p.round(ctx); err != nil {
		t.Fatal(err)
	}
	got := p.stats()
	if age := time.Since(got.OldestRequestID); got.RequestIDs != 5 || got.Tombstones != 1 || age < 2*time.Hour || age > 2*time.Hour+time.Minute {
		t.Errorf("purge stats %+v, want 5 request ids, 1 tombstone, and the oldest kept the one in the outbox", got)
	}
	var left []string
	rows, err := db.QueryContext(ctx, `SELECT request_id FROM processed_requests WHERE request_id LIKE 'purge-%' ORDER BY request_id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		rows.Scan(&id)
		left = append(left, id)
	}
	rows.Close()
	if diff := cmp.Diff([]string{"purge-old-in-outbox", "purge-young"}, left); diff != "" {
		t.Errorf("request ids left (-want +got):\n%s", diff)
	}
	for id, want := range map[int64]bool{90: false, 91: true, 92: true} {
		var n int
		db.QueryRowContext(ctx, `SELECT count(*) FROM properties WHERE id = $1`, id).Scan(&n)
		if (n == 1) != want {
			t.Errorf("listing %d: %d rows after the purge, want kept = %v", id, n, want)
		}
	}
}

// TestPurgeLooksUpTheOutbox: with 20,000 events waiting in the outbox (a
// Kafka outage), a purge batch reads one of them, not the outbox per
// request id it looks at (asked of PostgreSQL's plan).
func TestPurgeLooksUpTheOutbox(t *testing.T) {
	db := testDB(t)
	if _, err := db.Exec(`INSERT INTO processed_requests (request_id, fingerprint, property_id, price, region_origin, version, updated_at, processed_at)
	      SELECT 'outbox-lookup-' || i, 'f', 1, 1, 'us', 2, now(), now() - interval '2 hours' FROM generate_series(1, 100) AS i`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO outbox (request_id, fingerprint, property_id, price, region_origin, version, updated_at)
	      SELECT 'outbox-lookup-waiting-' || i, 'f', 1, 1, 'us', 2, now() FROM generate_series(1, 20000) AS i`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec(`DELETE FROM outbox WHERE request_id LIKE 'outbox-lookup-%'`)
		db.Exec(`DELETE FROM processed_requests WHERE request_id LIKE 'outbox-lookup-%'`)
	})
	db.Exec(`ANALYZE outbox`)
	plan, raw := explainAnalyze(t, db, nil, purgeRequestIDsSQL, time.Hour.Seconds(), 50, time.Time{}, time.Now())
	if most := mostRowsRead(plan, "outbox"); most > 1 {
		t.Errorf("the purge read %v rows of the outbox in one go, want 1:\n%s", most, raw)
	}
	if most := mostRowsRead(plan, "processed_requests"); most < 50 {
		t.Errorf("the purge found %v expired request ids, want a batch of 50 (the test saw nothing):\n%s", most, raw)
	}
}

// TestPurgeOneInstanceAtATime: while one instance's round rests between
// its batches, another instance's round purges nothing. Instances taking
// turns batch by batch would each purge at full pace, and the region's
// writes would carry both.
func TestPurgeOneInstanceAtATime(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	const expired = 12
	if _, err := db.ExecContext(ctx, `
INSERT INTO processed_requests (request_id, fingerprint, property_id, price, region_origin, version, updated_at, processed_at)
SELECT 'turns-' || g, 'f', 1, 1, 'us', 2, now(), now() - interval '2 hours' FROM generate_series(1, $1) g`, expired); err != nil {
		t.Fatal(err)
	}
	replicatedUntil(t, db, time.Now())
	first, second := newTestPurger(db, time.Hour), newTestPurger(db, time.Hour)
	first.batchSize, second.batchSize = 1, 1 // twelve batches, each followed by a rest of purgePause at least
	done := make(chan error, 1)
	go func() { done <- first.round(ctx) }()
	waitFor(t, 10*time.Second, "the first instance's first batch", func() bool { return first.stats().RequestIDs > 0 })
	if err := second.round(ctx); err != nil {
		t.Fatal(err)
	}
	if n := first.stats().RequestIDs; n >= expired {
		t.Fatalf("the first instance's round had ended (%d purged) before the second's began: nothing was tested", n)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if a, b := first.stats().RequestIDs, second.stats().RequestIDs; a < expired || b != 0 {
		t.Errorf("the first instance purged %d request ids, the second %d while the first's round went on; want all %d by the first", a, b, expired)
	}
}

// TestPurgeLeavesItsConnectionAsFound: the round's connection goes back to
// the pool committing as every other does, waiting for the disk, and
// without the purge lock.
func TestPurgeLeavesItsConnectionAsFound(t *testing.T) {
	db := testDB(t)
	// One connection: the round's, then the checks', is the same.
	defer db.SetMaxOpenConns(db.Stats().MaxOpenConnections)
	db.SetMaxOpenConns(1)
	if err := newTestPurger(db, time.Hour).round(context.Background()); err != nil {
		t.Fatal(err)
	}
	var commit string
	var locks int
	if err := db.QueryRow(`SELECT current_setting('synchronous_commit'), (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())`).Scan(&commit, &locks); err != nil {
		t.Fatal(err)
	}
	if commit != "on" || locks != 0 {
		t.Errorf("after a round, the pooled connection has synchronous_commit %q and %d advisory locks; want on and none", commit, locks)
	}
}

// TestRetryAfterExpiry is the bound of idempotency: a retry that comes after
// its request id expired is not recognised; it is judged as a new write (a
// 409 here, as the version it names has moved on).
func TestRetryAfterExpiry(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	const requestID, path, body = "expiring-1", "/us/properties/93", `{"price": 93000, "version": 1}`
	if status, _, got := call(t, srv, "PUT", path, requestID, body); status != http.StatusOK {
		t.Fatalf("PUT: %d %+v", status, got)
	}
	if status, _, _ := call(t, srv, "PUT", path, requestID, body); status != http.StatusUnprocessableEntity {
		t.Fatalf("retry before expiry: %d, want 422", status)
	}
	// The relay has published the event, and the retention has passed.
	if _, err := db.Exec(`DELETE FROM outbox WHERE request_id = $1`, requestID); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE processed_requests SET processed_at = now() - interval '2 hours' WHERE request_id = $1`, requestID); err != nil {
		t.Fatal(err)
	}
	replicatedUntil(t, db, time.Now())
	if err := newTestPurger(db, time.Hour).round(context.Background()); err != nil {
		t.Fatal(err)
	}
	status, _, got := call(t, srv, "PUT", path, requestID, body)
	if diff := cmp.Diff(response{Error: "version mismatch", CurrentVersion: 2}, got); status != http.StatusConflict || diff != "" {
		t.Errorf("retry after expiry: %d, want 409 as a new write (-want +got):\n%s", status, diff)
	}
}

// newTestPurger is the purge of region us's database db, for a topic that
// keeps events half as long as retention.
func newTestPurger(db *sql.DB, retention time.Duration) *purger {
	return newPurger(slog.New(slog.NewTextHandler(io.Discard, nil)), db, "us", retention,
		func(context.Context) (time.Duration, error) { return retention / 2, nil })
}

// replicatedUntil records in db, region us's, that replication has moved
// past at in both directions: EU's heartbeats in its one partition echo a
// US watermark of at, and carry a watermark of their own of at.
func replicatedUntil(t *testing.T, db *sql.DB, at time.Time) {
	t.Helper()
	if _, err := db.Exec(`
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, seen) VALUES ('eu', 0, 1, $1, $1)
ON CONFLICT (peer_region, partition) DO UPDATE SET partitions = 1, watermark = $1, seen = $1`, at); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`DELETE FROM replication_watermarks WHERE peer_region = 'eu' AND partition <> 0`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Exec(`DELETE FROM replication_watermarks WHERE peer_region = 'eu'`) })
}

// TestUnsafeRetention: the retention must outlast what the topic may keep.
func TestUnsafeRetention(t *testing.T) {
	day := 24 * time.Hour
	for _, tt := range []struct {
		retention, keeps time.Duration
		ok               bool
	}{
		{9 * day, 8 * day, true},
		{8 * day, 8 * day, false},
		{time.Hour, 8 * day, false},
		{100 * day, -1, false}, // the topic keeps events forever
	} {
		if why := unsafeRetention(tt.retention, tt.keeps); (why == "") != tt.ok {
			t.Errorf("unsafeRetention(%v, %v) = %q, want ok = %v", tt.retention, tt.keeps, why, tt.ok)
		}
	}
}

// TestPurgeWaitsForReplication: a tombstone older than RETENTION is not
// purged while an event that could revive it may still arrive. Here US's
// database: its own tombstone waits until EU's heartbeats echo a US
// watermark past it (EU had applied the delete, and everything EU began
// before has arrived here); one EU wrote waits until US's watermark of EU
// is past it. Purged before, the tombstone lets an older concurrent write,
// still on its way, bring the listing back in one region only.
func TestPurgeWaitsForReplication(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	deleted := time.Now().Add(-2 * time.Hour).UTC().Truncate(time.Microsecond)
	for id, region := range map[int64]string{94: "us", 95: "eu"} {
		if _, err := db.ExecContext(ctx, `UPDATE properties SET deleted = true, version = 2, region_origin = $2, updated_at = $3 WHERE id = $1`, id, region, deleted); err != nil {
			t.Fatal(err)
		}
	}
	kept := func() []int64 {
		t.Helper()
		var ids []int64
		rows, err := db.QueryContext(ctx, `SELECT id FROM properties WHERE id IN (94, 95) ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var id int64
			rows.Scan(&id)
			ids = append(ids, id)
		}
		return ids
	}
	p := newTestPurger(db, time.Hour)

	// EU has been cut off since before the deletes.
	replicatedUntil(t, db, deleted.Add(-time.Minute))
	if err := p.round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := kept(); !cmp.Equal([]int64{94, 95}, got) {
		t.Fatalf("tombstones kept while replication is behind them: %v, want both", got)
	}
	// A write of 95 that EU made before its delete arrives late: it loses
	// to the tombstone, which is still here.
	late := seedProperty(95)
	late.Version, late.RegionOrigin, late.UpdatedAt = 2, "eu", deleted.Add(-time.Second)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	outcomes, _, err := applyEvents(ctx, tx, []event{{Property: late, RequestID: "late-write", fingerprint: strings.Repeat("0", 64)}}, time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if outcomes[0] != conflictLost {
		t.Errorf("the late write against the tombstone: %v, want conflict lost", outcomes[0])
	}

	// Replication has moved past both: both go.
	replicatedUntil(t, db, time.Now())
	if err := p.round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := kept(); len(got) != 0 {
		t.Errorf("tombstones kept once replication moved past them: %v, want none", got)
	}

	// Were the late write to arrive now, older than RETENTION for a listing
	// with no row, it is not applied: it cannot be told from one that
	// would revive a purged tombstone.
	tx, err = db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	outcomes, _, err = applyEvents(ctx, tx, []event{{Property: late, RequestID: "late-write-2", fingerprint: strings.Repeat("0", 64)}}, time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if outcomes[0] != expired {
		t.Errorf("a write older than the retention for a purged listing: %v, want expired", outcomes[0])
	}
	var rows int
	tx.QueryRowContext(ctx, `SELECT count(*) FROM properties WHERE id = 95`).Scan(&rows)
	if rows != 0 {
		t.Errorf("the expired write made %d rows of listing 95, want none", rows)
	}
}
