//go:build integration

package main

// Events the broker no longer holds: a region that finds a gap in what it
// needs stops, loudly, and is re-seeded from the other region
// (docs/operations.md, "Re-seeding a region").

import (
	"context"
	"database/sql"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TestLostEventsStopReplicationLoudly makes the broker lose events a region
// needs, as a region away for longer than the retention finds: EU is
// stopped, US writes, every record US has read is deleted, and EU comes
// back. EU must not skip ahead as if nothing happened: it stops applying,
// and says so in its lag report, its log and its health (still 200: it
// serves its clients). The clean-up re-seeds EU from US, as docs/operations.md says.
func TestLostEventsStopReplicationLoudly(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	kafka := kafkaAdmin(t)
	s.caughtUp(t, 30*time.Second)
	s.stop(t, "backend-eu", false)
	t.Cleanup(func() { reseed(t, s, kafka, us, eu, "eu") })

	const id = 211
	status, written := s.put(t, "us", id, newRequestID("lost"), 211211_11)
	if status != http.StatusOK {
		t.Fatalf("PUT /us/properties/%d: status %d", id, status)
	}
	waitFor(t, 10*time.Second, "us's outbox to drain", func() bool { return s.lag(t, "us").OutboxBacklog == 0 })
	deleteReadRecords(t, kafka, us)
	s.control(t, "start", "backend-eu")

	var report LagReport
	waitFor(t, 30*time.Second, "eu to say its replication stopped", func() bool {
		status, servedBy, _, err := s.do("GET", "/eu/health", "", "")
		if err != nil || status != http.StatusOK || servedBy != "eu" {
			return false
		}
		report = s.lag(t, "eu")
		return report.ReplicationStopped != ""
	})
	if !strings.Contains(report.ReplicationStopped, "events lost") {
		t.Errorf("eu's lag report: replication_stopped = %q, want the events lost", report.ReplicationStopped)
	}
	status, _, health := s.mustDo(t, "GET", "/eu/health", "", "")
	if status != http.StatusOK || health.ReplicationStopped == "" {
		t.Errorf("GET /eu/health after the loss = %d %+v, want 200 saying replication stopped", status, health)
	}
	if !strings.Contains(s.control(t, "logs", "backend-eu"), `"level":"ERROR","msg":"consume: replication stopped"`) {
		t.Error("eu's log has no error line for the stopped replication")
	}
	got, err := getProperty(context.Background(), eu, id)
	if err != nil || got.Version >= written.Version {
		t.Errorf("property %d in eu after the loss = %+v, %v; want it still before version %d: nothing skipped silently", id, got, err, written.Version)
	}
}

// kafkaAdmin returns a client of the stack's broker for admin requests.
func kafkaAdmin(t *testing.T) *kgo.Client {
	t.Helper()
	client, err := kgo.NewClient(kgo.SeedBrokers(stackBrokers()...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	return client
}

// deleteReadRecords deletes, as retention would, every record of the topic
// that the live region (whose database is live) has read: it reads the
// partitions' ends, waits until live's positions reach them, and moves each
// partition's log start there. A region away since before then finds its
// next events gone; live, which reads on, does not (deleting to the very
// end would catch live too, a heartbeat of its own behind: the fault
// campaign saw it stop).
func deleteReadRecords(t *testing.T, kafka *kgo.Client, live *sql.DB) {
	t.Helper()
	topic := setting("KAFKA_TOPIC", "property-updates")
	ends := topicEnds(t, kafka, topic)
	waitFor(t, 30*time.Second, "the live region to read to the topic's end", func() bool {
		rows, err := live.Query(`SELECT partition, next_offset FROM replication_positions WHERE topic = $1`, topic)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		read := 0
		for rows.Next() {
			var p int32
			var next int64
			if err := rows.Scan(&p, &next); err != nil {
				t.Fatal(err)
			}
			if next >= ends[p] {
				read++
			}
		}
		return read == len(ends)
	})
	req := kmsg.NewPtrDeleteRecordsRequest()
	rt := kmsg.NewDeleteRecordsRequestTopic()
	rt.Topic = topic
	for p, end := range ends {
		rp := kmsg.NewDeleteRecordsRequestTopicPartition()
		rp.Partition, rp.Offset = p, end
		rt.Partitions = append(rt.Partitions, rp)
	}
	req.Topics = append(req.Topics, rt)
	req.TimeoutMillis = 10000
	resp, err := req.RequestWith(context.Background(), kafka)
	if err != nil {
		t.Fatalf("delete records: %v", err)
	}
	for _, topic := range resp.Topics {
		for _, p := range topic.Partitions {
			if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
				t.Fatalf("delete records of partition %d: %v", p.Partition, err)
			}
		}
	}
}

// reseed re-seeds region from the other region, with its backend stopped,
// as docs/operations.md's procedure does: read the topic's end offsets; merge the
// peer's listings and request records in by the conflict rule, forget the
// old watermarks and store those offsets as the region's position, in one
// transaction; start the backend.
func reseed(t *testing.T, s *stack, kafka *kgo.Client, from, to *sql.DB, region string) {
	t.Helper()
	s.control(t, "stop", "backend-"+region)
	topic := setting("KAFKA_TOPIC", "property-updates")
	ends := topicEnds(t, kafka, topic)

	mergeInto(t, from, to, topic, ends)
	s.start(t, "backend-"+region)
	s.caughtUp(t, 60*time.Second)
	waitIdentical(t, from, to, 30*time.Second)
}

// topicEnds returns the end of each partition of topic.
func topicEnds(t *testing.T, kafka *kgo.Client, topic string) map[int32]int64 {
	t.Helper()
	ends, err := endOffsets(context.Background(), kafka, topic)
	if err != nil {
		t.Fatal(err)
	}
	return ends
}

// mergeInto merges from's listings and request records into to by the
// conflict rule, forgets to's watermarks, which were about the events
// before the re-seed, and moves to's position in topic to positions.
func mergeInto(t *testing.T, from, to *sql.DB, topic string, positions map[int32]int64) {
	t.Helper()
	ctx := context.Background()
	tx, err := to.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	var c propertyColumns
	for _, p := range allProperties(t, from) {
		c.add(p)
	}
	if _, err := tx.ExecContext(ctx, upsertPropertiesSQL+`
WHERE (EXCLUDED.version, EXCLUDED.updated_at, EXCLUDED.region_origin COLLATE "C")
    > (properties.version, properties.updated_at, properties.region_origin COLLATE "C")`, c.args()...); err != nil {
		t.Fatalf("merge listings: %v", err)
	}
	rows, err := from.QueryContext(ctx, `SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, request_id, fingerprint FROM processed_requests`)
	if err != nil {
		t.Fatal(err)
	}
	var records []event
	for rows.Next() {
		var e event
		if e.Property, err = scanProperty(rows, &e.RequestID, &e.fingerprint); err != nil {
			t.Fatal(err)
		}
		records = append(records, e)
	}
	rows.Close()
	if err := recordReplicatedRequests(ctx, tx, records); err != nil {
		t.Fatalf("merge request records: %v", err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM replication_watermarks`); err != nil {
		t.Fatal(err)
	}
	for p, next := range positions {
		if _, err := tx.ExecContext(ctx, `
INSERT INTO replication_positions (topic, partition, next_offset) VALUES ($1, $2, $3)
ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset`, topic, p, next); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// topicPartitionCount is topic's partition count, which a test may have
// raised (TestAddedPartitionSkipsNothing).
func topicPartitionCount(t *testing.T, kafka *kgo.Client, topic string) int32 {
	t.Helper()
	n, err := partitionCount(context.Background(), kafka, topic)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
