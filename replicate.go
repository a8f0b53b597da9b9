package main

// Replication: every committed write in one region reaches the other through
// Kafka, and both databases converge to identical rows.
//
// A write travels like this (US to EU; EU to US is the mirror image):
//
//  1. PUT in US commits the row, its request id and an outbox row in ONE
//     statement, so one transaction (updateProperty). Publishing to Kafka
//     from the request instead would either lose the event (crash after
//     commit, before publish) or publish a change that then rolls back. The
//     outbox makes the event as durable as the write.
//  2. The relay (replicator.relay) reads committed outbox rows in seq order,
//     publishes them to the topic with an idempotent producer (acks=all,
//     key = property id, so one property's events stay in one partition, in
//     order) and deletes them only after Kafka acknowledged them. A crash in
//     between publishes them again: delivery is at least once.
//  3. EU's consumer (replicator.consume) applies US events with the conflict
//     rule (resolve) in one transaction with their request ids, then commits
//     its Kafka offsets. A crash in between re-delivers the batch, and
//     re-applying an event changes nothing: the rule is idempotent.
//
// The conflict rule makes the order of arrival irrelevant: a row is replaced
// only by a write that is greater under (version, updated_at, region_origin),
// a total order that both regions evaluate the same way. Whatever order the
// events arrive in, every database ends with the greatest write of each row.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Topic settings, stated here rather than left to the broker's defaults.
const (
	// topicPartitions spreads properties over partitions by key; one
	// property's events always share a partition, which keeps them ordered.
	topicPartitions = 3
	// topicReplicationFactor is 1 because the stack has one broker. With
	// three brokers, make it 3 and set min.insync.replicas to 2.
	topicReplicationFactor = 1
	// topicRetention is how long an event waits for a region that is down:
	// a region away for longer must be re-seeded from the other one.
	topicRetention = 7 * 24 * time.Hour
)

// Relay and heartbeat timing.
const (
	// relayBatchSize bounds one publish round.
	relayBatchSize = 500
	// relayPollInterval is how often the relay looks at the outbox when no
	// local write woke it, to pick up writes by other instances of the
	// region.
	relayPollInterval = 100 * time.Millisecond
	// heartbeatInterval is the time between two heartbeats. It bounds what
	// an idle, healthy link reports as lag. It is not shorter because every
	// heartbeat costs the broker a produce request and both regions a fetch:
	// at 100 ms, the heartbeats of two idle regions kept about 12% of a core
	// busy in the broker; at 1 s, under 3%.
	heartbeatInterval = 250 * time.Millisecond
	// relayMinGap is the least time between the starts of two rounds. An
	// idle relay publishes a write the moment it is woken; a busy one, woken
	// by every write, gathers the writes of the last 25 ms into one round
	// instead of paying a transaction, a commit and a Kafka round trip for
	// each. The broker's cost is per request, not per record: at 5 ms, 30,000
	// writes cost it about twice the CPU they cost it at 25 ms. Replication
	// delay grows by at most the gap, and only under load.
	relayMinGap = 25 * time.Millisecond
	// relayLockKey names the PostgreSQL advisory lock that makes one relay
	// per region database the publisher (see publishBatch).
	relayLockKey = 0x70726f7065727479 // "property"
	// maxBackoff caps the wait between retries while Kafka or the database
	// is down, so that recovery is noticed within this much time.
	maxBackoff = 2 * time.Second
)

// Kafka record headers.
const (
	headerKind   = "kind"   // "event" or "heartbeat"
	headerRegion = "region" // the region that produced the record
	headerReason = "reason" // why a record went to the dead-letter queue
)

// event is what travels through Kafka for one committed update: the whole new
// row plus the request id that produced it. Sending the full row rather than
// the change makes applying it idempotent and order-independent. The
// embedded Property's fields appear at the top level of the JSON:
// {"id", "price", "bedrooms", "bathrooms", "region_origin", "version",
// "updated_at", "request_id"}.
type event struct {
	Property
	RequestID string `json:"request_id"`
}

