//go:build integration

package main

// Events the broker no longer holds: a region that finds a gap in what it
// needs says so, loudly, and rejoins from the other region (rejoin.go),
// never skipping ahead as if nothing happened.

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

// TestLostEventsRejoinLoudly makes the broker lose events a region needs,
// as a region away for longer than the retention finds: EU is stopped, US
// writes, every record US has read is deleted, and EU comes back. EU must
// not skip ahead: it says so in its log, stops serving until it has
// rejoined from a snapshot of US, and then holds US's write.
func TestLostEventsRejoinLoudly(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	kafka := kafkaAdmin(t)
	s.caughtUp(t, 30*time.Second)
	s.stop(t, "backend-eu", false)

	const id = 211
	status, written := s.put(t, "us", id, newRequestID("lost"), 211211_11)
	if status != http.StatusOK {
		t.Fatalf("PUT /us/properties/%d: status %d", id, status)
	}
	waitFor(t, 10*time.Second, "us's outbox to drain", func() bool { return s.lag(t, "us").OutboxBacklog == 0 })
	deleteReadRecords(t, kafka, us)
	logged := len(s.control(t, "logs", "backend-eu"))
	s.start(t, "backend-eu")

	// EU serves from its start, as a region with a backlog does (its lag
	// says how far behind it is), until its consumer finds the gap.
	waitFor(t, 30*time.Second, "eu's log to say the events were lost, and then that it rejoined", func() bool {
		return rejoinedAfterLoss(s.control(t, "logs", "backend-eu"), logged)
	})
	got, err := getProperty(context.Background(), eu, id)
	if err != nil || got.Version != written.Version || got.Price != written.Price {
		t.Errorf("property %d in eu after the rejoin = %+v, %v; want US's write %+v", id, got, err, written.Property)
	}
	waitIdentical(t, us, eu, 30*time.Second)
	s.caughtUp(t, 30*time.Second)
	if r := s.lag(t, "eu"); r.ReplicationStopped != "" {
		t.Errorf("eu still says its replication stopped after the rejoin: %q", r.ReplicationStopped)
	}
}

// rejoinedAfterLoss reports whether EU's backend's log, from byte from on
// (what it had logged before the test's loss), says its consumer found
// events lost, at error level, and later that the region rejoined.
func rejoinedAfterLoss(log string, from int) bool {
	if from > len(log) {
		from = 0 // the log was rotated meanwhile
	}
	log = log[from:]
	lost := strings.LastIndex(log, `"level":"ERROR","msg":"consume: replication stopped","region":"eu","component":"replication","reason":"events lost`)
	return lost >= 0 && strings.LastIndex(log, `"msg":"rejoin: done; serving again"`) > lost
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

// topicEnds returns the end of each partition of topic.
func topicEnds(t *testing.T, kafka *kgo.Client, topic string) map[int32]int64 {
	t.Helper()
	ends, err := endOffsets(context.Background(), kafka, topic)
	if err != nil {
		t.Fatal(err)
	}
	return ends
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
