package main

// Retention: request ids and tombstones are kept for RETENTION, then purged.
//
// Both exist for replication's sake. A request id lets a retry, in either
// region, be recognised (idempotency.go); a tombstone keeps a deleted
// listing from coming back by an older event (conflict.go). Neither is
// needed once no event that could meet it can still arrive: Kafka deletes
// events after the topic's retention, so RETENTION must be longer than that,
// and the service refuses to run otherwise (checkRetention). Kept forever,
// at a thousand writes a second, they would add 86 million rows a day.
//
// The bound this puts on idempotency: a retry that comes more than
// RETENTION after its request was applied is a new write.
//
// The purge runs in each region, in small batches, each its own short
// transaction: no long transaction, no table rewrite, a few milliseconds of
// row locks at a time, taken with SKIP LOCKED so that a write is never
// made to wait. An advisory lock, held for a whole round, lets one
// instance per region purge at a time, however many run. A request id
// whose event is still in the outbox (Kafka has been down that long)
// stays until the event has gone.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const (
	// defaultRetention is RETENTION's default: a day longer than the
	// topic's retention (topicRetention), so that an event published just
	// before a record's expiry has a day to be delivered.
	defaultRetention = topicRetention + 24*time.Hour
	// purgeInterval is how often the purge looks for expired rows.
	purgeInterval = time.Minute
	// purgeBatch is how many rows one purge transaction deletes at most.
	purgeBatch = 50
	// purgePause is the least rest between two batches; after a batch the
	// purge rests purgeRest times as long as the batch took, so that it
	// keeps the database (and a core) busy at most a sixth of the time and
	// a backlog of expired rows is purged as a trickle, not a burst that
	// writes would queue behind.
	purgePause = 15 * time.Millisecond
	purgeRest  = 5
	// purgeLockKey names the advisory lock that makes one instance per
	// region purge at a time.
	purgeLockKey = 0x7075726765 // "purge"
)

