package main

// The consumer: the other region's writes, from Kafka into this region's
// database. It reads the topic in its own region's consumer group, skips the
// records its own region produced, and hands the rest to apply.go: the
// peer's events by the conflict rule (conflict.go) and its heartbeats as
// watermarks (lag.go), all of one poll in one transaction, together with
// where the region now stands in each partition: the offset of the next
// record to read.
//
// That position lives in the region's own database, never only in Kafka. A
// consumer group without committed offsets (a group never used, one whose
// offsets Kafka expired after offsets.retention.minutes, or a partition
// added to the topic) would otherwise start wherever the client's reset
// policy says, and a start at the end of the log skips every event in
// between without a word. Written in the apply transaction, the position is
// exactly as old as the rows: a crash before the commit re-delivers the
// batch, which changes nothing the second time, and a database restored
// from a backup goes back to read what it lost. On assignment the consumer
// seeks to the stored position; a partition with none is read from its
// oldest retained record; a stored position the broker no longer holds is
// a loud stop (eventsLost), never a jump to what is left, until the region
// has rejoined from a snapshot of the peer (rejoin.go).
//
// The dead-letter topic (the replication topic's name + ".dlq") is where a
// record goes that cannot be applied, with the reason, so that one bad
// record neither stops replication nor vanishes: a record that cannot be
// decoded or breaks the rules (decodeMessage), and an event the database
// refuses for what it holds, after maxRefusals tries (apply.go). A database
// that does not answer is an outage, not a bad record: the same batch is
// retried with backoff, and nothing is ever skipped.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// consumeBatchSize bounds the records of one poll, which are applied in one
// transaction.
const consumeBatchSize = 500

// applyAttemptTimeout bounds one attempt to write a batch's dead letters or
// to apply it. An attempt that runs out is retried.
const applyAttemptTimeout = 5 * time.Second

// consumer applies the peer region's records to this region's database.
type consumer struct {
	logger   *slog.Logger
	db       *sql.DB
	client   *kgo.Client
	producer *kgo.Client // writes dead letters
	region   string
	peer     string
	topic    string
	dlqTopic string
	started  time.Time // when this region started waiting for its peer
	// retention is RETENTION: an older write for a listing with no row
	// here is not applied (retention.go).
	retention time.Duration
	// declared is the most partitions the peer's heartbeats have declared
	// as this consumer knows (commit); only the consumer's goroutine uses it.
	declared int32
	// outboxSeq is this region's outbox sequence as last read
	// (behindOwnPublished). Only the consumer's goroutine uses it.
	outboxSeq int64
	// ahead is what the last committed batch found: partitions whose stored
	// position a rejoin moved past the batch (savePositions); the consumer
	// goes on from there. Only the consumer's goroutine uses it.
	ahead map[int32]int64
	// dbStarted is when the database the last batch was applied to had
	// started (checkPositions). Only the consumer's goroutine uses it.
	dbStarted time.Time
	// answer has this region's relay send a heartbeat at once, when a peer
	// heartbeat asked for one (relay.go).
	answer func()

	stats replicationStats
}

// newConsumer creates region's consumer of topic. It does not connect.
func newConsumer(logger *slog.Logger, db *sql.DB, producer *kgo.Client, region string, brokers []string, topic, dlqTopic string, retention time.Duration) (*consumer, error) {
	c := &consumer{
		retention: retention,
		logger:    logger,
		db:        db,
		producer:  producer,
		region:    region,
		peer:      peerOf(region),
		topic:     topic,
		dlqTopic:  dlqTopic,
		started:   time.Now(),
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		// One group per region: each region reads every event once, and
		// the group spreads the partitions over the region's instances.
		kgo.ConsumerGroup("property-replicator-"+region),
		kgo.ConsumeTopics(topic),
		// Where to start is the region's database's to say (positions), not
		// the group's committed offsets: see the top of this file.
		kgo.AdjustFetchOffsetsFn(c.positions),
		// What the client falls back to is the oldest retained record
		// (AtStart: NoResetOffset alone means the END in franz-go v1.22,
		// whatever its comment says). NoReset: an offset the broker no
		// longer holds is an error (eventsLost), not a jump to what it has.
		kgo.ConsumeResetOffset(kgo.NoResetOffset().AtStart()),
		// Nothing is committed to Kafka: the position is in the database.
		kgo.DisableAutoCommit(),
		// No rebalance while a batch is being applied: its partitions cannot
		// move to another instance in the middle of it.
		kgo.BlockRebalanceOnPoll(),
		// A partition that moves to another instance takes its backlog
		// figure with it.
		kgo.OnPartitionsRevoked(c.forget),
		kgo.OnPartitionsLost(c.forget),
		kgo.FetchMaxWait(time.Second),
		// A partition added to the topic is noticed within this time.
		kgo.MetadataMaxAge(metadataMaxAge),
		// A crashed instance leaves the group only when its session times
		// out; until then its partitions are not consumed. 10s rather than
		// the default 45s bounds that pause.
		kgo.SessionTimeout(10*time.Second),
		kgo.HeartbeatInterval(time.Second),
	)
	if err != nil {
		return nil, fmt.Errorf("kafka consumer: %w", err)
	}
	c.client = client
	return c, nil
}

