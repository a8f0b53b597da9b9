package main

// The relay: the second half of the transactional outbox. A write commits
// its outbox row with the change itself (property.go); the relay publishes
// committed outbox rows to Kafka and deletes them only once Kafka has
// acknowledged them. Between the two it may crash, and then the rows are
// published again: delivery is at least once, and the consumers make a
// duplicate harmless.
//
// A round also publishes a heartbeat to every partition after its events,
// which is what the other region measures its replication lag against
// (lag.go): every heartbeatInterval while the region writes, every
// idleHeartbeatInterval while it does not, and at once when asked. A reader
// that needs a fresh one (the lag report, a session, a stand-in) asks its
// own relay for a heartbeat that says so (heartbeat.Ask), and the peer's
// consumer has the peer's relay answer it with one of its own. So an idle
// link costs the broker a heartbeat every few seconds, not four a second,
// and still reads about 0 whenever somebody looks.

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Relay timing and limits.
const (
	// relayBatchSize bounds one publish round.
	relayBatchSize = 500
	// relayPollInterval is how often the relay looks at the outbox when
	// nothing woke it. Every write wakes its own instance's relay, and a
	// round that finds another instance publishing tries again after
	// relayMinGap; the poll is for rows nobody woke a relay for, such as
	// those a crashed instance left behind. Each look is a transaction in
	// the database, so it is not frequent (docs/benchmarks.md).
	relayPollInterval = time.Second
	// relayMinGap is the least time between the starts of two rounds. An
	// idle relay publishes a write the moment it is woken; a busy one, woken
	// by every write, gathers the writes of the last 25 ms into one round
	// instead of paying a transaction, a commit and a Kafka round trip for
	// each. The broker's cost is per request, not per record (each round is
	// a produce request and a fetch by each region's consumer), so the gap
	// saves it most of its work under load (docs/benchmarks.md); replication
	// delay grows by at most the gap, and only under load.
	relayMinGap = 25 * time.Millisecond
	// relayBusyGap is the gap while the region writes at least
	// relayBusyRate events a second: rounds of fifty events or more, where
	// 25 ms would send a dozen or two. Under the benchmark's load it took
	// the broker's CPU per PUT from about 100 µs to about 30 µs, for up to
	// 75 ms more replication delay, and only at such rates: at 200 writes a
	// second the gap stays relayMinGap (docs/benchmarks.md).
	relayBusyGap  = 100 * time.Millisecond
	relayBusyRate = 500
	// relayRoundTimeout bounds one round, Kafka's acknowledgement included.
	// A round that runs out leaves its rows in the outbox for the next one.
	relayRoundTimeout = 5 * time.Second
	// relayProduceTimeout bounds the wait for Kafka's acknowledgement while
	// the round holds the relay's lock. On a healthy link it takes
	// milliseconds; an instance that has none within this time gives the
	// round up, and with its transaction the lock, so that in a region of
	// several instances one cut off from Kafka holds up the others for at
	// most this long (measured: TestOneInstanceCutOffLeavesTheRelay).
	relayProduceTimeout = 500 * time.Millisecond
	// heartbeatInterval is the time between two heartbeats while the region
	// writes (a round published events within relayBusyFor): they ride in
	// the rounds' produce requests, beside the events. It bounds the lag
	// the peer reads without asking for a heartbeat.
	heartbeatInterval = 250 * time.Millisecond
	// idleHeartbeatInterval is the time between two heartbeats while the
	// region does not write. Every heartbeat costs the broker a produce
	// request and both regions a fetch and a transaction; an idle stack
	// sending four a second kept a tenth of a core busy here
	// (docs/benchmarks.md). Nothing waits for these: a reader asks.
	idleHeartbeatInterval = 5 * time.Second
	// relayBusyFor is how long after its last published event the relay
	// counts its region as writing.
	relayBusyFor = time.Second
	// relayLockKey names the PostgreSQL advisory lock that makes one relay
	// per region database the publisher (see publishRound).
	relayLockKey = 0x70726f7065727479 // "property"
)

