package main

// Replication: every committed write in one region reaches the other through
// Kafka, and both databases converge to identical rows.
//
// A write travels like this (US to EU; EU to US is the mirror image):
//
//  1. A PUT, POST or DELETE in US commits the row, its request id and an
//     outbox row in ONE statement, so one transaction (property.go). Publishing to Kafka
//     from the request instead would either lose the event (crash after
//     commit, before publish) or publish a change that then rolls back. The
//     outbox makes the event as durable as the write.
//  2. The relay (relay.go) reads committed outbox rows in seq order,
//     publishes them to the topic with an idempotent producer (acks=all,
//     key = property id, so one property's events stay in one partition, in
//     order) and deletes them only after Kafka acknowledged them. A crash in
//     between publishes them again: delivery is at least once.
//  3. EU's consumer (consume.go) applies US events by the conflict rule
//     (conflict.go) in one transaction with their request ids and its new
//     position in the topic (apply.go). A crash before the commit
//     re-delivers the batch, and re-applying an event changes nothing: the
//     rule is idempotent.
//
// The conflict rule makes the order of arrival irrelevant: a row is replaced
// only by a write that is greater under (version, updated_at, region_origin),
// a total order that both regions evaluate the same way. Whatever order the
// events arrive in, every database ends with the greatest write of each row.
// A delete is a write too: a tombstone with the next version, which the
// rule orders like any other, so no older event can bring the listing back.
//
// This file holds the replicator, which creates the topics and starts and
// stops the relay, the consumer and the purge (retention.go) together. The
// records they exchange are in records.go.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
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
	// topicRetention is how long an event waits for a region that is down:
	// a region away for longer rejoins from the other one (rejoin.go).
	topicRetention = 7 * 24 * time.Hour
	// topicSegment is how long a segment of the log stays open. Kafka
	// deletes whole segments only, so an event may stay up to
	// topicRetention + topicSegment; stated, so that the bound is known.
	topicSegment = 24 * time.Hour
)

// replicator owns both directions of one region's replication: the relay
// that publishes local writes and the consumer that applies the other
// region's. It holds one producer client, which the relay publishes with and
// the consumer writes dead letters with, for the life of the process.
type replicator struct {
	logger   *slog.Logger
	topic    string
	dlqTopic string
	replicas int // the topics' replication factor
	producer *kgo.Client
	relay    *relay
	consumer *consumer
	// purger expires request ids and tombstones (retention.go).
	purger *purger
	// reports reads the lag report, at most every reportInterval (lag.go).
	reports *sharedReport
	// rejoin finds a database that went back in time, and rebuilds it
	// from the peer (rejoin.go).
	rejoin *rejoiner
	// sessions is the watermark of the peer that session tokens wait for
	// (session.go).
	sessions *peerWatermark
	db       *sql.DB // the replication's pool
}