// readPositionsSQL reads where this region stands in the given partitions.
const readPositionsSQL = `
SELECT partition, next_offset FROM replication_positions
WHERE topic = $1 AND partition = ANY($2)`

// positions replaces the offsets the group would start the newly assigned
// partitions at with the positions stored in the database: the next record
// after the last one applied, or the oldest retained record where there is
// none. While the database does not answer it retries, until the assignment
// is revoked (ctx).
func (c *consumer) positions(ctx context.Context, assigned map[string]map[int32]kgo.Offset) (map[string]map[int32]kgo.Offset, error) {
	for topic, offsets := range assigned {
		var partitions []int32
		for p := range offsets {
			partitions = append(partitions, p)
		}
		stored := map[int32]int64{}
		ok := c.retry(ctx, "read positions", false, func(ctx context.Context) error {
			rows, err := c.db.QueryContext(ctx, readPositionsSQL, topic, partitions)
			if err != nil {
				return err
			}
			defer rows.Close()
			for rows.Next() {
				var p int32
				var next int64
				if err := rows.Scan(&p, &next); err != nil {
					return err
				}
				stored[p] = next
			}
			return rows.Err()
		})
		if !ok {
			return nil, ctx.Err()
		}
		for p := range offsets {
			if next, ok := stored[p]; ok {
				offsets[p] = kgo.NoResetOffset().At(next)
			} else {
				offsets[p] = kgo.NoResetOffset().AtStart()
			}
		}
		c.logger.Info("consume: partitions assigned", "topic", topic, "stored_positions", stored, "partitions", partitions)
	}
	return assigned, nil
}

// forget drops the backlog figures of partitions this instance no longer
// reads.
func (c *consumer) forget(_ context.Context, _ *kgo.Client, revoked map[string][]int32) {
	for _, partitions := range revoked {
		c.stats.forgetBehind(partitions)
	}
}

// run applies the peer region's records from a topic of the given partition
// count until ctx is cancelled.
func (c *consumer) run(ctx context.Context, partitions int32) {
	for {
		fetches := c.client.PollRecords(ctx, consumeBatchSize)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			return
		}
		fetchErrors := 0
		var lost []int32
		fetches.EachError(func(topic string, partition int32, err error) {
			fetchErrors++
			if eventsLost(err) {
				c.stop(fmt.Sprintf("events lost: partition %d of %s no longer holds the next event this region needs (%v); "+
					"this region rejoins from the other one", partition, topic, err))
				lost = append(lost, partition)
				return
			}
			c.logger.Warn("consume: fetch error", "topic", topic, "partition", partition, "err", err)
		})
		records := fetches.Records()
		if len(lost) > 0 {
			// Nothing of this poll is applied and no position moves: the
			// region stays where the loss was found until a snapshot of
			// the peer has brought what the broker lost.
			for _, rec := range records {
				lost = append(lost, rec.Partition)
			}
			if !c.rejoinForLostEvents(ctx, lost) {
				return
			}
			c.client.AllowRebalance()
			continue
		}
		if fetchErrors > 0 && len(records) == 0 {
			// The client retries by itself; do not spin on a failing broker.
			if !sleep(ctx, maxBackoff) {
				return
			}
		}
		if len(records) > 0 {
			if !c.handle(ctx, records, partitions) {
				return // stopping: the batch is not applied and its position not moved
			}
		}
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) > 0 {
				last := p.Records[len(p.Records)-1].Offset
				c.stats.setBehind(p.Partition, max(p.HighWatermark-last-1, 0))
			}
		})
		c.client.AllowRebalance()
	}
}

