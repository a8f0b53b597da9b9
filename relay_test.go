//go:build integration

package main

// The relay after a long outage of Kafka: whatever the backlog, it drains.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// TestRelayDrainsAfterLongOutage gives the relay a backlog that a statement
// reading the whole outbox cannot get through within the statement timeout,
// as hours of Kafka outage leave (21 M rows against the service's 4 s at
// 1,000 writes/s; here 600 k rows against 40 ms). Every statement of a round
// must cost O(log n) in the backlog, or every round fails and the outbox
// never drains. Heartbeats must keep flowing too, with a watermark no later
// than the oldest event still waiting.
func TestRelayDrainsAfterLongOutage(t *testing.T) {
	const queued, drained = 600_000, 20 * relayBatchSize
	testDB(t) // fails the test, saying why, without a scratch database
	// Without the request pool's statement timeout: the backlog takes a
	// few seconds to write.
	db, err := openDB(scratchURL, 2, sessionLimits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	fillOutbox(t, db, queued)
	relayDB, err := openDB(scratchURL, replicationConns, sessionLimits{lock: time.Second, statement: 40 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relayDB.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := db.ExecContext(ctx, `ANALYZE outbox`); err != nil {
		t.Fatal(err)
	}

	topic := fmt.Sprintf("test-long-outage-%d", time.Now().UnixNano())
	brokers := stackBrokers()
	rep, err := newReplicator(slog.New(slog.NewTextHandler(io.Discard, nil)), relayDB, relayDB, "us", brokers, topic, 1, defaultRetention, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.close(context.Background()) })
	partitions, ok := rep.ensureTopics(ctx)
	if !ok {
		t.Fatal("ensureTopics gave up")
	}
	var wg sync.WaitGroup
	wg.Go(func() { rep.relay.run(ctx, partitions) })
	t.Cleanup(func() { cancel(); wg.Wait() })

	waitFor(t, 60*time.Second, fmt.Sprintf("the relay to publish %d events of a backlog of %d", drained, queued), func() bool {
		var left int
		if err := db.QueryRow(`SELECT count(*) FROM outbox`).Scan(&left); err != nil {
			t.Fatal(err)
		}
		return left <= queued-drained
	})
	cancel()
	wg.Wait()
	var left int
	if err := db.QueryRow(`SELECT count(*) FROM outbox`).Scan(&left); err != nil {
		t.Fatal(err)
	}
	published := queued - left

	// The heartbeats of those rounds vouch for no event still waiting: the
	// events are numbered by time, a millisecond apart, from 2026-06-01.
	reader, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reader.Close)
	var events, heartbeats int
	var latest time.Time
	waitFor(t, 30*time.Second, "the rounds' events and heartbeats", func() bool {
		pollCtx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		reader.PollFetches(pollCtx).EachRecord(func(r *kgo.Record) {
			m, err := decodeMessage(r)
			switch {
			case err != nil:
				t.Errorf("record: %v", err)
			case m.heartbeat != nil:
				heartbeats++
				if m.heartbeat.Watermark.After(latest) {
					latest = m.heartbeat.Watermark
				}
			default:
				events++
			}
		})
		return events >= published && heartbeats >= int(partitions)
	})
	// The oldest event still waiting is number published+1.
	if limit := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(published+1) * time.Millisecond); latest.After(limit) {
		t.Errorf("a heartbeat's watermark %v is past events still in the outbox (%v)", latest, limit)
	}
}