// heartbeat is the record a region's relay publishes to every partition when
// its outbox is drained: "everything I committed before Watermark is in
// Kafka, ahead of this record". The peer's lag is measured against it.
type heartbeat struct {
	Region    string    `json:"region"`
	Watermark time.Time `json:"watermark"`
}

// compareWrites orders two writes of one property under the conflict rule:
// by version, then updated_at, then region_origin. It returns -1, 0 or +1.
// Both regions use this same total order, which is why they converge.
func compareWrites(a, b Property) int {
	switch {
	case a.Version != b.Version:
		return cmpInt(a.Version, b.Version)
	case !a.UpdatedAt.Equal(b.UpdatedAt):
		return cmpInt(a.UpdatedAt.UnixMicro(), b.UpdatedAt.UnixMicro())
	case a.RegionOrigin != b.RegionOrigin:
		if a.RegionOrigin < b.RegionOrigin {
			return -1
		}
		return 1
	}
	return 0
}

// cmpInt compares two different integers.
func cmpInt(a, b int64) int {
	if a < b {
		return -1
	}
	return 1
}

// outcome is what applying a remote write did to the local row.
type outcome int

// The outcomes of resolve.
const (
	applied   outcome = iota // the incoming write is the successor of the local row
	duplicate                // the local row already is this write: a redelivery
	stale                    // the local row is a later version: an old event
	// conflictWon and conflictLost are two concurrent writes of the same
	// version, made in different regions; one of them is lost.
	conflictWon  // the incoming write replaced a concurrent local one
	conflictLost // the incoming write lost to a concurrent local one
)

// resolve decides what the conflict rule does with an incoming write, given
// the local row (nil if there is none). It is a pure function: the whole rule
// is here, and the database only carries out its verdict.
func resolve(local *Property, incoming Property) outcome {
	if local == nil {
		return applied
	}
	c := compareWrites(incoming, *local)
	switch {
	case c == 0:
		return duplicate
	case incoming.Version == local.Version && c > 0:
		return conflictWon
	case incoming.Version == local.Version:
		return conflictLost
	case c > 0:
		return applied
	}
	return stale
}

// replaces reports whether an outcome writes the incoming row.
func (o outcome) replaces() bool { return o == applied || o == conflictWon }