// newReplicator creates the Kafka clients for region, replicating through
// topic on brokers, with db for replication's own work and reportDB (the
// pool of requests) for the lag report. It does not connect: Kafka may be down at start, and
// writes then wait in the outbox until it is back.
func newReplicator(logger *slog.Logger, db, reportDB *sql.DB, region string, brokers []string, topic string, replicas int, retention time.Duration, peers []string) (*replicator, error) {
	logger = logger.With("component", "replication")
	producer, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		// Idempotent producer (franz-go's default) with acks from all in-sync
		// replicas: a retried batch is written once, and an acknowledged
		// record survives a broker failure.
		kgo.RequiredAcks(kgo.AllISRAcks()),
		// Every record names its partition: the relay places them
		// (relay.go), and a dead letter goes to the queue's only one.
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.MetadataMaxAge(metadataMaxAge),
		// Send at once: the relay already batches, and latency matters.
		kgo.ProducerLinger(0),
		// Uncompressed: a round's records are a few hundred bytes of JSON
		// per partition, too few for compression to pay, and a compressed
		// batch costs the broker a decompression to validate it
		// (docs/benchmarks.md).
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		kgo.RecordDeliveryTimeout(10*time.Second),
	)
	if err != nil {
		return nil, fmt.Errorf("kafka producer: %w", err)
	}
	r := &replicator{
		logger:   logger,
		topic:    topic,
		dlqTopic: topic + ".dlq",
		replicas: replicas,
		producer: producer,
		relay:    newRelay(logger, db, producer, region, topic),
		db:       db,
	}
	r.rejoin = newRejoiner(logger, db, region, topic, peers, brokers, retention, r.topicEnds, r.topicStarts, r.topicOffsetsAt)
	r.purger = newPurger(logger, db, region, retention, r.topicKeeps)
	// A database that went back in time takes the sessions' watermark
	// with it (session.go).
	r.sessions = &peerWatermark{db: reportDB, region: peerOf(region)}
	r.rejoin.rejoined = func() { r.purger.wake(); r.sessions.forget() }
	r.rejoin.restarted = r.sessions.forget
	r.consumer, err = newConsumer(logger, db, producer, region, brokers, topic, r.dlqTopic, retention)
	if err != nil {
		producer.Close()
		return nil, err
	}
	r.consumer.answer = r.relay.answer
	r.sessions.askFn = r.relay.ask
	r.reports = &sharedReport{read: func(ctx context.Context, lag time.Duration) (LagReport, error) {
		if lag > heartbeatInterval {
			// What the last report said, aged, is more than an idle link
			// reads: ask the peer for a heartbeat first. Without an answer
			// (the link is down, or slow), the report says how old what
			// it has is.
			awaitPeer(ctx, reportDB, peerOf(region), askWait, r.relay.ask)
		}
		return readLag(ctx, reportDB, region, r.consumer.started, &r.consumer.stats)
	}}
	return r, nil
}

// notify tells the relay that a local write committed. It never blocks.
func (r *replicator) notify() { r.relay.notify() }

// lagReport is this region's replication lag report (lag.go), read at
// most every reportInterval.
func (r *replicator) lagReport(ctx context.Context) (LagReport, error) {
	return r.reports.get(ctx)
}

// stoppedReason is why replication stopped for good, or "" while it runs.
func (r *replicator) stoppedReason() string { return r.consumer.stoppedReason() }

// produceErrors counts the relay's rounds that failed to publish.
func (r *replicator) produceErrors() int64 { return r.relay.failedRounds.Load() }

// published is how many events this instance's relay has published.
func (r *replicator) published() int64 { return r.relay.published.Load() }

// purgeStats is what the purge has done (retention.go).
func (r *replicator) purgeStats() purgeStats { return r.purger.stats() }

// peerWatermark is the watermark of the peer that session tokens wait
// for (session.go).
func (r *replicator) peerWatermark() *peerWatermark { return r.sessions }

// rejoinStatus is whether the region serves (rejoin.go).
func (r *replicator) rejoinStatus() rejoinStatus { return r.rejoin.current() }

// snapshot serves this region's snapshot to the other one (snapshot.go).
func (r *replicator) snapshot() http.Handler {
	return handleSnapshot(r.logger, r.db, r.topic, r.topicEnds)
}

// topicOffsetsAt reads, for each partition of the topic, the offset of
// the first record produced at or after t, or the end if there is none.
func (r *replicator) topicOffsetsAt(ctx context.Context, t time.Time) (map[int32]int64, error) {
	at, err := listOffsets(ctx, r.producer, r.topic, t.UnixMilli())
	if err != nil {
		return nil, err
	}
	ends, err := endOffsets(ctx, r.producer, r.topic)
	if err != nil {
		return nil, err
	}
	for p, end := range ends {
		if o, ok := at[p]; !ok || o < 0 {
			at[p] = end
		}
	}
	return at, nil
}

