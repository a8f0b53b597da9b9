package main

// Retention: request ids, tombstones and conflict records are kept for
// RETENTION, then purged.
//
// Request ids and tombstones exist for replication's sake. A request id lets
// a retry, in either region, be recognised (idempotency.go); a tombstone
// keeps a deleted listing from coming back by an older event (conflict.go).
// Neither is needed once no event that could meet it can still arrive. Kept
// forever, at a thousand writes a second, they would add 86 million rows a
// day.
//
// Age alone does not say that no such event can still arrive: an event may
// wait in the other region's outbox through a week-long cut-off, and Kafka
// keeps whole segments, up to retention.ms + segment.ms. So a row is purged
// when it is older than RETENTION AND replication has moved past it in both
// directions (purgeCutoffsSQL):
//
//   - a row stamped by this region's clock (a request record's processed_at,
//     a tombstone this region wrote) once the other region has sent, in every
//     partition, a heartbeat echoing a watermark of this region's past it
//     (heartbeat.Seen): the other region had applied everything this region
//     began before that time, the tombstone included, so it writes nothing
//     on that listing any more; and everything it began before sending the
//     heartbeat has been applied here;
//   - a tombstone the other region wrote, once this region's watermark of
//     the other region (its clock) is past it: every write the other region
//     began before it has been applied here.
//
// While the other region is away, nothing of the time since it left is
// purged. And the topic's settings are read again at every round: if
// RETENTION is not longer than what the topic may keep, the purge pauses,
// saying so in the log (at error level) and in the metrics, and the region
// goes on serving; the setting can be fixed while it runs.
//
// An event that arrives older than RETENTION for a listing this region holds
// no row of cannot be told from one whose tombstone was purged. It is not
// applied: it goes to the dead-letter queue with the reason, and is counted
// and logged (apply.go).
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
	// defaultRetention is RETENTION's default: a day longer than the topic
	// may keep an event (topicRetention + topicSegment), so that an event
	// published just before a record's expiry has a day to be delivered.
	defaultRetention = topicRetention + topicSegment + 24*time.Hour
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

// unsafeRetention says why a retention is too short for what the topic
// may keep (keeps < 0: forever), or "" if it is not.
func unsafeRetention(retention, keeps time.Duration) string {
	if keeps < 0 || retention <= keeps {
		kept := "forever"
		if keeps >= 0 {
			kept = keeps.String()
		}
		return fmt.Sprintf("RETENTION %v is not longer than the topic may keep an event (retention.ms + segment.ms: %s): "+
			"an event Kafka still holds could find its request id or tombstone gone; the purge waits until one of them changes", retention, kept)
	}
	return ""
}

// purgeStats is what the purge has done, for the metrics.
type purgeStats struct {
	RequestIDs, Tombstones, Conflicts int64     // rows purged since the process started
	OldestRequestID                   time.Time // processed_at of the oldest request id kept; zero if none
	// Paused says why the purge does not run, when a setting makes it
	// unsafe; "" while it runs.
	Paused string
}

// purger deletes expired request ids and tombstones of one region.
type purger struct {
	logger    *slog.Logger
	db        *sql.DB
	region    string
	retention time.Duration
	// keeps reads how long the topic may keep an event (negative:
	// forever), at every round: the setting may change while the service
	// runs.
	keeps     func(context.Context) (time.Duration, error)
	batchSize int // rows per transaction, purgeBatch

	requestIDs, tombstones, conflicts atomic.Int64
	oldest                            atomic.Pointer[time.Time]
	paused                            atomic.Pointer[string]
	// soon asks for a round at once (wake).
	soon chan struct{}
}

func newPurger(logger *slog.Logger, db *sql.DB, region string, retention time.Duration, keeps func(context.Context) (time.Duration, error)) *purger {
	return &purger{logger: logger, db: db, region: region, retention: retention, keeps: keeps, batchSize: purgeBatch, soon: make(chan struct{}, 1)}
}

// wake asks for a round at once. A region that rejoined from a database
// restored from a backup holds request ids and tombstones that the other
// region purged since the backup (a copy only adds or replaces): its own
// purge deletes them (rejoin.go). It never blocks.
func (p *purger) wake() {
	select {
	case p.soon <- struct{}{}:
	default:
	}
}

// stats returns what the purge has done so far.
func (p *purger) stats() purgeStats {
	s := purgeStats{RequestIDs: p.requestIDs.Load(), Tombstones: p.tombstones.Load(), Conflicts: p.conflicts.Load()}
	if t := p.oldest.Load(); t != nil {
		s.OldestRequestID = *t
	}
	if why := p.paused.Load(); why != nil {
		s.Paused = *why
	}
	return s
}

// safe reads the topic's settings and reports whether the purge may run:
// it pauses, with an error in the log when it starts to, while RETENTION is
// not longer than what the topic may keep.
func (p *purger) safe(ctx context.Context) (bool, error) {
	keeps, err := p.keeps(ctx)
	if err != nil {
		return false, fmt.Errorf("purge: read the topic's retention: %w", err)
	}
	why := unsafeRetention(p.retention, keeps)
	if why == "" {
		if p.paused.Swap(nil) != nil {
			p.logger.Info("purge: the topic's retention is safe again; purging")
		}
		return true, nil
	}
	if old := p.paused.Swap(&why); old == nil || *old != why {
		p.logger.Error("purge: paused", "reason", why)
	}
	return false, nil
}

