package main

// The consumer: the other region's writes, from Kafka into this region's
// database. It reads the topic in its own region's consumer group, skips the
// records its own region produced, applies the peer's events by the conflict
// rule (conflict.go) and its heartbeats as watermarks (lag.go), all of one
// poll in one transaction, and only then commits the offsets. A crash before
// the offset commit re-delivers the batch, which changes nothing the second
// time.
//
// A record that cannot be decoded is poison, not an outage: it goes to the
// dead-letter queue with the reason, and consumption goes on. A database
// that does not answer is an outage: the same batch is retried with backoff,
// and nothing is ever skipped.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
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
	dlqTopic string
	started  time.Time // when this region started waiting for its peer

	stats replicationStats
}

// newConsumer creates region's consumer of topic. It does not connect.
func newConsumer(logger *slog.Logger, db *sql.DB, producer *kgo.Client, region string, brokers []string, topic, dlqTopic string) (*consumer, error) {
	client, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		// One group per region: each region reads every event once.
		kgo.ConsumerGroup("property-replicator-"+region),
		kgo.ConsumeTopics(topic),
		// A new group starts at the oldest event, so that nothing written
		// before this region first started is missed. And no offset is ever
		// reset: if the broker no longer holds the next event this region
		// needs (it was away longer than the retention, or the broker lost
		// data), that is an error (eventsLost), not a jump to whatever the
		// broker still has.
		kgo.ConsumeResetOffset(kgo.NoResetOffset()),
		// Offsets are committed by hand, after the database commit.
		kgo.DisableAutoCommit(),
		// No rebalance while a batch is being applied: its partitions cannot
		// move to another instance between the apply and the offset commit.
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchMaxWait(time.Second),
		// A crashed instance leaves the group only when its session times
		// out; until then its partitions are not consumed. 10s rather than
		// the default 45s bounds that pause.
		kgo.SessionTimeout(10*time.Second),
		kgo.HeartbeatInterval(time.Second),
	)
	if err != nil {
		return nil, fmt.Errorf("kafka consumer: %w", err)
	}
	return &consumer{
		logger:   logger,
		db:       db,
		client:   client,
		producer: producer,
		region:   region,
		peer:     peerOf(region),
		dlqTopic: dlqTopic,
		started:  time.Now(),
	}, nil
}