// topicName is the replication topic.
func (r *replicator) topicName() string { return r.topic }

// topicEnds and topicStarts read the end and the start of each partition
// of the topic.
func (r *replicator) topicEnds(ctx context.Context) (map[int32]int64, error) {
	return endOffsets(ctx, r.producer, r.topic)
}
func (r *replicator) topicStarts(ctx context.Context) (map[int32]int64, error) {
	return startOffsets(ctx, r.producer, r.topic)
}

// run checks the region's database against its peer (rejoin.go) from the
// start, and creates the topics (retrying until Kafka answers), then
// relays, consumes and purges, until ctx is cancelled. Each loop finishes
// its current batch before it returns; run returns when all have.
func (r *replicator) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { r.rejoin.run(ctx) }) // exits when ctx is cancelled
	partitions, ok := r.ensureTopics(ctx)
	if !ok {
		return
	}
	wg.Go(func() { r.relay.run(ctx, partitions) })    // exits when ctx is cancelled
	wg.Go(func() { r.consumer.run(ctx, partitions) }) // exits when ctx is cancelled
	wg.Go(func() { r.purger.run(ctx) })               // exits when ctx is cancelled
}

// topicKeeps asks the broker how long the topic may keep an event:
// retention.ms plus segment.ms, since Kafka deletes whole segments only (a
// negative retention: forever).
func (r *replicator) topicKeeps(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req := kmsg.NewPtrDescribeConfigsRequest()
	res := kmsg.NewDescribeConfigsRequestResource()
	res.ResourceType = kmsg.ConfigResourceTypeTopic
	res.ResourceName = r.topic
	res.ConfigNames = []string{"retention.ms", "segment.ms"}
	req.Resources = append(req.Resources, res)
	resp, err := req.RequestWith(ctx, r.producer)
	if err != nil {
		return 0, fmt.Errorf("describe topic %s: %w", r.topic, err)
	}
	ms := map[string]int64{}
	for _, rr := range resp.Resources {
		if err := kerr.ErrorForCode(rr.ErrorCode); err != nil {
			return 0, fmt.Errorf("describe topic %s: %w", r.topic, err)
		}
		for _, c := range rr.Configs {
			if c.Value == nil {
				continue
			}
			v, err := strconv.ParseInt(*c.Value, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("topic %s: %s %q", r.topic, c.Name, *c.Value)
			}
			ms[c.Name] = v
		}
	}
	retention, ok1 := ms["retention.ms"]
	segment, ok2 := ms["segment.ms"]
	switch {
	case !ok1 || !ok2:
		return 0, fmt.Errorf("topic %s: retention.ms or segment.ms missing", r.topic)
	case retention < 0:
		return -1, nil
	}
	return time.Duration(retention+segment) * time.Millisecond, nil
}

// close flushes what the producer still holds, leaves the consumer group and
// closes both clients, all within ctx. Call it after run has returned.
//
// franz-go's Close has no deadline of its own: it leaves the group and
// waits until it has, and a broker that is silent (hung, or behind a link
// that drops packets) never answers. So each Close gets what is left of
// ctx, and a client still closing then is left to the process's exit,
// which closes its connections; what it held is in the outbox, or applied.
func (r *replicator) close(ctx context.Context) {
	if err := r.producer.Flush(ctx); err != nil {
		r.logger.Warn("flush producer", "err", err)
	}
	if !returnsWithin(ctx, r.producer.Close) {
		r.logger.Warn("close producer: not closed in time; left to the exit")
	}
	r.consumer.close(ctx)
}

