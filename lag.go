package main

// Replication lag: how far this region's copy of the other region's writes
// trails behind.
//
// "Time since the last message" would be wrong twice over: it grows on an
// idle, healthy link, and it stays small while old messages trickle in. What
// matters is the oldest peer write that has not arrived yet. The peer's relay
// tells us, with heartbeats: it publishes to every partition "every write of
// mine that carries a time before W is in Kafka, ahead of this record". When
// our consumer has applied a heartbeat, every peer write before W has been
// applied here too. So:
//
//	lag = now − W, where W is the smallest watermark over the partitions
//
// The promise is only as good as W, and W must allow for writes that are
// still on their way into the peer's outbox: a PUT stamps its row with the
// time its transaction started, and may commit later. So W is the relay
// transaction's start, or the start of an older transaction still in
// progress, or, when the relay is behind, the time of the oldest event it
// has not published yet (relay.go, lockRelayWatermarkSQL).
//
// The peer sends heartbeats four times a second while it writes, and every
// few seconds while it does not (relay.go). A report that would read more
// than a quarter of a second asks for a fresh one first: our relay sends a
// heartbeat that asks (heartbeat.Ask), the peer's relay answers at once, and
// the report waits for the answer, a round trip through Kafka (awaitPeer).
// So an idle, healthy link reports about 0 whenever it is read, for the cost
// of a heartbeat each way per reading. When the peer's writes cannot arrive
// (Kafka down, the peer's relay or database stopped, our consumer stopped),
// no answer comes, no heartbeat is applied and the lag grows in real time.
// When they can again, the backlog is applied, the next heartbeat lands, and
// the lag drops back to about 0.
//
// W is a time of the peer's clock and now one of ours, and the two clocks
// may disagree (by up to a second, maxClockSkew): a peer clock ahead would
// make the lag read low, which it must never do. So W is moved into our
// clock by the echo. Each peer heartbeat also carries Seen, our own
// watermark as the peer had applied it, and Sent, when the peer read it (its
// clock): Seen happened before Sent, so Seen − Sent is at most our clock
// minus the peer's, and W + (Seen − Sent) is no later, in our clock, than W
// really was. With it:
//
//	lag = now − min(W + Seen − Sent)
//
// which never understates, whatever the clocks say, and overstates by the
// echo's trip (our heartbeat to the peer, the peer's next round): about one
// heartbeat interval on a healthy link. Without an echo yet (the first
// moments after a start, or a peer relay that sends none), the lag is
// now − W plus maxClockSkew, and never more than that either way: an echo
// gone stale (our own heartbeats not reaching the peer) cannot make it read
// more than the clocks could be wrong by. A watermark more than
// maxClockSkew ahead is clamped, so that a skewed or forged clock cannot
// hold the lag at 0.

import (
	"context"
	"database/sql"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// LagReport is the body of GET /{region}/replication-lag.
type LagReport struct {
	// LagSeconds is now minus the peer watermark: how old the oldest peer
	// write is that may not have been applied here yet.
	LagSeconds float64 `json:"lag_seconds"`
	Region     string  `json:"region"`
	PeerRegion string  `json:"peer_region"`
	// PeerWatermark is the peer time up to which all its writes are applied
	// here; null until the first heartbeat of every partition arrived.
	PeerWatermark *time.Time `json:"peer_watermark"`
	// RecordsBehind is how many records of the topic this region's consumer
	// has yet to read, as of its last fetch.
	RecordsBehind int64 `json:"records_behind"`
	// OutboxBacklog is how many local writes wait to be published (at
	// most: see readLagSQL), and OldestOutboxSeconds how long the oldest of
	// them has waited.
	OutboxBacklog       int64   `json:"outbox_backlog"`
	OldestOutboxSeconds float64 `json:"oldest_outbox_seconds"`
	// LastAppliedAt is when a peer write last changed a row here.
	LastAppliedAt *time.Time `json:"last_applied_at"`
	// Counters since this process started: peer writes applied, concurrent
	// writes resolved by the conflict rule (one of each pair lost), old
	// events ignored, and records sent to the dead-letter queue: those that
	// could not be decoded and those the database refused (apply.go).
	Applied   int64 `json:"applied"`
	Conflicts int64 `json:"conflicts"`
	// LostWrites counts the acknowledged writes this region found lost and
	// recorded at GET /{region}/conflicts.
	LostWrites int64 `json:"lost_writes"`
	// Replays counts requests written in both regions under one request id
	// (a retry replayed in the other region before the first write arrived
	// there): one write kept, and no conflict, since both were one request.
	Replays     int64 `json:"replays"`
	StaleEvents int64 `json:"stale_events"`
	// ExpiredEvents counts events older than RETENTION for a listing this
	// region holds no row of: not applied, but sent to the dead-letter
	// queue (retention.go). They are in DeadLettered too.
	ExpiredEvents int64 `json:"expired_events"`
	DeadLettered  int64 `json:"dead_lettered"`
	// ReplicationStopped says why this region stopped applying the other
	// region's writes, when it did: the broker no longer holds events it
	// needs, until the region has rejoined (rejoin.go). Absent while
	// replication runs.
	ReplicationStopped string `json:"replication_stopped,omitempty"`
	// Rejoining is the region's state while it is not serving: checking,
	// or rejoining from its peer, with the progress (rejoin.go). Absent
	// while it serves.
	Rejoining *rejoinStatus `json:"rejoining,omitempty"`
}

// replicationStats are the consumer's counters, which the lag report shows.
// The consumer writes them (consume.go) and any request may read them.
type replicationStats struct {
	applied      atomic.Int64
	conflicts    atomic.Int64
	replays      atomic.Int64
	stale        atomic.Int64
	expired      atomic.Int64 // events not applied for their age (retention.go)
	lostWrites   atomic.Int64 // acknowledged writes found lost and recorded (conflict.go)
	deadLettered atomic.Int64
	lastApplied  atomic.Pointer[time.Time]
	// stopped is why replication stopped for good (consumer.stop); nil
	// while it runs.
	stopped atomic.Pointer[string]

	mu     sync.Mutex
	behind map[int32]int64 // records not yet consumed, by partition
}

// setBehind records how many records of partition p are left to read.
func (s *replicationStats) setBehind(p int32, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.behind == nil {
		s.behind = map[int32]int64{}
	}
	s.behind[p] = n
}

// forgetBehind drops the figures of partitions this instance no longer
// reads: another instance of the region reports them now.
func (s *replicationStats) forgetBehind(partitions []int32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range partitions {
		delete(s.behind, p)
	}
}

// recordsBehind is the total of records the consumer has yet to read.
func (s *replicationStats) recordsBehind() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, b := range s.behind {
		n += b
	}
	return n
}