// replicationStats are the consumer's counters, for the lag report.
type replicationStats struct {
	applied      atomic.Int64
	conflicts    atomic.Int64
	stale        atomic.Int64
	deadLettered atomic.Int64
	lastApplied  atomic.Pointer[time.Time]

	mu     sync.Mutex
	behind map[int32]int64 // records not yet consumed, by partition
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

// replicator owns both directions of one region's replication: the outbox
// relay that publishes local writes and the consumer that applies the other
// region's. It holds one producer and one consumer client for the life of
// the process.
type replicator struct {
	region   string
	peer     string
	topic    string
	dlqTopic string
	db       *sql.DB
	logger   *slog.Logger
	producer *kgo.Client
	consumer *kgo.Client
	started  time.Time

	// wake tells the relay that a local write committed. It has room for one
	// signal: several writes in quick succession need only one publish round.
	wake chan struct{}
	// partitions is the topic's partition count once known (0 before).
	partitions atomic.Int32
	// lastHeartbeat is when the relay last published heartbeats; only the
	// relay goroutine uses it.
	lastHeartbeat time.Time

	stats replicationStats
}

// newReplicator creates the Kafka clients. It does not connect: Kafka may be
// down at start, and writes then wait in the outbox until it is back.
func newReplicator(logger *slog.Logger, cfg config, db *sql.DB) (*replicator, error) {
	r := &replicator{
		region:   cfg.region,
		peer:     peerOf(cfg.region),
		topic:    cfg.kafkaTopic,
		dlqTopic: cfg.kafkaTopic + ".dlq",
		db:       db,
		logger:   logger.With("component", "replication"),
		started:  time.Now(),
		wake:     make(chan struct{}, 1),
		stats:    replicationStats{behind: map[int32]int64{}},
	}
	var err error
	r.producer, err = kgo.NewClient(
		kgo.SeedBrokers(cfg.kafkaBrokers...),
		// Idempotent producer (franz-go's default) with acks from all in-sync
		// replicas: a retried batch is written once, and an acknowledged
		// record survives a broker failure.
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordPartitioner(eventPartitioner()),
		// Send at once: the relay already batches, and latency matters.
		kgo.ProducerLinger(0),
		// Uncompressed: a round's records are a few hundred bytes of JSON
		// per partition, too few for compression to pay. Snappy (franz-go's
		// default) made the broker decompress every batch to validate it,
		// which cost it about twice the CPU of the whole uncompressed load.
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		kgo.RecordDeliveryTimeout(10*time.Second),
	)
	if err != nil {
		return nil, fmt.Errorf("kafka producer: %w", err)
	}
	r.consumer, err = kgo.NewClient(
		kgo.SeedBrokers(cfg.kafkaBrokers...),
		// One group per region: each region reads every event once.
		kgo.ConsumerGroup("property-replicator-"+cfg.region),
		kgo.ConsumeTopics(cfg.kafkaTopic),
		// A new group starts at the oldest event, so that nothing written
		// before this region first started is missed.
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
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
		r.producer.Close()
		return nil, fmt.Errorf("kafka consumer: %w", err)
	}
	return r, nil
}

// peerOf returns the other region.
func peerOf(region string) string {
	if region == "us" {
		return "eu"
	}
	return "us"
}

// eventPartitioner sends an event to the partition of its key (the property
// id), hashed as Kafka's own clients do, and a heartbeat, which has no key, to
// the partition it names.
func eventPartitioner() kgo.Partitioner {
	return kgo.BasicConsistentPartitioner(func(topic string) func(*kgo.Record, int) int {
		byKey := kgo.StickyKeyPartitioner(nil).ForTopic(topic)
		return func(r *kgo.Record, n int) int {
			if r.Key == nil {
				return int(r.Partition) % n
			}
			return byKey.Partition(r, n)
		}
	})
}

// notify tells the relay that a local write committed. It never blocks.
func (r *replicator) notify() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// run runs the relay and the consumer until stop is closed: it creates the
// topics (retrying until Kafka answers), then relays and consumes. Each loop
// finishes its current batch before it returns. run returns when both have.
func (r *replicator) run(stop <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Exits when stop closes or run returns.
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	if !r.ensureTopics(ctx) {
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { r.relay(ctx) })   // exits when ctx is cancelled
	wg.Go(func() { r.consume(ctx) }) // exits when ctx is cancelled
	wg.Wait()
}

// close flushes what the producer still holds and closes both clients. Call
// it after run has returned.
func (r *replicator) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.producer.Flush(ctx); err != nil {
		r.logger.Warn("flush producer", "err", err)
	}
	r.producer.Close()
	// Leave the group, so that another instance takes the partitions over
	// at once rather than after the session timeout. The last polled batch
	// may still block rebalancing (BlockRebalanceOnPoll) if the consumer
	// stopped before applying it; that batch was not committed, so letting
	// the partitions go is right. Leaving waits for a join in progress, which
	// the broker may hold for a long time, so it gets a deadline of its own;
	// after that, Close is immediate.
	r.consumer.AllowRebalance()
	if err := r.consumer.LeaveGroupContext(ctx); err != nil {
		r.logger.Warn("leave consumer group", "err", err)
	}
	r.consumer.Close()
}

// ensureTopics creates the topic and its dead-letter queue if they do not
// exist, and learns the topic's partition count. It retries until Kafka
// answers and returns false only if ctx is cancelled first.
func (r *replicator) ensureTopics(ctx context.Context) bool {
	for attempt := 0; ; attempt++ {
		n, err := r.createTopics(ctx)
		if err == nil {
			r.partitions.Store(n)
			r.logger.Info("topics ready", "topic", r.topic, "partitions", n, "dlq", r.dlqTopic)
			return true
		}
		if attempt%10 == 0 {
			r.logger.Warn("kafka not ready; writes wait in the outbox", "err", err)
		}
		if !sleep(ctx, backoff(attempt)) {
			return false
		}
	}
}