// lagReport is this region's replication lag report (lag.go).
func (c *consumer) lagReport(ctx context.Context) (LagReport, error) {
	return readLag(ctx, c.db, c.region, c.started, &c.stats)
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
		fetches.EachError(func(topic string, partition int32, err error) {
			fetchErrors++
			if eventsLost(err) {
				c.stop(fmt.Sprintf("events lost: partition %d of %s no longer holds the next event this region needs (%v); "+
					"re-seed this region from the other one (README)", partition, topic, err))
				return
			}
			c.logger.Warn("consume: fetch error", "topic", topic, "partition", partition, "err", err)
		})
		if c.stats.stopped.Load() != nil {
			// Nothing of this poll is applied and no offset moves: the
			// region stays exactly where the loss was found.
			return
		}
		records := fetches.Records()
		if fetchErrors > 0 && len(records) == 0 {
			// The client retries by itself; do not spin on a failing broker.
			if !sleep(ctx, maxBackoff) {
				return
			}
		}
		if len(records) > 0 {
			if !c.handle(ctx, records, partitions) {
				return // stopping: the batch is not committed and will be re-delivered
			}
			// Only now, after the database commit, may Kafka forget them. A
			// commit cut short by a stop leaves the batch to come again.
			commitCtx, cancel := context.WithTimeout(ctx, applyAttemptTimeout)
			if err := c.client.CommitRecords(commitCtx, records...); err != nil && ctx.Err() == nil {
				c.logger.Warn("consume: commit offsets failed; the batch will be re-applied harmlessly", "err", err)
			}
			cancel()
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

// stop ends the consumer's work for good, with the reason: the lag report
// and /health's body show it from now on, and the log says it at error
// level. Skipping ahead would leave the regions different for ever without a
// word; stopping keeps the lag growing, which is the truth.
func (c *consumer) stop(reason string) {
	if c.stats.stopped.CompareAndSwap(nil, &reason) {
		c.logger.Error("consume: replication stopped", "reason", reason)
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
// hence the deadline; after it, Close is immediate.
func (c *consumer) close(ctx context.Context) {
	c.client.AllowRebalance()
	if err := c.client.LeaveGroupContext(ctx); err != nil {
		c.logger.Warn("leave consumer group", "err", err)
	}
	c.client.Close()
}

// batch is one poll's records, sorted out: the peer's events to apply (and
// the record each came in), the newest heartbeat watermark per partition,
// and the dead letters of the records that could not be decoded.
type batch struct {
	events     []event
	sources    []*kgo.Record
	watermarks map[int32]time.Time
	dead       []*kgo.Record
}

// sortRecords decodes one poll's records into a batch. Its own region's
// records are skipped without decoding: there is nothing to apply, and each
// region validates only what it applies.
func (c *consumer) sortRecords(records []*kgo.Record) batch {
	b := batch{watermarks: map[int32]time.Time{}}
	for _, rec := range records {
		if header(rec, headerRegion) == c.region {
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
			if w := m.heartbeat.Watermark; w.After(b.watermarks[rec.Partition]) {
				b.watermarks[rec.Partition] = w
			}
		case m.event != nil:
			b.events = append(b.events, *m.event)
			b.sources = append(b.sources, rec)
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
	b := c.sortRecords(records)
	var outcomes []outcome
	refusals := 0
	ok := c.retry(ctx, "apply", true, func(ctx context.Context) error {
		var err error
		if refusals < maxRefusals {
			outcomes, err = c.apply(ctx, b, partitions)
		} else {
			outcomes, err = c.applyEach(ctx, &b, partitions)
		}
		if refusedByDatabase(err) {
			refusals++
		}
		return err
	})
	if !ok {
		return false
	}
	// Dead letters are written before the offsets can be committed, so that
	// a poison record is never just dropped.
	if len(b.dead) > 0 {
		ok := c.retry(ctx, "dead-letter", false, func(ctx context.Context) error {
			return c.producer.ProduceSync(ctx, b.dead...).FirstErr()
		})
		if !ok {
			return false
		}
		c.stats.deadLettered.Add(int64(len(b.dead)))
	}
	// Counted and logged only once committed, so a retried batch counts once.
	for i, e := range b.events {
		c.count(e, outcomes[i])
	}
	return true
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
		if attempt%10 == 0 {
			c.logger.Warn("consume: "+what+" failed; retrying", "attempt", attempt+1, "err", err)
		}
		if !sleep(ctx, backoff(attempt)) {
			return false
		}
	}
}

// maxClockSkew is how far ahead of this region's clock a peer watermark may
// be. The regions' clocks are kept in step (NTP); a watermark further ahead
// comes from a skewed or forged clock.
const maxClockSkew = time.Second

// saveWatermarkSQL moves a partition's watermark forward, never back: a
// re-delivered old heartbeat must not make the lag jump. A watermark from the
// future is clamped to this database's clock plus maxClockSkew ($5): kept as
// it came, it would hold the lag at 0 until that future arrived, whatever
// went missing meanwhile.
const saveWatermarkSQL = `
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, applied_at)
VALUES ($1, $2, $3, LEAST($4, clock_timestamp() + $5 * interval '1 millisecond'), now())
ON CONFLICT (peer_region, partition) DO UPDATE
SET watermark  = GREATEST(replication_watermarks.watermark, EXCLUDED.watermark),
    partitions = EXCLUDED.partitions,
    applied_at = now()`

// apply applies a batch's events and heartbeat watermarks in one
// transaction, and returns each event's outcome.
func (c *consumer) apply(ctx context.Context, b batch, partitions int32) ([]outcome, error) {
	tx, err := c.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("apply batch: %w", err)
	}
	defer tx.Rollback()
	outcomes, err := applyEvents(ctx, tx, b.events)
	if err != nil {
		return nil, fmt.Errorf("apply batch: %w", err)
	}
	for partition, w := range b.watermarks {
		if _, err := tx.ExecContext(ctx, saveWatermarkSQL, c.peer, partition, partitions, w, maxClockSkew.Milliseconds()); err != nil {
			return nil, fmt.Errorf("apply batch: save watermark: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("apply batch: commit: %w", err)
	}
	return outcomes, nil
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
	}
}