// relay publishes one region's outbox to the topic.
type relay struct {
	logger   *slog.Logger
	db       *sql.DB
	producer *kgo.Client
	region   string
	topic    string

	// wake tells the relay that a local write committed. It has room for one
	// signal: several writes in quick succession need only one publish round.
	wake chan struct{}
	// The rest belongs to the relay's own goroutine.
	//
	// lastHeartbeat is when the relay last published heartbeats, and
	// heartbeatFailed whether the last round that tried to failed: the next
	// round then publishes events alone, so that whatever makes a heartbeat
	// fail can slow the events down, never stop them.
	lastHeartbeat   time.Time
	heartbeatFailed bool
	// lastEvents is when a round last published events.
	lastEvents time.Time
	// askDue and answerDue are a heartbeat wanted at once: one that asks
	// the peer for one (ask), or one the peer asked for (answer).
	askDue, answerDue atomic.Bool
	// partitions is the topic's partition count as the relay last read it,
	// at most metadataMaxAge ago (countedAt). The relay places every record
	// itself (byKey for an event, each partition in turn for heartbeats),
	// with one count per round: a round's heartbeats then cover every
	// partition its events went to, even the round a partition is added.
	partitions int32
	countedAt  time.Time
	byKey      kgo.TopicPartitioner
	// failedRounds counts the rounds that failed, and published the events
	// this instance published, for the metrics.
	failedRounds atomic.Int64
	published    atomic.Int64
}

// newRelay returns the relay of region's outbox, publishing with producer.
func newRelay(logger *slog.Logger, db *sql.DB, producer *kgo.Client, region, topic string) *relay {
	return &relay{
		logger:   logger,
		db:       db,
		producer: producer,
		region:   region,
		topic:    topic,
		wake:     make(chan struct{}, 1),
		// Hashed by key as Kafka's own clients do, so that one property's
		// events share a partition and stay in order.
		byKey: kgo.StickyKeyPartitioner(nil).ForTopic(topic),
	}
}

// notify tells the relay that a local write committed. It never blocks.
func (r *relay) notify() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// ask has the relay send a heartbeat at once that asks the peer for one
// of its own (heartbeat.Ask): a reader here waits for the peer's answer,
// which echoes this heartbeat's watermark (lag.go, awaitPeer).
func (r *relay) ask() {
	r.askDue.Store(true)
	r.notify()
}

// answer has the relay send a heartbeat at once, because the peer asked
// for one (consume.go).
func (r *relay) answer() {
	r.answerDue.Store(true)
	r.notify()
}

// run publishes the outbox to a topic of the given partition count until ctx
// is cancelled. It runs a round when a local write wakes it, when a
// heartbeat is asked for or due, and at least every relayPollInterval.
func (r *relay) run(ctx context.Context, partitions int32) {
	r.partitions, r.countedAt = partitions, time.Now()
	failures := 0
	var lastRound time.Time
	gap := relayMinGap
	for {
		if !sleep(ctx, gap-time.Since(lastRound)) {
			return
		}
		if time.Since(r.countedAt) >= metadataMaxAge {
			r.countPartitions(ctx)
		}
		if failures > 0 && !r.brokerAnswers(ctx) {
			// Cut off from the brokers: leave the round's lock to an
			// instance that can publish, instead of holding it through a
			// produce that can only time out.
			failures++
			if !sleep(ctx, backoff(failures)) {
				return
			}
			continue
		}
		since, published := time.Since(lastRound), r.published.Load()
		lastRound = time.Now()
		full, locked, err := r.publishRound(ctx)
		gap = roundGap(r.published.Load()-published, since)
		switch {
		case err != nil:
			r.failedRounds.Add(1)
			if failures%10 == 0 {
				r.logger.Warn("relay: publish failed; events wait in the outbox", "err", err)
			}
			failures++
			if !sleep(ctx, backoff(failures)) {
				return
			}
			continue
		case failures > 0:
			r.logger.Info("relay: publishing again", "after_failures", failures)
			failures = 0
		}
		if full {
			// More rows are waiting: go again at once, without the gap,
			// which is there to gather writes into rounds, and a full
			// round has gathered all it can.
			lastRound = time.Time{}
			continue
		}
		if !locked {
			// Another instance of the region is publishing, and its round
			// may have read the outbox before what woke this one: go
			// again after the gap.
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-time.After(min(relayPollInterval, time.Until(r.nextHeartbeat()))):
		}
	}
}

