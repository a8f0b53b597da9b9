//go:build integration

package main

// Heartbeats on the running stack: their watermark never vouches for a write
// that is not in Kafka yet, and they flow under a load that fills every
// relay round.

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// TestLagCoversWritesInProgress holds a US write open in its transaction:
// its row carries the time the transaction started, and it may commit at any
// moment. Until it has reached EU, EU's lag must not read about 0 for a time
// before it, so EU's lag grows while it is held.
func TestLagCoversWritesInProgress(t *testing.T) {
	s := newStack(t)
	// As the backends' role: a write is the service's, and the relay sees
	// the transactions of its own role.
	us := serviceDB(t, "us")
	s.caughtUp(t, 30*time.Second)
	const id = 210
	p := s.current(t, "us", id)
	ctx := context.Background()
	tx, err := us.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	requestID := newRequestID("in-progress")
	written, err := scanProperty(tx.QueryRowContext(ctx, updatePropertySQL,
		requestID, strings.Repeat("0", 64), id, p.Version, Money(210210_10), nil, nil, "us", nil))
	if err != nil {
		t.Fatalf("the write held open: %v", err)
	}
	waitFor(t, 15*time.Second, "eu's lag to grow past 2s while a us write is in progress", func() bool {
		return s.lag(t, "eu").LagSeconds > 2
	})
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	s.waitReplicated(t, "eu", written, 20*time.Second)
	s.caughtUp(t, 30*time.Second)
}

// TestFullRelayRoundSendsHeartbeat runs a relay over an outbox of more than
// one round's events, against the real broker and a topic of its own: the
// first, full, round must still send heartbeats, with a watermark no later
// than the oldest event it leaves behind.
func TestFullRelayRoundSendsHeartbeat(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	const queued = relayBatchSize + 200
	fillOutbox(t, db, queued)
	topic := fmt.Sprintf("test-full-round-%d", time.Now().UnixNano())
	brokers := stackBrokers()
	rep, err := newReplicator(slog.New(slog.NewTextHandler(io.Discard, nil)), db, db, "us", brokers, topic, 1, defaultRetention, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.close(ctx) })
	partitions, ok := rep.ensureTopics(ctx)
	if !ok {
		t.Fatal("ensureTopics gave up")
	}
	// As the relay does, retry a round that failed (the first produce to a
	// new topic waits for its metadata); a failed round may still have
	// published, so the reader below counts at least, not exactly.
	var full bool
	rep.relay.partitions = partitions
	waitFor(t, 30*time.Second, "a relay round to publish", func() bool {
		// Each attempt as the first: a failed round makes the next one go
		// without heartbeats, and this test is about a full round's.
		rep.relay.heartbeatFailed = false
		var locked bool
		full, locked, err = rep.relay.publishRound(ctx)
		return err == nil && locked
	})
	if !full {
		t.Fatalf("publishRound over %d events was not full", queued)
	}
	// The oldest event left behind is the one after the round's last.
	oldestLeft := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC).Add((relayBatchSize + 1) * time.Millisecond)

	reader, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reader.Close)
	var events, heartbeats int
	waitFor(t, 30*time.Second, "the full round's events and heartbeats", func() bool {
		pollCtx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		reader.PollFetches(pollCtx).EachRecord(func(r *kgo.Record) {
			m, err := decodeMessage(r)
			switch {
			case err != nil:
				t.Errorf("record of the full round: %v", err)
			case m.heartbeat != nil:
				heartbeats++
				if m.heartbeat.Watermark.After(oldestLeft) {
					t.Errorf("heartbeat watermark %v is later than the oldest event left behind, %v", m.heartbeat.Watermark, oldestLeft)
				}
			default:
				events++
			}
		})
		return events >= relayBatchSize && heartbeats >= int(partitions)
	})
}

// fillOutbox replaces the scratch database's outbox (other tests leave their
// writes there) with n events of old writes, each a millisecond after the
// last from 2026-06-01, and their request records.
func fillOutbox(t testing.TB, db *sql.DB, n int) {
	t.Helper()
	ctx := context.Background()
	if _, err := db.ExecContext(ctx, `DELETE FROM outbox`); err != nil {
		t.Fatal(err)
	}
	for _, table := range []string{"processed_requests", "outbox"} {
		_, err := db.ExecContext(ctx, `
INSERT INTO `+table+` (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT 'full-round-' || i, repeat('0', 64), 1 + i % 500, 1000, NULL, NULL, 'us', 1000 + i,
       TIMESTAMPTZ '2026-06-01 00:00:00+00' + i * interval '1 millisecond'
FROM generate_series(1, $1) AS i`, n)
		if err != nil {
			t.Fatalf("fill %s: %v", table, err)
		}
	}
	if _, err := db.ExecContext(ctx, `UPDATE outbox SET created_at = updated_at`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.ExecContext(ctx, `DELETE FROM outbox`)
		db.ExecContext(ctx, `DELETE FROM processed_requests WHERE request_id LIKE 'full-round-%'`)
	})
}