// createTopics creates both topics, tolerating that they exist, and returns
// the partition count of the main topic.
func (r *replicator) createTopics(ctx context.Context) (int32, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req := kmsg.NewPtrCreateTopicsRequest()
	req.TimeoutMillis = 5000
	for _, t := range []struct {
		name       string
		partitions int32
	}{{r.topic, topicPartitions}, {r.dlqTopic, 1}} {
		rt := kmsg.NewCreateTopicsRequestTopic()
		rt.Topic = t.name
		rt.NumPartitions = t.partitions
		rt.ReplicationFactor = topicReplicationFactor
		for k, v := range map[string]string{
			"cleanup.policy": "delete",
			"retention.ms":   strconv.FormatInt(topicRetention.Milliseconds(), 10),
		} {
			c := kmsg.NewCreateTopicsRequestTopicConfig()
			c.Name, c.Value = k, kmsg.StringPtr(v)
			rt.Configs = append(rt.Configs, c)
		}
		req.Topics = append(req.Topics, rt)
	}
	resp, err := req.RequestWith(ctx, r.producer)
	if err != nil {
		return 0, fmt.Errorf("create topics: %w", err)
	}
	for _, t := range resp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
			return 0, fmt.Errorf("create topic %s: %w", t.Topic, err)
		}
	}

	meta := kmsg.NewPtrMetadataRequest()
	mt := kmsg.NewMetadataRequestTopic()
	mt.Topic = kmsg.StringPtr(r.topic)
	meta.Topics = append(meta.Topics, mt)
	mresp, err := meta.RequestWith(ctx, r.producer)
	if err != nil {
		return 0, fmt.Errorf("topic metadata: %w", err)
	}
	for _, t := range mresp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil {
			return 0, fmt.Errorf("topic metadata %s: %w", r.topic, err)
		}
		if len(t.Partitions) > 0 {
			return int32(len(t.Partitions)), nil
		}
	}
	return 0, fmt.Errorf("topic %s has no partitions yet", r.topic)
}

// relay publishes the outbox until ctx is cancelled. It runs a round when a
// local write wakes it, and at least every relayPollInterval.
func (r *replicator) relay(ctx context.Context) {
	failures := 0
	var lastRound time.Time
	for {
		if !sleep(ctx, relayMinGap-time.Since(lastRound)) {
			return
		}
		lastRound = time.Now()
		full, err := r.publishBatch(ctx)
		switch {
		case err != nil:
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
			// More rows are waiting: go again at once.
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-time.After(relayPollInterval):
		}
	}
}

// lockRelaySQL takes the relay's advisory lock for this transaction, if no
// other instance holds it, and reads the clock at the transaction's start.
const lockRelaySQL = `SELECT pg_try_advisory_xact_lock($1), now()`

// readOutboxSQL reads the oldest outbox rows with their events, which are the
// processed_requests rows they name. Rows with a lower seq may still commit
// after this read (a sequence value is taken before commit), but they are not
// lost: nothing remembers a position, the next round reads whatever is in the
// table. And one property's rows are always in order, because its writes are
// serialized by the row lock.
const readOutboxSQL = `
SELECT o.seq, r.request_id,
       r.property_id, r.price, r.bedrooms, r.bathrooms, r.region_origin, r.version, r.updated_at
FROM outbox o JOIN processed_requests r USING (request_id)
ORDER BY o.seq
LIMIT $1`

// deleteOutboxSQL forgets the rows Kafka has acknowledged.
const deleteOutboxSQL = `DELETE FROM outbox WHERE seq = ANY($1)`