// parseRetention reads RETENTION: a Go duration ("36h", "90s") or a
// number of days ("8d").
func parseRetention(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 1 {
			return 0, fmt.Errorf("RETENTION must be a duration such as 8d or 192h, got %q", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("RETENTION must be a duration such as 8d or 192h, got %q", s)
	}
	return d, nil
}

// checkRetention refuses a retention that is not longer than the topic's
// (topic < 0: the topic keeps events forever).
func checkRetention(retention, topic time.Duration) error {
	if topic < 0 || retention <= topic {
		kept := "forever"
		if topic >= 0 {
			kept = topic.String()
		}
		return fmt.Errorf("RETENTION %v must be longer than the topic's retention.ms (%s): an event Kafka still holds could find its request id or tombstone gone", retention, kept)
	}
	return nil
}

// purgeStats is what the purge has done, for the metrics.
type purgeStats struct {
	RequestIDs, Tombstones int64     // rows purged since the process started
	OldestRequestID        time.Time // processed_at of the oldest request id kept; zero if none
}

// purger deletes expired request ids and tombstones of one region.
type purger struct {
	logger    *slog.Logger
	db        *sql.DB
	retention time.Duration
	batchSize int // rows per transaction, purgeBatch

	requestIDs, tombstones atomic.Int64
	oldest                 atomic.Pointer[time.Time]
}

func newPurger(logger *slog.Logger, db *sql.DB, retention time.Duration) *purger {
	return &purger{logger: logger, db: db, retention: retention, batchSize: purgeBatch}
}

// stats returns what the purge has done so far.
func (p *purger) stats() purgeStats {
	s := purgeStats{RequestIDs: p.requestIDs.Load(), Tombstones: p.tombstones.Load()}
	if t := p.oldest.Load(); t != nil {
		s.OldestRequestID = *t
	}
	return s
}

// run purges every purgeInterval until ctx is cancelled.
func (p *purger) run(ctx context.Context) {
	for {
		if err := p.round(ctx); err != nil && ctx.Err() == nil {
			p.logger.Warn("purge failed; it tries again", "err", err)
		}
		if !sleep(ctx, purgeInterval) {
			return
		}
	}
}

// purgeRequestIDsSQL deletes a batch of expired request ids ($1 the
// retention in seconds, $2 the batch size), oldest first from $3 on,
// skipping those whose event still waits in the outbox and rows a write
// holds, and returns how many it deleted and the newest of them. A round
// starts each batch where the last one stopped: the index entries of rows
// just deleted stay until a vacuum, and a batch that began at the index's
// start would walk over all of them, ever more as a backlog is purged. A
// row passed over (locked, or waiting in the outbox) is the next round's.
// The rows are deleted by their place in the table (ctid), which the
// locking read found them at and a locked row keeps: no second walk down
// the primary key for each.
const purgeRequestIDsSQL = `
WITH expired AS (
    SELECT ctid, processed_at FROM processed_requests r
    WHERE processed_at < now() - make_interval(secs => $1)
      AND processed_at >= $3
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.request_id = r.request_id)
    ORDER BY processed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM processed_requests r USING expired e WHERE r.ctid = e.ctid
    RETURNING e.processed_at
)
SELECT count(*), max(processed_at) FROM gone`

// purgeTombstonesSQL deletes a batch of expired tombstones, oldest first
// from $3 on, as purgeRequestIDsSQL does request ids.
const purgeTombstonesSQL = `
WITH expired AS (
    SELECT ctid, updated_at FROM properties
    WHERE deleted AND updated_at < now() - make_interval(secs => $1)
      AND updated_at >= $3
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM properties p USING expired e WHERE p.ctid = e.ctid
    RETURNING e.updated_at
)
SELECT count(*), max(updated_at) FROM gone`

// oldestRequestIDSQL reads the oldest request id kept (an index's first
// entry).
const oldestRequestIDSQL = `SELECT min(processed_at) FROM processed_requests`

// round purges everything expired, batch after batch, unless another
// instance of the region is purging. The round holds the region's purge
// lock from its first batch to its last, on a connection of its own: one
// instance purges at a time however many run (two taking turns batch by
// batch would purge twice as fast and weigh twice as much on the writes),
// and an instance that dies mid-round lets go of the lock with its
// connection.
func (p *purger) round(ctx context.Context) error {
	conn, err := p.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("purge: %w", err)
	}
	defer conn.Close()
	var locked bool
	if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1)`, purgeLockKey).Scan(&locked); err != nil {
		return fmt.Errorf("purge lock: %w", err)
	}
	if !locked {
		return nil
	}
	defer releasePurge(conn)
	// The round's batches commit without waiting for their WAL to reach
	// the disk: a purge lost in a crash is done again by the next round,
	// and its writes reach the disk with the next write's commit. Set for
	// the connection (each batch is one statement, its own transaction: one
	// round trip), and reset before the connection goes back to the pool.
	if _, err := conn.ExecContext(ctx, `SET synchronous_commit = off`); err != nil {
		return fmt.Errorf("purge: %w", err)
	}
	for _, job := range []struct {
		query   string
		counter *atomic.Int64
	}{{purgeRequestIDsSQL, &p.requestIDs}, {purgeTombstonesSQL, &p.tombstones}} {
		var from time.Time // where the next batch starts: at first, the start
		for {
			began := time.Now()
			n, newest, err := p.batch(ctx, conn, job.query, from)
			if err != nil {
				return err
			}
			from = newest
			job.counter.Add(n)
			if n < int64(p.batchSize) || !sleep(ctx, max(purgePause, purgeRest*time.Since(began))) {
				break
			}
		}
	}
	var oldest sql.NullTime
	if err := conn.QueryRowContext(ctx, oldestRequestIDSQL).Scan(&oldest); err != nil {
		return fmt.Errorf("oldest request id: %w", err)
	}
	if oldest.Valid {
		t := oldest.Time.UTC()
		p.oldest.Store(&t)
	}
	return nil
}

// releasePurge puts the round's connection back as the pool gave it:
// synchronous_commit reset, the purge lock let go. A connection that
// cannot be put back so is closed instead (a driver.ErrBadConn from Raw
// discards it): a pooled connection must neither keep the lock nor commit
// a client's write without waiting for the disk.
func releasePurge(conn *sql.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := conn.ExecContext(ctx, `RESET synchronous_commit`)
	if err == nil {
		_, err = conn.ExecContext(ctx, `SELECT pg_advisory_unlock($1)`, purgeLockKey)
	}
	if err != nil {
		conn.Raw(func(any) error { return driver.ErrBadConn })
	}
}

// batch runs one purge statement, a transaction of its own, from the
// time from on, and returns how many rows it deleted and the time of the
// newest.
func (p *purger) batch(ctx context.Context, conn *sql.Conn, query string, from time.Time) (int64, time.Time, error) {
	var n int64
	var newest sql.NullTime
	if err := conn.QueryRowContext(ctx, query, p.retention.Seconds(), p.batchSize, from).Scan(&n, &newest); err != nil {
		return 0, from, fmt.Errorf("purge: %w", err)
	}
	if newest.Valid { // NULL when the batch deleted nothing
		from = newest.Time
	}
	return n, from, nil
}