// eventsLost reports whether a fetch error means the broker lost events this
// region had not applied yet: the committed offset is no longer in the log
// (OffsetOutOfRange, which NoResetOffset hands back instead of resetting), or
// the log was cut back below what was consumed (ErrDataLoss).
func eventsLost(err error) bool {
	var dataLoss *kgo.ErrDataLoss
	return errors.Is(err, kerr.OffsetOutOfRange) || errors.As(err, &dataLoss)
}

// stop stops the consumer's work until the region has rejoined, with the
// reason: the lag report and /health's body show it meanwhile, and the log
// says it at error level. Skipping ahead would leave the regions different
// for ever without a word; stopping keeps the lag growing, which is the
// truth, until the rejoin brings what was lost.
func (c *consumer) stop(reason string) {
	if c.stats.stopped.CompareAndSwap(nil, &reason) {
		c.logger.Error("consume: replication stopped", "reason", reason)
	}
}

// rejoinForLostEvents makes the region rejoin (rejoin.go), waits until the
// rejoin has copied the peer's snapshot and moved the positions past what
// the broker lost, and reads the given partitions on from the positions
// stored then. It returns false if ctx is cancelled first.
func (c *consumer) rejoinForLostEvents(ctx context.Context, partitions []int32) bool {
	reason, requested := *c.stats.stopped.Load(), false
	for attempt := 0; ; attempt++ {
		if attempt > 0 && !sleep(ctx, backoff(attempt)) {
			return false
		}
		if !requested {
			requested = requestRejoin(ctx, c.db, reason, false) == nil
			continue
		}
		var snapshotting bool
		if err := c.db.QueryRowContext(ctx, `SELECT EXISTS (SELECT FROM rejoin WHERE phase <> 'log')`).Scan(&snapshotting); err != nil || snapshotting {
			continue
		}
		stored, err := storedPositions(ctx, c.db, c.topic)
		if err != nil {
			continue
		}
		to := map[int32]kgo.EpochOffset{}
		for _, p := range partitions {
			if next, ok := stored[p]; ok {
				to[p] = kgo.EpochOffset{Epoch: -1, Offset: next}
			}
		}
		c.client.SetOffsets(map[string]map[int32]kgo.EpochOffset{c.topic: to})
		c.stats.stopped.Store(nil)
		c.logger.Info("consume: the rejoin brought what the broker lost; reading on", "positions", to)
		return true
	}
}

// stoppedReason is why replication stopped, or "" while it runs.
func (c *consumer) stoppedReason() string {
	if r := c.stats.stopped.Load(); r != nil {
		return *r
	}
	return ""
}

// close leaves the consumer group within ctx and closes the client, so that
// another instance takes the partitions over at once rather than after the
// session timeout. The last polled batch may still block rebalancing
// (BlockRebalanceOnPoll) if the consumer stopped before applying it; that
// batch was not committed, so letting the partitions go is right. Leaving
// waits for a join in progress, which the broker may hold for a long time,
// hence the deadline. franz-go's documentation says Close is then
// immediate; with a silent broker it is not (it leaves the group again, and
// waits), so Close has the same deadline (replicator.close).
func (c *consumer) close(ctx context.Context) {
	c.client.AllowRebalance()
	if err := c.client.LeaveGroupContext(ctx); err != nil {
		c.logger.Warn("leave consumer group", "err", err)
	}
	if !returnsWithin(ctx, c.client.Close) {
		c.logger.Warn("close consumer: not closed in time; left to the exit")
	}
}

// mark is what the heartbeats of one partition in a batch say: the newest
// watermark, and the newest echo of this region's own (heartbeat.Seen).
type mark struct {
	watermark time.Time
	seen      *time.Time
	// bound is the latest echoing heartbeat's Watermark in this region's
	// clock, at its earliest (Watermark + Seen − Sent, all three from that
	// one heartbeat, so that a step of the peer's clock cancels out), and
	// echo the Seen it came from; nil without an echo (lag.go).
	bound, echo *time.Time
}