// run purges every purgeInterval until ctx is cancelled.
func (p *purger) run(ctx context.Context) {
	for {
		if err := p.round(ctx); err != nil && ctx.Err() == nil {
			p.logger.Warn("purge failed; it tries again", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-p.soon:
		case <-time.After(purgeInterval):
		}
	}
}

// purgeRequestIDsSQL deletes a batch of expired request ids ($1 the
// retention in seconds, $2 the batch size), oldest first from $3 on,
// skipping rows a write holds and those whose event may still wait in the
// outbox: a write stamps its record and its event with one transaction's
// now(), so a record older than the oldest event waiting has none there.
// That is one look-up in the outbox's created_at index, not a search of
// the outbox per row (a sequential scan, longest when the outbox is
// longest: during a Kafka outage), and returns how many it deleted and the newest of them. A round
// starts each batch where the last one stopped: the index entries of rows
// just deleted stay until a vacuum, and a batch that began at the index's
// start would walk over all of them, ever more as a backlog is purged. A
// row passed over (locked, or waiting in the outbox) is the next round's.
// The rows are deleted by their place in the table (ctid), which the
// locking read found them at and a locked row keeps: no second walk down
// the primary key for each.
//
// $4 is how far replication has moved past this region's clock
// (purgeCutoffsSQL); NULL purges nothing.
const purgeRequestIDsSQL = `
WITH expired AS (
    SELECT ctid, processed_at FROM processed_requests r
    WHERE processed_at < now() - make_interval(secs => $1)
      AND processed_at < $4
      AND processed_at >= $3
      AND processed_at < coalesce((SELECT min(created_at) FROM outbox), 'infinity')
    ORDER BY processed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM processed_requests r USING expired e WHERE r.ctid = e.ctid
    RETURNING e.processed_at
)
SELECT count(*), max(processed_at) FROM gone`

// purgeTombstonesSQL deletes a batch of expired tombstones, oldest first
// from $3 on, as purgeRequestIDsSQL does request ids. A tombstone this
// region ($5) wrote carries its clock, and waits for $4 as a request id
// does; one the other region wrote carries the other's clock, and waits for
// this region's watermark of it ($6).
const purgeTombstonesSQL = `
WITH expired AS (
    SELECT ctid, updated_at FROM properties
    WHERE deleted AND updated_at < now() - make_interval(secs => $1)
      AND CASE WHEN region_origin = $5 THEN updated_at < $4 ELSE updated_at < $6 END
      AND updated_at >= $3
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM properties p USING expired e WHERE p.ctid = e.ctid
    RETURNING e.updated_at
)
SELECT count(*), max(updated_at) FROM gone`

// purgeConflictsSQL deletes a batch of conflict records found more than
// the retention ago, oldest first from $3 on. Nothing can revive them, so
// they wait for no replication.
const purgeConflictsSQL = `
WITH expired AS (
    SELECT ctid, found_at FROM conflicts
    WHERE found_at < now() - make_interval(secs => $1)
      AND found_at >= $3
    ORDER BY found_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM conflicts c USING expired e WHERE c.ctid = e.ctid
    RETURNING e.found_at
)
SELECT count(*), max(found_at) FROM gone`

// oldestRequestIDSQL reads the oldest request id kept (an index's first
// entry).
const oldestRequestIDSQL = `SELECT min(processed_at) FROM processed_requests`

// purgeCutoffsSQL reads how far replication has moved past each region's
// clock, as this region knows it (see the top of this file), for the other
// region $1: the echo of this region's watermark in the other's heartbeats,
// and this region's watermark of the other; each only if every partition
// has one, else NULL, which purges nothing.
const purgeCutoffsSQL = `
SELECT CASE WHEN count(seen) > 0 AND count(seen) >= max(partitions) THEN min(seen) END,
       CASE WHEN count(*) > 0 AND count(*) >= max(partitions) THEN min(watermark) END
FROM replication_watermarks WHERE peer_region = $1`

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
	if ok, err := p.safe(ctx); !ok {
		return err
	}
	var own, peer sql.NullTime
	if err := conn.QueryRowContext(ctx, purgeCutoffsSQL, peerOf(p.region)).Scan(&own, &peer); err != nil {
		return fmt.Errorf("purge: replication's progress: %w", err)
	}
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
	}{{purgeRequestIDsSQL, &p.requestIDs}, {purgeTombstonesSQL, &p.tombstones}, {purgeConflictsSQL, &p.conflicts}} {
		var from time.Time // where the next batch starts: at first, the start
		for {
			began := time.Now()
			n, newest, err := p.batch(ctx, conn, job.query, from, own, peer)
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
// time from on, as far as replication's progress allows (own, peer: see
// purgeCutoffsSQL), and returns how many rows it deleted and the time of the
// newest.
func (p *purger) batch(ctx context.Context, conn *sql.Conn, query string, from time.Time, own, peer sql.NullTime) (int64, time.Time, error) {
	args := []any{p.retention.Seconds(), p.batchSize, from}
	switch query {
	case purgeRequestIDsSQL:
		args = append(args, own)
	case purgeTombstonesSQL:
		args = append(args, own, p.region, peer)
	}
	var n int64
	var newest sql.NullTime
	if err := conn.QueryRowContext(ctx, query, args...).Scan(&n, &newest); err != nil {
		return 0, from, fmt.Errorf("purge: %w", err)
	}
	if newest.Valid { // NULL when the batch deleted nothing
		from = newest.Time
	}
	return n, from, nil
}