// returnsWithin runs f and waits for it until ctx ends. It reports whether f
// returned; if not, f goes on running, unwaited for.
func returnsWithin(ctx context.Context, f func()) bool {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

// ensureTopics creates the topic and its dead-letter queue if they do not
// exist, and returns the topic's partition count. It retries until Kafka
// answers and reports false only if ctx is cancelled first.
func (r *replicator) ensureTopics(ctx context.Context) (partitions int32, ok bool) {
	for attempt := 0; ; attempt++ {
		n, err := r.createTopics(ctx)
		if err == nil {
			r.logger.Info("topics ready", "topic", r.topic, "partitions", n, "dlq", r.dlqTopic)
			return n, true
		}
		if attempt%10 == 0 {
			r.logger.Warn("kafka not ready; writes wait in the outbox", "err", err)
		}
		if !sleep(ctx, backoff(attempt)) {
			return 0, false
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
		rt.ReplicationFactor = int16(r.replicas)
		for k, v := range map[string]string{
			"cleanup.policy": "delete",
			"retention.ms":   strconv.FormatInt(topicRetention.Milliseconds(), 10),
			"segment.ms":     strconv.FormatInt(topicSegment.Milliseconds(), 10),
			// A write is acknowledged (acks=all) once a majority of the
			// replicas has it: with three, one broker may be lost without
			// losing an acknowledged event or stopping the writes.
			"min.insync.replicas": strconv.Itoa(r.replicas/2 + 1),
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

	return partitionCount(ctx, r.producer, r.topic)
}

// partitionCount asks the brokers how many partitions topic has.
func partitionCount(ctx context.Context, client *kgo.Client, topic string) (int32, error) {
	meta := kmsg.NewPtrMetadataRequest()
	mt := kmsg.NewMetadataRequestTopic()
	mt.Topic = kmsg.StringPtr(topic)
	meta.Topics = append(meta.Topics, mt)
	mresp, err := meta.RequestWith(ctx, client)
	if err != nil {
		return 0, fmt.Errorf("topic metadata: %w", err)
	}
	for _, t := range mresp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil {
			return 0, fmt.Errorf("topic metadata %s: %w", topic, err)
		}
		if len(t.Partitions) > 0 {
			return int32(len(t.Partitions)), nil
		}
	}
	return 0, fmt.Errorf("topic %s has no partitions yet", topic)
}

// endOffsets asks the brokers for the end of each partition of topic: the
// offset the next record appended to it will take.
func endOffsets(ctx context.Context, client *kgo.Client, topic string) (map[int32]int64, error) {
	return listOffsets(ctx, client, topic, -1)
}

// startOffsets asks the brokers for the start of each partition of topic:
// the offset of its oldest retained record.
func startOffsets(ctx context.Context, client *kgo.Client, topic string) (map[int32]int64, error) {
	return listOffsets(ctx, client, topic, -2)
}

// listOffsets asks the brokers for an offset of each partition of topic:
// at -1 the end, at -2 the start, at a time in Unix milliseconds the
// first record produced at or after it (-1 if there is none).
func listOffsets(ctx context.Context, client *kgo.Client, topic string, at int64) (map[int32]int64, error) {
	n, err := partitionCount(ctx, client, topic)
	if err != nil {
		return nil, err
	}
	req := kmsg.NewPtrListOffsetsRequest()
	rt := kmsg.NewListOffsetsRequestTopic()
	rt.Topic = topic
	for p := range n {
		rp := kmsg.NewListOffsetsRequestTopicPartition()
		rp.Partition, rp.Timestamp = p, at
		rt.Partitions = append(rt.Partitions, rp)
	}
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, client)
	if err != nil {
		return nil, fmt.Errorf("list offsets of %s: %w", topic, err)
	}
	ends := map[int32]int64{}
	for _, t := range resp.Topics {
		for _, p := range t.Partitions {
			if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
				return nil, fmt.Errorf("list offsets of %s partition %d: %w", topic, p.Partition, err)
			}
			ends[p.Partition] = p.Offset
		}
	}
	if len(ends) != int(n) {
		return nil, fmt.Errorf("list offsets of %s: %d of %d partitions answered", topic, len(ends), n)
	}
	return ends, nil
}