// readLagSQL reads the peer's watermark: the smallest over the partitions, and
// only if every partition has one (a partition never heard from could hide any
// amount of lag), and the same in this database's clock by the echo (see
// above), if every partition has an echo. It also reads the outbox backlog,
// and the clock, so that both sides of the subtraction come from database
// clocks. An echo read before this database last started is not used:
// its clock may have been set since (the fault campaign's clock faults
// restart the database with a shifted clock), and the bound with it. Every
// part costs O(log n) in the outbox's size (its primary key and its created_at index):
// the backlog is the span of its seqs, which counts a sequence value a
// rolled-back write took as if it waited too, so it may read a little high,
// never low, and it reads 0 exactly when the outbox is empty.
const readLagSQL = `
SELECT
    (SELECT CASE WHEN count(*) > 0 AND count(*) >= max(partitions) THEN min(watermark) END
     FROM replication_watermarks WHERE peer_region = $1),
    (SELECT CASE WHEN count(echo_bound) > 0 AND count(echo_bound) >= max(partitions)
                      AND min(echo_seen) >= pg_postmaster_start_time()
                 THEN min(echo_bound) END
     FROM replication_watermarks WHERE peer_region = $1),
    (SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM outbox),
    (SELECT min(created_at) FROM outbox),
    clock_timestamp()`

// peerCaughtUpSQL reads whether the peer ($1) has sent, in every partition,
// a heartbeat that echoes this region's own watermark at or past $2, a time
// of this database's clock, and whether this region has applied them.
const peerCaughtUpSQL = `
SELECT coalesce(CASE WHEN count(seen) > 0 AND count(seen) >= max(partitions) THEN min(seen) >= $2 END, false)
FROM replication_watermarks WHERE peer_region = $1`

// reportInterval is how often a backend reads its lag report at most,
// whatever the request rate: GET /{region}/replication-lag is public, and
// /metrics asks for it too.
const reportInterval = 100 * time.Millisecond

// askWait is how long a lag report waits for the peer to answer its ask
// (awaitPeer). A healthy link answers in a few tens of milliseconds.
const askWait = 300 * time.Millisecond

// sharedReport reads the lag report at most once per reportInterval, on the
// pool of requests (never the replication pool, which it would compete
// with), one read shared by every caller that asks while it is in flight.
type sharedReport struct {
	// read reads the report; lag is what the last report read said, plus
	// its age (an upper bound of the lag now).
	read func(ctx context.Context, lag time.Duration) (LagReport, error)

	mu       sync.Mutex
	report   LagReport
	err      error
	at       time.Time     // when the last read ended; zero before the first
	inflight chan struct{} // closed when the read in flight ends; nil when none is
}

// get answers the last report if it is younger than reportInterval, else
// waits for the read in flight or starts one. A report read earlier is
// served with its age added to its lag: the lag grows at most as fast as
// time passes, so that stays an upper bound, and the report never reads
// low for having been kept.
func (s *sharedReport) get(ctx context.Context) (LagReport, error) {
	s.mu.Lock()
	for s.at.IsZero() || time.Since(s.at) >= reportInterval {
		if s.inflight == nil {
			return s.readNow(ctx) // unlocks s.mu
		}
		wait := s.inflight
		s.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return LagReport{}, ctx.Err()
		}
		s.mu.Lock()
	}
	rep, err, age := s.report, s.err, time.Since(s.at)
	s.mu.Unlock()
	if err != nil {
		return LagReport{}, err
	}
	rep.LagSeconds += age.Seconds()
	if rep.OldestOutboxSeconds > 0 {
		rep.OldestOutboxSeconds += age.Seconds()
	}
	return rep, nil
}