// publishBatch runs one relay round and reports whether the batch was full.
//
// Several instances of a region may run a relay; the transaction-scoped
// advisory lock makes exactly one of them publish at a time, so events are
// published once and in order. If the instance dies, its transaction ends,
// the lock is released and another instance's next round takes over.
//
// When the round drains the outbox, it also publishes a heartbeat to every
// partition (at most every heartbeatInterval) with the time the round's
// transaction started: every write committed before then was visible to this
// round and is now in Kafka.
func (r *replicator) publishBatch(ctx context.Context) (full bool, err error) {
	n := r.partitions.Load()
	// The round finishes even if ctx is cancelled meanwhile: a publish must
	// not be abandoned between Kafka's acknowledgement and the delete.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("relay: %w", err)
	}
	defer tx.Rollback()
	var locked bool
	var watermark time.Time
	if err := tx.QueryRowContext(ctx, lockRelaySQL, relayLockKey).Scan(&locked, &watermark); err != nil {
		return false, fmt.Errorf("relay: lock: %w", err)
	}
	if !locked {
		return false, nil // another instance is the relay
	}

	rows, err := tx.QueryContext(ctx, readOutboxSQL, relayBatchSize)
	if err != nil {
		return false, fmt.Errorf("relay: read outbox: %w", err)
	}
	var seqs []int64
	var records []*kgo.Record
	for rows.Next() {
		var seq int64
		var requestID string
		var p Property
		var bedrooms, bathrooms sql.NullInt32
		err := rows.Scan(&seq, &requestID, &p.ID, &p.Price, &bedrooms, &bathrooms, &p.RegionOrigin, &p.Version, &p.UpdatedAt)
		if err != nil {
			rows.Close()
			return false, fmt.Errorf("relay: read outbox: %w", err)
		}
		p.Bedrooms, p.Bathrooms = nullable(bedrooms), nullable(bathrooms)
		payload, err := json.Marshal(event{p, requestID})
		if err != nil {
			rows.Close()
			return false, fmt.Errorf("relay: encode event: %w", err)
		}
		seqs = append(seqs, seq)
		records = append(records, &kgo.Record{
			Topic:   r.topic,
			Key:     []byte(strconv.FormatInt(p.ID, 10)),
			Value:   payload,
			Headers: []kgo.RecordHeader{{Key: headerKind, Value: []byte("event")}, {Key: headerRegion, Value: []byte(r.region)}},
		})
	}
	if err := rows.Err(); err != nil {
		return false, fmt.Errorf("relay: read outbox: %w", err)
	}
	full = len(seqs) == relayBatchSize
	heartbeatDue := !full && time.Since(r.lastHeartbeat) >= heartbeatInterval
	if heartbeatDue {
		hb, err := json.Marshal(heartbeat{Region: r.region, Watermark: watermark.UTC()})
		if err != nil {
			return false, fmt.Errorf("relay: heartbeat: %w", err)
		}
		for p := range n {
			records = append(records, &kgo.Record{
				Topic:     r.topic,
				Partition: p,
				Value:     hb,
				Headers:   []kgo.RecordHeader{{Key: headerKind, Value: []byte("heartbeat")}, {Key: headerRegion, Value: []byte(r.region)}},
			})
		}
	}
	if len(records) == 0 {
		return false, nil
	}
	// ProduceSync returns when Kafka acknowledged every record (or failed).
	// One partition's records are acknowledged in order, so a heartbeat is
	// never ahead of the events it vouches for.
	if err := r.producer.ProduceSync(ctx, records...).FirstErr(); err != nil {
		return false, fmt.Errorf("relay: produce: %w", err)
	}
	if len(seqs) > 0 {
		if _, err := tx.ExecContext(ctx, deleteOutboxSQL, seqs); err != nil {
			return false, fmt.Errorf("relay: delete published rows: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		// The events are in Kafka but still in the outbox: the next round
		// publishes them again, and the consumers ignore the duplicates.
		return false, fmt.Errorf("relay: commit: %w", err)
	}
	if heartbeatDue {
		r.lastHeartbeat = time.Now()
	}
	return full, nil
}

// consume applies the peer region's events until ctx is cancelled.
func (r *replicator) consume(ctx context.Context) {
	for {
		fetches := r.consumer.PollRecords(ctx, relayBatchSize)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			return
		}
		fetchErrors := 0
		fetches.EachError(func(topic string, partition int32, err error) {
			fetchErrors++
			r.logger.Warn("consume: fetch error", "topic", topic, "partition", partition, "err", err)
		})
		records := fetches.Records()
		if fetchErrors > 0 && len(records) == 0 {
			// The client retries by itself; do not spin on a failing broker.
			if !sleep(ctx, maxBackoff) {
				return
			}
		}
		if len(records) > 0 {
			if !r.applyWithRetry(ctx, records) {
				return // stopping: the batch is not committed and will be re-delivered
			}
			// Only now, after the database commit, may Kafka forget them.
			commitCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			if err := r.consumer.CommitRecords(commitCtx, records...); err != nil {
				r.logger.Warn("consume: commit offsets failed; the batch will be re-applied harmlessly", "err", err)
			}
			cancel()
		}
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) == 0 {
				return
			}
			last := p.Records[len(p.Records)-1].Offset
			r.stats.mu.Lock()
			r.stats.behind[p.Partition] = max(p.HighWatermark-last-1, 0)
			r.stats.mu.Unlock()
		})
		r.consumer.AllowRebalance()
	}
}