// batch is one poll's records, sorted out: the peer's events to apply (and
// the record each came in), the newest heartbeat mark per partition and
// the most partitions a heartbeat declared, the dead letters of the records
// that could not be decoded, and the position after the poll in each
// partition.
type batch struct {
	events     []event
	sources    []*kgo.Record
	watermarks map[int32]mark
	partitions int32
	dead       []*kgo.Record
	next       map[int32]int64
	// first is the offset of the batch's first record in each partition.
	first map[int32]int64
	// published is the highest outbox seq of the peer's events in each
	// partition, and ownPublished of this region's own (recordSeq).
	published    map[int32]int64
	ownPublished int64
	// asked is whether a peer heartbeat asked for one of this region's
	// (heartbeat.Ask).
	asked bool
}

// decodeRecords decodes one poll's records into a batch. Its own region's
// records are skipped without decoding: there is nothing to apply, and each
// region validates only what it applies. They still move the position.
func (c *consumer) decodeRecords(records []*kgo.Record) batch {
	b := batch{watermarks: map[int32]mark{}, next: map[int32]int64{}, first: map[int32]int64{}, published: map[int32]int64{}}
	for _, rec := range records {
		b.next[rec.Partition] = max(b.next[rec.Partition], rec.Offset+1)
		if first, ok := b.first[rec.Partition]; !ok || rec.Offset < first {
			b.first[rec.Partition] = rec.Offset
		}
		if header(rec, headerRegion) == c.region {
			// Only the seqs of this region's own events are read: a
			// database below one went back in time.
			b.ownPublished = max(b.ownPublished, recordSeq(rec))
			continue
		}
		m, err := decodeMessage(rec)
		switch {
		case err != nil:
			b.dead = append(b.dead, c.deadLetter(rec, err))
		case m.heartbeat != nil:
			if w := m.heartbeat.Watermark; w.After(time.Now().Add(maxClockSkew)) {
				c.logger.Warn("consume: a peer watermark from the future, clamped to now (a skewed or forged clock)",
					"watermark", w, "partition", rec.Partition)
			}
			mk := b.watermarks[rec.Partition]
			if w := m.heartbeat.Watermark; w.After(mk.watermark) {
				mk.watermark = w
			}
			if seen := m.heartbeat.Seen; seen != nil && (mk.seen == nil || seen.After(*mk.seen)) {
				mk.seen = seen
			}
			if seen, sent := m.heartbeat.Seen, m.heartbeat.Sent; seen != nil && sent != nil {
				// A partition's heartbeats come in order: the latest wins.
				b := m.heartbeat.Watermark.Add(seen.Sub(*sent))
				mk.bound, mk.echo = &b, seen
			}
			b.watermarks[rec.Partition] = mk
			b.partitions = max(b.partitions, m.heartbeat.Partitions)
			b.asked = b.asked || m.heartbeat.Ask
		case m.event != nil:
			b.events = append(b.events, *m.event)
			b.sources = append(b.sources, rec)
			b.published[rec.Partition] = max(b.published[rec.Partition], recordSeq(rec))
		}
	}
	return b
}

// handle applies one poll's records: the peer's events and heartbeats in one
// transaction, then the dead letters. Each step is retried with backoff
// while Kafka or the database is unreachable: consumption pauses, and no
// record is ever skipped. An event the database refuses for what it holds is
// tried maxRefusals times with its batch, and then goes to the dead-letter
// queue with the reason, alone. It returns false if ctx was cancelled first.
func (c *consumer) handle(ctx context.Context, records []*kgo.Record, partitions int32) bool {
	b := c.decodeRecords(records)
	if b.ownPublished > c.outboxSeq && !c.behindOwnPublished(ctx, b.ownPublished) {
		return false
	}
	var (
		outcomes []outcome
		lost     []lostWrite
	)
	refusals := 0
	var gap *positionGap
	ok := c.retry(ctx, "apply", true, func(ctx context.Context) error {
		var err error
		if refusals < maxRefusals {
			outcomes, lost, err = c.apply(ctx, b, partitions)
		} else {
			outcomes, lost, err = c.applyEach(ctx, &b, partitions)
		}
		if refusedByDatabase(err) {
			refusals++
		}
		if errors.As(err, &gap) {
			return nil // nothing applied: read again from where the database is
		}
		return err
	})
	if !ok {
		return false
	}
	if gap != nil {
		c.readAgain(gap)
		return true
	}
	c.stats.deadLettered.Add(int64(len(b.dead)))
	c.seekAhead()
	if b.asked && c.answer != nil {
		// Once applied, so that the answer's echo (heartbeat.Seen) is the
		// asking heartbeat's watermark.
		c.answer()
	}
	// Counted and logged only once committed, so a retried batch counts once.
	for i, e := range b.events {
		c.count(e, outcomes[i])
	}
	for _, l := range lost {
		c.stats.lostWrites.Add(1)
		c.logger.Warn("replication conflict: an acknowledged write was lost, recorded at /{region}/conflicts",
			"property", l.lost.ID, "lost_request_id", l.lost.requestID, "lost", l.lost.tag(),
			"won_request_id", l.won.requestID, "won", l.won.tag())
	}
	return true
}