// roundGap is the gap before the next round, after one that published
// events written over since (the time from the round before it): the
// region's write rate decides it, not the gap itself, so the relay settles
// on one gap for a steady load.
func roundGap(events int64, since time.Duration) time.Duration {
	if float64(events) >= relayBusyRate*since.Seconds() {
		return relayBusyGap
	}
	return relayMinGap
}

// brokerProbeTimeout bounds how long the relay waits for a broker's answer
// before it competes for a round after a failed one.
const brokerProbeTimeout = 500 * time.Millisecond

// brokerAnswers reports whether a broker answers a metadata request within
// brokerProbeTimeout. After a failed round the relay asks it first, outside
// any transaction: in a region of several instances, one cut off from
// Kafka would otherwise keep winning the round's lock and hold it through
// relayRoundTimeout, and the instance that can publish would seldom get to.
func (r *relay) brokerAnswers(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, brokerProbeTimeout)
	defer cancel()
	_, err := partitionCount(ctx, r.producer, r.topic)
	return err == nil
}

// countPartitions reads the topic's partition count again. A partition
// added to the topic gets events and heartbeats from the next round on; the
// producer is told to read the topic's metadata too, or it would refuse
// records for a partition it does not know yet.
func (r *relay) countPartitions(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	n, err := partitionCount(ctx, r.producer, r.topic)
	if err != nil {
		r.countedAt = time.Now().Add(-metadataMaxAge / 2) // again soon
		return
	}
	r.countedAt = time.Now()
	if n != r.partitions {
		r.logger.Info("relay: the topic's partition count changed", "topic", r.topic, "from", r.partitions, "to", n)
		r.partitions = n
		r.producer.ForceMetadataRefresh()
	}
}

// lockRelaySQL takes the relay's advisory lock for this transaction, if no
// other instance holds it.
const lockRelaySQL = `SELECT pg_try_advisory_xact_lock($1)`

// lockRelayWatermarkSQL is lockRelaySQL for a round that publishes
// heartbeats, and also reads their watermark: the earliest time a write that
// is not in the outbox yet could carry. That is this transaction's start,
// unless another transaction still in progress started earlier: a PUT is one
// statement, and the time it stamps its row with (updated_at, now()) is its
// transaction's start, which may be long before it commits. Read in the
// round's first statement, before the outbox: under READ COMMITTED each
// statement sees every transaction that committed before it began, so a
// write is either in progress now (and bounds the watermark), or visible to
// the outbox read that follows, or starts after now.
//
// The same statement reads the echo (heartbeat.Seen): the peer's watermark as
// this region has applied it, every partition's, or null; and when it began
// (heartbeat.Sent), which is before its snapshot, so after the echo.
const lockRelayWatermarkSQL = `
SELECT pg_try_advisory_xact_lock($1),
       LEAST(now(), (SELECT min(xact_start) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid())),
       (SELECT CASE WHEN count(*) > 0 AND count(*) >= max(partitions) THEN min(watermark) END
        FROM replication_watermarks WHERE peer_region = $2),
       statement_timestamp()`

// oldestLeftSQL is no later than the earliest time carried by an event the
// round leaves in the outbox (a full round leaves the rest for the next
// one): the oldest in the whole outbox, this round's events included, read
// from the outbox's index on created_at in O(log n), whatever the backlog.
const oldestLeftSQL = `SELECT min(created_at) FROM outbox`

// deleteOutboxSQL forgets the rows Kafka has acknowledged, and keeps the
// highest seq among them (outbox_published in init.sql).
const deleteOutboxSQL = `
WITH deleted AS (DELETE FROM outbox WHERE seq = ANY($1) RETURNING seq)
INSERT INTO outbox_published (seq)
SELECT max(seq) FROM deleted HAVING count(*) > 0
ON CONFLICT (one) DO UPDATE SET seq = GREATEST(outbox_published.seq, EXCLUDED.seq)`

// nextHeartbeat is when a heartbeat is next due, unasked.
func (r *relay) nextHeartbeat() time.Time {
	if time.Since(r.lastEvents) < relayBusyFor {
		return r.lastHeartbeat.Add(heartbeatInterval)
	}
	return r.lastHeartbeat.Add(idleHeartbeatInterval)
}

