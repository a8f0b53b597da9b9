//go:build integration

package main

// RETENTION against what the topic may keep: an unsafe setting pauses the
// purge, loudly, and never stops the service (retention.go).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TestShortRetentionPausesThePurge starts the service with a retention
// shorter than the stack's topic may keep an event: it runs and serves, and
// says at error level and in its metrics that the purge is paused, instead
// of purging request ids and tombstones that events still in Kafka could
// need (or refusing to start, which made every region crash-loop at its next
// restart after an operator raised the topic's retention).
func TestShortRetentionPausesThePurge(t *testing.T) {
	testDB(t)
	env := map[string]string{"REGION": "us", "PORT": "18932", "DATABASE_URL": scratchURL,
		"KAFKA_BROKER": setting("STACK_KAFKA", "localhost:9092"), "RETENTION": "1h", "PEER_URL": "http://127.0.0.1:1",
		// A topic of its own: on the stack's, this scratch database would be
		// a US database behind what US published, and rejoin (rejoin.go).
		"KAFKA_TOPIC": fmt.Sprintf("short-retention-%d", time.Now().UnixNano())}
	ctx, cancel := context.WithCancel(context.Background())
	var logs syncBuffer
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = run(ctx, nil, func(k string) string { return env[k] }, &logs) })
	defer func() {
		cancel()
		wg.Wait()
		if runErr != nil {
			t.Errorf("run: %v", runErr)
		}
	}()
	waitFor(t, 30*time.Second, "the service to say its purge is paused", func() bool {
		resp, err := http.Get("http://localhost:18932/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(body), "\nlisting_purge_paused 1\n")
	})
	if !strings.Contains(logs.String(), `"level":"ERROR","msg":"purge: paused"`) {
		t.Error("no error line in the log for the paused purge")
	}
	// It serves all the same: once it has waited for its peer (none here)
	// for peerCatchUpWait (rejoin.go).
	waitFor(t, 2*peerCatchUpWait, "GET /us/health to answer 200 with the purge paused", func() bool {
		resp, err := http.Get("http://localhost:18932/us/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// syncBuffer is a bytes.Buffer that a logger and a test may use at once.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestPurgePausesOnUnsafeTopic: the topic's settings are read at every
// round. Raised so that the topic may keep events longer than RETENTION,
// the purge pauses (saying why) and purges nothing; the region keeps
// serving. Lowered again, the purge resumes. Against the real broker, on a
// topic of the test's own.
func TestPurgePausesOnUnsafeTopic(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	replicatedUntil(t, db, time.Now())
	topic := fmt.Sprintf("test-purge-pause-%d", time.Now().UnixNano())
	brokers := stackBrokers()
	rep, err := newReplicator(slog.New(slog.NewTextHandler(io.Discard, nil)), db, db, "us", brokers, topic, 1, defaultRetention, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.close(ctx) })
	if _, ok := rep.ensureTopics(ctx); !ok {
		t.Fatal("ensureTopics gave up")
	}
	kafka := kafkaAdmin(t)
	alterTopic(t, kafka, topic, map[string]*string{"retention.ms": millis(30 * 24 * time.Hour)})
	waitFor(t, 10*time.Second, "the purge to pause", func() bool {
		return rep.purger.round(ctx) == nil && rep.purgeStats().Paused != ""
	})
	// The old request id is written only once the broker answers with the
	// new setting (it applies an altered config a moment later), so that a
	// round that still read the old one cannot have purged it.
	if _, err := db.ExecContext(ctx, `
INSERT INTO processed_requests (request_id, fingerprint, property_id, price, region_origin, version, updated_at, processed_at)
VALUES ('pause-old', 'f', 1, 1, 'us', 2, now(), now() - interval '20 days')`); err != nil {
		t.Fatal(err)
	}
	if err := rep.purger.round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rep.purgeStats(); got.RequestIDs != 0 || !strings.Contains(got.Paused, "RETENTION") {
		t.Errorf("paused purge: %+v, want nothing purged and why", got)
	}
	alterTopic(t, kafka, topic, map[string]*string{"retention.ms": millis(topicRetention)})
	waitFor(t, 10*time.Second, "the purge to resume", func() bool {
		return rep.purger.round(ctx) == nil && rep.purgeStats().Paused == ""
	})
	if got := rep.purgeStats(); got.RequestIDs != 1 {
		t.Errorf("resumed purge: %+v, want the old request id purged", got)
	}
}

// millis is a duration as a topic config's value: whole milliseconds.
func millis(d time.Duration) *string {
	return kmsg.StringPtr(strconv.FormatInt(d.Milliseconds(), 10))
}

// alterTopic sets a topic's own configs; a nil value removes the topic's
// own, and the broker's default applies again.
func alterTopic(t *testing.T, kafka *kgo.Client, topic string, configs map[string]*string) {
	t.Helper()
	req := kmsg.NewPtrIncrementalAlterConfigsRequest()
	res := kmsg.NewIncrementalAlterConfigsRequestResource()
	res.ResourceType = kmsg.ConfigResourceTypeTopic
	res.ResourceName = topic
	for name, value := range configs {
		c := kmsg.NewIncrementalAlterConfigsRequestResourceConfig()
		c.Name, c.Value = name, value
		if value == nil {
			c.Op = kmsg.IncrementalAlterConfigOpDelete
		}
		res.Configs = append(res.Configs, c)
	}
	req.Resources = append(req.Resources, res)
	resp, err := kafka.Request(context.Background(), req)
	if err != nil {
		t.Fatalf("alter %s's configs %v: %v", topic, slices.Sorted(maps.Keys(configs)), err)
	}
	for _, r := range resp.(*kmsg.IncrementalAlterConfigsResponse).Resources {
		if err := kerr.ErrorForCode(r.ErrorCode); err != nil {
			t.Fatalf("alter %s's configs %v: %v", topic, slices.Sorted(maps.Keys(configs)), err)
		}
	}
}