// behindOwnPublished compares the database's outbox sequence with the seq
// of one of this region's events in the topic (rejoin.go): a database
// below it went back in time, and the region rejoins. The sequence is read
// again only when an event passes the value last read.
// It returns false if ctx is cancelled first.
func (c *consumer) behindOwnPublished(ctx context.Context, published int64) bool {
	var local int64
	var started time.Time
	ok := c.retry(ctx, "read the outbox sequence", false, func(ctx context.Context) error {
		return c.db.QueryRowContext(ctx, outboxSeqSQL).Scan(&local, &started)
	})
	if !ok {
		return false
	}
	c.outboxSeq = local
	if published <= local {
		return true
	}
	reason := fmt.Sprintf("the topic holds an event of this region's with outbox seq %d, but this database's outbox is at %d: "+
		"it lost writes that had left it (restored from an older backup, or replaced)", published, local)
	c.logger.Error("consume: this region's database is behind what it published; rejoining from the peer", "reason", reason)
	return c.retry(ctx, "ask for a rejoin", false, func(ctx context.Context) error {
		return requestRejoin(ctx, c.db, reason, false)
	})
}

// positionGap is a batch that does not begin where the database stands:
// its stored position in a partition is below the batch's first record, or
// the database is not the one the last batch was applied to (it
// restarted). A database restored from a backup does both: its positions
// went back with its rows, while the consumer, which kept running, reads on
// from where it was. Applying the batch would save positions past records
// the database never applied, and they would be skipped for good.
type positionGap struct {
	to        map[int32]int64 // where to read again from, by partition
	restarted bool
}

func (g *positionGap) Error() string {
	return fmt.Sprintf("the database is not where the batch begins (restarted: %v); reading again from %v", g.restarted, g.to)
}

// checkPositionsSQL reads, in the batch's transaction, the stored
// positions of its partitions ($2) and when the database started.
const checkPositionsSQL = `
SELECT s.started, p.partition, p.next_offset
FROM (SELECT pg_postmaster_start_time() AS started) AS s
LEFT JOIN replication_positions AS p ON p.topic = $1 AND p.partition = ANY ($2)`