// readNow reads the report for everybody, called with s.mu held and no
// read in flight; it unlocks s.mu. The read does not end with the caller
// who started it: others may be waiting on it.
func (s *sharedReport) readNow(ctx context.Context) (LagReport, error) {
	done := make(chan struct{})
	s.inflight = done
	lag := time.Duration(math.MaxInt64)
	if !s.at.IsZero() && s.err == nil {
		lag = time.Duration(s.report.LagSeconds*float64(time.Second)) + time.Since(s.at)
	}
	s.mu.Unlock()
	readCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout)
	rep, err := s.read(readCtx, lag)
	cancel()
	s.mu.Lock()
	s.report, s.err, s.at, s.inflight = rep, err, time.Now(), nil
	s.mu.Unlock()
	close(done)
	return rep, err
}

// awaitPeer asks the peer for a heartbeat (ask) and waits, for at most
// wait, until every write of peer whose transaction began before now is
// applied here, and answers errCannotTell if that does not happen.
//
// "Before now" is judged without comparing two clocks. Now is this
// database's clock. This region's relay stamps its heartbeats with
// watermarks of that clock, never later than the moment it sends them; the
// peer's relay echoes the one it has applied in each of its own heartbeats
// (heartbeat.Seen), read in the same statement as its own watermark. So a
// peer heartbeat that echoes a watermark at or past now was sent after now,
// and it vouches for every write the peer began before it was sent (lag.go,
// above). It takes a round trip through Kafka: our heartbeat, asked for
// after now was read, reaches the peer, and the peer's answer comes back.
// Our heartbeat's watermark may still be before now, if a write here was
// in progress then: the ask is repeated every askAgain while waiting.
// Whatever the peer's clock says, a skewed one can only make the lag read
// wrong, never this answer.
func awaitPeer(ctx context.Context, db *sql.DB, peer string, wait time.Duration, ask func()) error {
	deadline := time.Now().Add(wait)
	var now time.Time
	if err := db.QueryRowContext(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
		return fmt.Errorf("peer watermark: %w", err)
	}
	ask()
	asked := time.Now()
	for {
		var caughtUp bool
		if err := db.QueryRowContext(ctx, peerCaughtUpSQL, peer, now).Scan(&caughtUp); err != nil {
			return fmt.Errorf("peer watermark: %w", err)
		}
		if caughtUp {
			return nil
		}
		if time.Now().After(deadline) {
			return errCannotTell
		}
		if time.Since(asked) >= askAgain {
			ask()
			asked = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(min(askPoll, time.Until(deadline)+time.Millisecond)):
		}
	}
}

// askPoll is how often a waiter reads whether the peer answered, and
// askAgain how often it asks again while no answer satisfies it.
const (
	askPoll  = 10 * time.Millisecond
	askAgain = 100 * time.Millisecond
)

// readLag builds region's report from its database and its consumer's
// counters. since is when the region started waiting for its peer: without
// any watermark yet, the lag is the time since then.
func readLag(ctx context.Context, db *sql.DB, region string, since time.Time, stats *replicationStats) (LagReport, error) {
	var (
		watermark, echoed, oldest sql.NullTime
		now                       time.Time
	)
	rep := LagReport{Region: region, PeerRegion: peerOf(region)}
	err := db.QueryRowContext(ctx, readLagSQL, rep.PeerRegion).Scan(&watermark, &echoed, &rep.OutboxBacklog, &oldest, &now)
	if err != nil {
		return LagReport{}, fmt.Errorf("replication lag: %w", err)
	}
	lag := now.Sub(since)
	if watermark.Valid {
		w := watermark.Time.UTC()
		rep.PeerWatermark = &w
		lag = now.Sub(w) + maxClockSkew
		if echoed.Valid {
			lag = min(lag, now.Sub(echoed.Time))
		}
	}
	rep.LagSeconds = max(lag.Seconds(), 0)
	if oldest.Valid {
		rep.OldestOutboxSeconds = max(now.Sub(oldest.Time).Seconds(), 0)
	}
	if t := stats.lastApplied.Load(); t != nil {
		u := t.UTC()
		rep.LastAppliedAt = &u
	}
	rep.RecordsBehind = stats.recordsBehind()
	rep.Applied = stats.applied.Load()
	rep.Conflicts = stats.conflicts.Load()
	rep.LostWrites = stats.lostWrites.Load()
	rep.Replays = stats.replays.Load()
	rep.StaleEvents = stats.stale.Load()
	rep.ExpiredEvents = stats.expired.Load()
	rep.DeadLettered = stats.deadLettered.Load()
	if r := stats.stopped.Load(); r != nil {
		rep.ReplicationStopped = *r
	}
	return rep, nil
}

// maxClockSkew is how far ahead of this region's clock a peer watermark may
// be. The regions' clocks are kept in step (NTP); a watermark further ahead
// comes from a skewed or forged clock.
const maxClockSkew = time.Second