// publishRound runs one relay round and reports whether the batch was full,
// and whether this instance held the relay's lock for it.
//
// Several instances of a region may run a relay; the transaction-scoped
// advisory lock makes exactly one of them publish at a time, so events are
// published once and in order. If the instance dies, its transaction ends,
// the lock is released and another instance's next round takes over.
//
// When one is due or asked for (nextHeartbeat, ask, answer), the round also
// publishes a heartbeat to every partition, after its events: every write
// that carries an earlier time than the heartbeat's watermark is in Kafka
// ahead of it (see lockRelayWatermarkSQL). A full round sends one too, with
// a watermark no later than the oldest event it leaves behind, so that the
// other region's lag stays true under a load that keeps every round full.
// A heartbeat asked for and not sent (the round failed, or another instance
// held the lock) stays asked for.
func (r *relay) publishRound(ctx context.Context) (full, locked bool, err error) {
	// The round finishes even if ctx is cancelled meanwhile: a publish must
	// not be abandoned between Kafka's acknowledgement and the delete.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), relayRoundTimeout)
	defer cancel()
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return false, false, fmt.Errorf("relay: %w", err)
	}
	defer tx.Rollback()
	asked, answering := r.askDue.Swap(false), r.answerDue.Swap(false)
	heartbeatDue := (asked || answering || !time.Now().Before(r.nextHeartbeat())) && !r.heartbeatFailed
	r.heartbeatFailed = false
	defer func() {
		if err != nil && heartbeatDue {
			r.heartbeatFailed = true
		}
		if err != nil || !locked || !heartbeatDue {
			// Not sent: still asked for.
			if asked {
				r.askDue.Store(true)
			}
			if answering {
				r.answerDue.Store(true)
			}
		}
	}()
	locked, watermark, seen, sent, err := r.lock(ctx, tx, heartbeatDue)
	if err != nil || !locked {
		return false, false, err // !locked: another instance is the relay
	}
	seqs, records, err := r.readOutbox(ctx, tx)
	if err != nil {
		return false, true, fmt.Errorf("relay: read outbox: %w", err)
	}
	full = len(seqs) == relayBatchSize
	if heartbeatDue {
		hb := heartbeat{Region: r.region, Watermark: watermark, Seen: seen, Sent: sent, Ask: asked}
		hbs, err := r.heartbeats(ctx, tx, hb, full)
		if err != nil {
			return false, true, fmt.Errorf("relay: %w", err)
		}
		records = append(records, hbs...)
	}
	if len(records) == 0 {
		return false, true, nil
	}
	// ProduceSync returns when Kafka acknowledged every record (or failed).
	// One partition's records are acknowledged in order, so a heartbeat is
	// never ahead of the events it vouches for.
	if err := r.produce(ctx, tx, records); err != nil {
		return false, true, fmt.Errorf("relay: produce: %w", err)
	}
	if len(seqs) > 0 {
		if _, err := tx.ExecContext(ctx, deleteOutboxSQL, seqs); err != nil {
			return false, true, fmt.Errorf("relay: delete published rows: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		// The events are in Kafka but still in the outbox: the next round
		// publishes them again, and the consumers ignore the duplicates.
		return false, true, fmt.Errorf("relay: commit: %w", err)
	}
	r.published.Add(int64(len(seqs)))
	if len(seqs) > 0 {
		r.lastEvents = time.Now()
	}
	if heartbeatDue {
		r.lastHeartbeat = time.Now()
	}
	return full, true, nil
}

// produce publishes records and waits for Kafka's acknowledgement. If none
// comes within relayProduceTimeout, it rolls tx back, which gives the relay's
// lock up at once, and fails: the producer may still be waiting for an
// answer it cannot cancel (a request already sent), and may even get one,
// but the rows stay in the outbox, and the instance that takes the lock
// publishes them again, which the consumers make harmless.
//
// It waits on the records' promises, not in ProduceSync: franz-go fails a
// record whose context ends only while that is safe, and an idempotent
// producer's record in a request already sent is not, so ProduceSync can
// wait for as long as the broker is away, a cancelled context or not, and
// the round with it: the round's deadline (relayRoundTimeout) and the
// shutdown's would not hold. The records left behind stay the producer's:
// they are published when the broker is back, or failed when the client
// closes, before anything this instance produces later to their partitions.
func (r *relay) produce(ctx context.Context, tx *sql.Tx, records []*kgo.Record) error {
	ctx, cancel := context.WithTimeout(ctx, relayProduceTimeout)
	defer cancel()
	// One answer per record, each sent once: the promise never blocks.
	acks := make(chan error, len(records))
	for _, rec := range records {
		r.producer.Produce(ctx, rec, func(_ *kgo.Record, err error) { acks <- err })
	}
	var first error
	for range records {
		select {
		case err := <-acks:
			if first == nil {
				first = err
			}
		case <-ctx.Done():
			tx.Rollback()
			return fmt.Errorf("no acknowledgement within %v; the lock is left to another instance", relayProduceTimeout)
		}
	}
	return first
}

// lock takes the relay's advisory lock in tx, and reports whether it got it.
// With withWatermark, it also reads the heartbeats' watermark, echo and
// sending time, in the same first statement of the round (see
// lockRelayWatermarkSQL); seen and sent are nil while there is no echo.
func (r *relay) lock(ctx context.Context, tx *sql.Tx, withWatermark bool) (locked bool, watermark time.Time, seen, sent *time.Time, err error) {
	if withWatermark {
		var echo sql.NullTime
		var at time.Time
		err = tx.QueryRowContext(ctx, lockRelayWatermarkSQL, relayLockKey, peerOf(r.region)).Scan(&locked, &watermark, &echo, &at)
		if echo.Valid {
			e, a := echo.Time.UTC(), at.UTC()
			seen, sent = &e, &a
		}
	} else {
		err = tx.QueryRowContext(ctx, lockRelaySQL, relayLockKey).Scan(&locked)
	}
	if err != nil {
		return false, time.Time{}, nil, nil, fmt.Errorf("relay: lock: %w", err)
	}
	return locked, watermark, seen, sent, nil
}

// readOutboxSQL reads the oldest events of the outbox. Rows with a lower seq
// may still commit after this read (a sequence value is taken before commit), but they are not
// lost: nothing remembers a position, the next round reads whatever is in the
// table. And one property's rows are always in order, because its writes are
// serialized by the row lock.
const readOutboxSQL = `
SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted,
       seq, request_id, fingerprint, coalesce(parent, '')
FROM outbox
ORDER BY seq
LIMIT $1`

// readOutbox reads up to relayBatchSize outbox rows inside tx and returns
// their seqs and their events as records, in seq order.
func (r *relay) readOutbox(ctx context.Context, tx *sql.Tx) ([]int64, []*kgo.Record, error) {
	rows, err := tx.QueryContext(ctx, readOutboxSQL, relayBatchSize)
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	var seqs []int64
	var records []*kgo.Record
	for rows.Next() {
		var e event
		if e.Property, err = scanProperty(rows, &e.seq, &e.RequestID, &e.fingerprint, &e.Parent); err != nil {
			return nil, nil, err
		}
		rec, err := eventRecord(r.topic, e)
		if err != nil {
			return nil, nil, err
		}
		rec.Partition = int32(r.byKey.Partition(rec, int(r.partitions)))
		seqs = append(seqs, e.seq)
		records = append(records, rec)
	}
	return seqs, records, rows.Err()
}

// heartbeats returns hb as one record for each of the topic's partitions,
// to follow the round's events. Its watermark is the one lock read, or, when the round was full, the oldest time an event left behind
// may carry, if that is earlier.
func (r *relay) heartbeats(ctx context.Context, tx *sql.Tx, hb heartbeat, full bool) ([]*kgo.Record, error) {
	if full {
		var left sql.NullTime
		if err := tx.QueryRowContext(ctx, oldestLeftSQL).Scan(&left); err != nil {
			return nil, fmt.Errorf("oldest event left: %w", err)
		}
		if left.Valid && left.Time.Before(hb.Watermark) {
			hb.Watermark = left.Time
		}
	}
	hb.Watermark, hb.Partitions = hb.Watermark.UTC(), r.partitions
	value, err := json.Marshal(hb)
	if err != nil {
		return nil, fmt.Errorf("encode heartbeat: %w", err)
	}
	records := make([]*kgo.Record, 0, r.partitions)
	for p := range r.partitions {
		records = append(records, &kgo.Record{
			Topic:     r.topic,
			Partition: p,
			Value:     value,
			Headers:   recordHeaders(kindHeartbeat, r.region),
		})
	}
	return records, nil
}