// applyWithRetry applies one poll's records: its own region's are skipped,
// undecodable ones go to the dead-letter queue, and the peer's events and
// heartbeats are applied in one transaction. Each step is retried with
// backoff while Kafka or the database is unreachable: consumption pauses, and
// no record is ever skipped. It returns false if ctx was cancelled first.
func (r *replicator) applyWithRetry(ctx context.Context, records []*kgo.Record) bool {
	var (
		events     []event
		watermarks = map[int32]time.Time{} // the newest heartbeat per partition
		dead       []*kgo.Record
	)
	for _, rec := range records {
		if recordRegion(rec) == r.region {
			// Our own write or heartbeat: nothing to apply, and no need to
			// decode it (each region validates what it applies).
			continue
		}
		m, err := decodeMessage(rec)
		switch {
		case err != nil:
			dead = append(dead, r.deadLetter(rec, err))
		case m.heartbeat != nil:
			if w := m.heartbeat.Watermark; w.After(watermarks[rec.Partition]) {
				watermarks[rec.Partition] = w
			}
		case m.event != nil:
			events = append(events, *m.event)
		}
	}
	// Dead letters are written before the offsets can be committed, so that
	// a poison record is never just dropped.
	if len(dead) > 0 {
		ok := r.retry(ctx, "dead-letter", func(ctx context.Context) error {
			return r.producer.ProduceSync(ctx, dead...).FirstErr()
		})
		if !ok {
			return false
		}
		r.stats.deadLettered.Add(int64(len(dead)))
	}
	var outcomes []outcome
	ok := r.retry(ctx, "apply", func(ctx context.Context) error {
		var err error
		outcomes, err = r.apply(ctx, events, watermarks)
		return err
	})
	if !ok {
		return false
	}
	// Counted and logged only once committed, so a retried batch counts once.
	for i, e := range events {
		r.count(e, outcomes[i])
	}
	return true
}

// retry runs f until it succeeds, with backoff between attempts, and returns
// false if ctx is cancelled first. Each attempt runs to its end even if ctx
// is cancelled meanwhile (a transaction is not abandoned halfway), within a
// deadline of its own.
func (r *replicator) retry(ctx context.Context, what string, f func(context.Context) error) bool {
	for attempt := 0; ; attempt++ {
		attemptCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		err := f(attemptCtx)
		cancel()
		if err == nil {
			return true
		}
		if attempt%10 == 0 {
			r.logger.Warn("consume: "+what+" failed; retrying", "attempt", attempt+1, "err", err)
		}
		if !sleep(ctx, backoff(attempt)) {
			return false
		}
	}
}