// checkPositions returns a *positionGap unless b begins where the
// database stands in every partition (or after: what lies between was
// applied already, and applying it again changes nothing) and the database
// is the one the last batch went to.
func (c *consumer) checkPositions(ctx context.Context, tx *sql.Tx, b batch) error {
	partitions := make([]int32, 0, len(b.first))
	for p := range b.first {
		partitions = append(partitions, p)
	}
	rows, err := tx.QueryContext(ctx, checkPositionsSQL, c.topic, partitions)
	if err != nil {
		return fmt.Errorf("check positions: %w", err)
	}
	defer rows.Close()
	gap := &positionGap{to: maps.Clone(b.first)}
	behind := false
	var started time.Time
	for rows.Next() {
		var (
			partition sql.NullInt32
			next      sql.NullInt64
		)
		if err := rows.Scan(&started, &partition, &next); err != nil {
			return fmt.Errorf("check positions: %w", err)
		}
		if p := partition.Int32; partition.Valid && next.Int64 < b.first[p] {
			gap.to[p], behind = next.Int64, true
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("check positions: %w", err)
	}
	gap.restarted = !c.dbStarted.IsZero() && !started.Equal(c.dbStarted)
	c.dbStarted = started
	if behind || gap.restarted {
		return gap
	}
	return nil
}

// readAgain makes the consumer read again from where the database stands
// (positionGap), and read its outbox sequence again: a database that went
// back may have lost writes of its own that the records will show.
func (c *consumer) readAgain(g *positionGap) {
	c.logger.Warn("consume: the database is not where the records read begin (restarted, or restored from a backup); reading again from its positions",
		"positions", g.to, "restarted", g.restarted)
	c.outboxSeq = 0
	to := map[int32]kgo.EpochOffset{}
	for p, next := range g.to {
		to[p] = kgo.EpochOffset{Epoch: -1, Offset: next}
	}
	c.client.SetOffsets(map[string]map[int32]kgo.EpochOffset{c.topic: to})
}

// seekAhead moves the consumer to the stored positions the last batch
// found ahead of it (savePositions): what lies between was brought by a
// rejoin's snapshot and its replay of the log. It runs between a poll and
// AllowRebalance, so that no partition can be revoked meanwhile, as
// SetOffsets asks.
func (c *consumer) seekAhead() {
	if len(c.ahead) == 0 {
		return
	}
	to := map[int32]kgo.EpochOffset{}
	for p, next := range c.ahead {
		to[p] = kgo.EpochOffset{Epoch: -1, Offset: next}
	}
	c.client.SetOffsets(map[string]map[int32]kgo.EpochOffset{c.topic: to})
	c.logger.Info("consume: reading on from the positions a rejoin left", "positions", c.ahead)
	c.ahead = nil
}

// retry runs f until it succeeds, with backoff between attempts, and returns
// false if ctx is cancelled first. Each attempt gets applyAttemptTimeout. A
// detached attempt runs to its end even if ctx is cancelled meanwhile, so
// that a database transaction is not cut off halfway and its work lost; any
// other attempt stops with ctx. Either way a stopped batch is safe: its
// offsets are not committed, and delivered again it changes nothing.
func (c *consumer) retry(ctx context.Context, what string, detached bool, f func(context.Context) error) bool {
	for attempt := 0; ; attempt++ {
		parent := ctx
		if detached {
			parent = context.WithoutCancel(ctx)
		}
		attemptCtx, cancel := context.WithTimeout(parent, applyAttemptTimeout)
		err := f(attemptCtx)
		cancel()
		if err == nil {
			return true
		}
		if attempt%10 == 0 && !errors.Is(err, errRejoining) {
			c.logger.Warn("consume: "+what+" failed; retrying", "attempt", attempt+1, "err", err)
		}
		if !sleep(ctx, backoff(attempt)) {
			return false
		}
	}
}

// count records the outcome of one applied event. Conflicts are logged: a
// concurrent write was lost, and somebody may want to know which.
func (c *consumer) count(e event, o outcome) {
	switch o {
	case applied:
		c.stats.applied.Add(1)
		now := time.Now()
		c.stats.lastApplied.Store(&now)
	case replayWon, replayLost:
		c.stats.replays.Add(1)
		if o == replayWon {
			c.stats.applied.Add(1)
		}
		c.logger.Info("a request written in both regions: the greater write kept",
			"property", e.ID, "version", e.Version, "request_id", e.RequestID, "outcome", o.String())
	case conflictWon, conflictLost:
		c.stats.conflicts.Add(1)
		if o == conflictWon {
			c.stats.applied.Add(1)
		}
		c.logger.Warn("replication conflict: concurrent writes of one version, the greater one kept",
			"property", e.ID, "version", e.Version, "incoming_region", e.RegionOrigin,
			"incoming_updated_at", e.UpdatedAt, "incoming_request_id", e.RequestID,
			"outcome", o.String())
	case stale:
		c.stats.stale.Add(1)
	case expired:
		c.stats.expired.Add(1)
		c.stats.deadLettered.Add(1)
		c.logger.Error("an event older than RETENTION for a listing this region holds no row of: not applied, sent to the dead-letter queue",
			"property", e.ID, "version", e.Version, "region_origin", e.RegionOrigin, "updated_at", e.UpdatedAt, "request_id", e.RequestID)
	}
}