// apply applies the peer's events and heartbeat watermarks in one
// transaction, and returns each event's outcome.
func (r *replicator) apply(ctx context.Context, events []event, watermarks map[int32]time.Time) ([]outcome, error) {
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("apply batch: %w", err)
	}
	defer tx.Rollback()
	outcomes, err := applyEvents(ctx, tx, events)
	if err != nil {
		return nil, fmt.Errorf("apply batch: %w", err)
	}
	for partition, w := range watermarks {
		if _, err := tx.ExecContext(ctx, saveWatermarkSQL, r.peer, partition, r.partitions.Load(), w); err != nil {
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
func (r *replicator) count(e event, o outcome) {
	switch o {
	case applied:
		r.stats.applied.Add(1)
		now := time.Now()
		r.stats.lastApplied.Store(&now)
	case conflictWon, conflictLost:
		r.stats.conflicts.Add(1)
		if o == conflictWon {
			r.stats.applied.Add(1)
		}
		r.logger.Warn("replication conflict: concurrent writes of one version, the greater one kept",
			"property", e.ID, "version", e.Version, "incoming_region", e.RegionOrigin,
			"incoming_updated_at", e.UpdatedAt, "incoming_request_id", e.RequestID,
			"incoming_won", o == conflictWon)
	case stale:
		r.stats.stale.Add(1)
	}
}

// message is one decoded record of the topic: an event or a heartbeat.
type message struct {
	region    string // the producing region
	event     *event
	heartbeat *heartbeat
}

// recordRegion returns the region header of a record, or "".
func recordRegion(rec *kgo.Record) string {
	for _, h := range rec.Headers {
		if h.Key == headerRegion {
			return string(h.Value)
		}
	}
	return ""
}

// decodeMessage decodes and validates one record.
func decodeMessage(rec *kgo.Record) (message, error) {
	m := message{region: recordRegion(rec)}
	var kind string
	for _, h := range rec.Headers {
		if h.Key == headerKind {
			kind = string(h.Value)
		}
	}
	if !validRegion(m.region) {
		return m, fmt.Errorf("missing or unknown %q header %q", headerRegion, m.region)
	}
	switch kind {
	case "heartbeat":
		var hb heartbeat
		if err := strictUnmarshal(rec.Value, &hb); err != nil {
			return m, fmt.Errorf("heartbeat: %w", err)
		}
		if hb.Region != m.region || hb.Watermark.IsZero() {
			return m, errors.New("heartbeat: region or watermark missing")
		}
		m.heartbeat = &hb
	case "event":
		var e event
		if err := strictUnmarshal(rec.Value, &e); err != nil {
			return m, fmt.Errorf("event: %w", err)
		}
		if err := e.validate(); err != nil {
			return m, fmt.Errorf("event: %w", err)
		}
		if e.RegionOrigin != m.region {
			return m, fmt.Errorf("event: region_origin %q differs from header %q", e.RegionOrigin, m.region)
		}
		if string(rec.Key) != strconv.FormatInt(e.ID, 10) {
			return m, fmt.Errorf("event: key %q is not the property id %d", rec.Key, e.ID)
		}
		m.event = &e
	default:
		return m, fmt.Errorf("missing or unknown %q header %q", headerKind, kind)
	}
	return m, nil
}

// strictUnmarshal decodes exactly one JSON object with no unknown fields.
func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// validate checks what the database would otherwise reject in the middle of
// a batch: an event that cannot be applied is poison, not an outage.
func (e event) validate() error {
	rooms := func(n *int32) bool { return n == nil || (*n >= 0 && *n <= maxRooms) }
	switch {
	case e.ID < 1:
		return errors.New("id must be positive")
	case e.Price <= 0 || e.Price > maxMoney:
		return errors.New("price out of range")
	case !rooms(e.Bedrooms) || !rooms(e.Bathrooms):
		return errors.New("bedrooms or bathrooms out of range")
	case !validRegion(e.RegionOrigin):
		return errors.New("unknown region_origin")
	case e.Version < 1:
		return errors.New("version must be positive")
	case e.UpdatedAt.IsZero():
		return errors.New("updated_at missing")
	case !validRequestID(e.RequestID):
		return errors.New("invalid request_id")
	}
	return nil
}

// deadLetter returns the dead-letter record for rec: the original key, value
// and headers, plus why it was rejected and where it came from.
func (r *replicator) deadLetter(rec *kgo.Record, reason error) *kgo.Record {
	r.logger.Error("consume: undecodable record sent to the dead-letter queue",
		"partition", rec.Partition, "offset", rec.Offset, "reason", reason)
	headers := append([]kgo.RecordHeader(nil), rec.Headers...)
	headers = append(headers,
		kgo.RecordHeader{Key: headerReason, Value: []byte(reason.Error())},
		kgo.RecordHeader{Key: "source", Value: fmt.Appendf(nil, "%s/%d/%d", rec.Topic, rec.Partition, rec.Offset)},
		kgo.RecordHeader{Key: "rejected-by", Value: []byte(r.region)},
	)
	return &kgo.Record{Topic: r.dlqTopic, Key: rec.Key, Value: rec.Value, Headers: headers}
}

// lockForApplySQL reads and locks the local rows a batch touches, in id
// order (the same order every batch locks in), so that a concurrent local PUT
// of one of them waits for the batch, or the batch for the PUT.
const lockForApplySQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at
FROM properties
WHERE id = ANY($1)
ORDER BY id
FOR UPDATE`

// upsertPropertiesSQL writes the winning rows of a batch, one array per
// column.
const upsertPropertiesSQL = `
INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT * FROM unnest($1::bigint[], $2::numeric[], $3::integer[], $4::integer[], $5::varchar[], $6::bigint[], $7::timestamptz[])
ON CONFLICT (id) DO UPDATE
SET price         = EXCLUDED.price,
    bedrooms      = EXCLUDED.bedrooms,
    bathrooms     = EXCLUDED.bathrooms,
    region_origin = EXCLUDED.region_origin,
    version       = EXCLUDED.version,
    updated_at    = EXCLUDED.updated_at`

// applyEvents applies a batch of remote writes inside tx and returns what
// the conflict rule did with each. The rule itself runs in Go (resolve), over
// the locked local rows, event after event; the database then receives the
// winners in one statement and all request ids in another, instead of three
// statements per event. Every request id is recorded, the losers' too: it
// was consumed in the other region whoever won. No outbox row is written: a
// replicated write is not replicated back.
func applyEvents(ctx context.Context, tx *sql.Tx, events []event) ([]outcome, error) {
	if len(events) == 0 {
		return nil, nil
	}
	ids := make([]int64, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.ID)
	}
	rows, err := tx.QueryContext(ctx, lockForApplySQL, ids)
	if err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}
	local := map[int64]Property{}
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("lock rows: %w", err)
		}
		local[p.ID] = p
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}

	outcomes := make([]outcome, len(events))
	winners := map[int64]Property{}
	for i, e := range events {
		var current *Property
		if p, ok := local[e.ID]; ok {
			current = &p
		}
		outcomes[i] = resolve(current, e.Property)
		if outcomes[i].replaces() {
			local[e.ID] = e.Property
			winners[e.ID] = e.Property
		}
	}
	if len(winners) > 0 {
		var c propertyColumns
		for _, p := range winners {
			c.add(p)
		}
		if _, err := tx.ExecContext(ctx, upsertPropertiesSQL, c.args()...); err != nil {
			return nil, fmt.Errorf("upsert rows: %w", err)
		}
	}
	if err := recordReplicatedRequests(ctx, tx, events); err != nil {
		return nil, err
	}
	return outcomes, nil
}

// propertyColumns holds properties column by column, the shape unnest reads.
type propertyColumns struct {
	ids, versions       []int64
	prices, regions     []string
	bedrooms, bathrooms []*int32
	updatedAt           []time.Time
}

// add appends p as one more row.
func (c *propertyColumns) add(p Property) {
	c.ids = append(c.ids, p.ID)
	c.prices = append(c.prices, p.Price.String())
	c.bedrooms = append(c.bedrooms, p.Bedrooms)
	c.bathrooms = append(c.bathrooms, p.Bathrooms)
	c.regions = append(c.regions, p.RegionOrigin)
	c.versions = append(c.versions, p.Version)
	c.updatedAt = append(c.updatedAt, p.UpdatedAt)
}

// args are the columns in the order of the properties table.
func (c *propertyColumns) args() []any {
	return []any{c.ids, c.prices, c.bedrooms, c.bathrooms, c.regions, c.versions, c.updatedAt}
}

// saveWatermarkSQL moves a partition's watermark forward, never back: a
// re-delivered old heartbeat must not make the lag jump.
const saveWatermarkSQL = `
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, applied_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (peer_region, partition) DO UPDATE
SET watermark  = GREATEST(replication_watermarks.watermark, EXCLUDED.watermark),
    partitions = EXCLUDED.partitions,
    applied_at = now()`

// backoff is the wait before retry number attempt: 100ms doubling to
// maxBackoff.
func backoff(attempt int) time.Duration {
	d := 100 * time.Millisecond << min(attempt, 5)
	return min(d, maxBackoff)
}

// sleep waits for d and reports false if ctx was cancelled first.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
