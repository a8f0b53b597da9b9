//go:build integration

package main

// A region never skips an event of its peer: its position in the topic lives
// in its own database (consume.go), so neither a consumer group Kafka does
// not know (a first start, offsets expired after a week away) nor a
// partition added to the topic makes it start at the end of the log.

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TestExpiredGroupSkipsNothing leaves EU in the state Kafka's offset expiry
// leaves a region that was away for a week: EU is stopped, its consumer
// group deleted, and US writes meanwhile. Started again, EU must apply every
// one of those writes. A consumer that trusts the group's offsets finds
// none, starts at the end of the log, and never sees them.
func TestExpiredGroupSkipsNothing(t *testing.T) {
	s := newStack(t)
	kafka := kafkaAdmin(t)
	s.caughtUp(t, 30*time.Second)
	s.stop(t, "backend-eu", false)
	t.Cleanup(func() { s.start(t, "backend-eu") })
	deleteGroup(t, kafka, "property-replicator-eu")

	var written []response
	for i := range int64(5) {
		id := 230 + i
		status, w := s.put(t, "us", id, newRequestID("expired-group"), Money(230230_00+i))
		if status != http.StatusOK {
			t.Fatalf("PUT /us/properties/%d: status %d", id, status)
		}
		written = append(written, w)
	}
	waitFor(t, 10*time.Second, "us's outbox to drain", func() bool { return s.lag(t, "us").OutboxBacklog == 0 })
	s.start(t, "backend-eu")
	for _, w := range written {
		s.waitReplicated(t, "eu", w.Property, 30*time.Second)
	}
	s.caughtUp(t, 30*time.Second)
}

// TestWritesBeforeConsumersJoinConverge writes one listing in both regions
// at once on a stack whose consumer groups Kafka has never seen, as on the
// first start of a fresh stack: the writes land before either consumer has
// joined its group. Each region must still get the other's write, and both
// end with the same row.
func TestWritesBeforeConsumersJoinConverge(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	kafka := kafkaAdmin(t)
	s.caughtUp(t, 30*time.Second)
	for _, region := range []string{"us", "eu"} {
		s.stop(t, "backend-"+region, false)
	}
	for _, region := range []string{"us", "eu"} {
		deleteGroup(t, kafka, "property-replicator-"+region)
	}
	const id = 221
	base, err := getProperty(context.Background(), us, id)
	if err != nil {
		t.Fatal(err)
	}
	// Both at once, and then their first writes, before either consumer
	// has had the time to join its group.
	for _, region := range []string{"us", "eu"} {
		s.control(t, "start", "backend-"+region)
	}
	for _, region := range []string{"us", "eu"} {
		waitFor(t, 30*time.Second, region+" healthy and served by "+region, func() bool {
			status, servedBy, _, err := s.do("GET", "/"+region+"/health", "", "")
			return err == nil && status == http.StatusOK && servedBy == region
		})
	}
	// At once, each in its own region, on the version both hold.
	var wg sync.WaitGroup
	for _, region := range []string{"us", "eu"} {
		wg.Go(func() {
			body := fmt.Sprintf(`{"price": %d, "version": %d}`, 221221, base.Version)
			status, servedBy, _, err := s.do("PUT", "/"+region+"/properties/"+strconv.Itoa(id), newRequestID("before-join-"+region), body)
			if err != nil || status != http.StatusOK || servedBy != region {
				t.Errorf("PUT /%s/properties/%d: %d from %s, %v; want 200 from %s", region, id, status, servedBy, err, region)
			}
		})
	}
	wg.Wait()
	waitIdentical(t, us, eu, 60*time.Second)
	s.caughtUp(t, 30*time.Second)
}

// TestAddedPartitionSkipsNothing adds a partition to the topic while both
// regions run, and writes in US listings whose events go to it. EU must apply
// them, and its lag must count the new partition: it waits for a watermark
// from it, so that a write there cannot hide behind the others'.
func TestAddedPartitionSkipsNothing(t *testing.T) {
	s := newStack(t)
	eu := stackDB(t, "eu")
	kafka := kafkaAdmin(t)
	topic := setting("KAFKA_TOPIC", "property-updates")
	s.caughtUp(t, 30*time.Second)
	ctx := context.Background()
	n, err := partitionCount(ctx, kafka, topic)
	if err != nil {
		t.Fatal(err)
	}
	addPartitions(t, kafka, topic, n+1)

	// Listings whose key hashes to the new partition, as the relay places
	// them.
	byKey := kgo.StickyKeyPartitioner(nil).ForTopic(topic)
	var ids []int64
	for id := int64(240); len(ids) < 3; id++ {
		if byKey.Partition(&kgo.Record{Key: []byte(strconv.FormatInt(id, 10))}, int(n+1)) == int(n) {
			ids = append(ids, id)
		}
	}
	// Writes from the moment the partition exists until well after every
	// client has read the topic's metadata again (metadataMaxAge).
	var written []response
	deadline := time.Now().Add(metadataMaxAge + 2*time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		id := ids[i%len(ids)]
		status, w := s.put(t, "us", id, newRequestID("added-partition"), Money(240240_00+int64(i)))
		if status != http.StatusOK {
			t.Fatalf("PUT /us/properties/%d: status %d", id, status)
		}
		written = append(written, w)
		time.Sleep(500 * time.Millisecond)
	}
	for _, w := range written[len(written)-len(ids):] {
		s.waitReplicated(t, "eu", w.Property, 30*time.Second)
	}
	waitFor(t, 30*time.Second, fmt.Sprintf("eu to hold a US watermark from partition %d and to count %d partitions", n, n+1), func() bool {
		var got, count int
		err := eu.QueryRow(`SELECT count(*) FILTER (WHERE partition = $1), coalesce(min(partitions), 0)
		                    FROM replication_watermarks WHERE peer_region = 'us'`, n).Scan(&got, &count)
		return err == nil && got == 1 && count == int(n+1)
	})
	s.caughtUp(t, 30*time.Second)
	if records := eventsIn(t, kafka, topic, n); records == 0 {
		t.Errorf("no event of US reached partition %d: the test wrote to the old partitions only", n)
	}
}

// deleteGroup deletes a consumer group with no members, as Kafka does when
// its offsets expire; a member that left a moment ago may still count, so it
// tries for a while.
func deleteGroup(t *testing.T, kafka *kgo.Client, group string) {
	t.Helper()
	waitFor(t, 30*time.Second, "consumer group "+group+" to be deleted", func() bool {
		return deleteGroupOnce(kafka, group) == nil
	})
}

// deleteGroupOnce asks the broker to delete group; a group that does not
// exist is deleted already.
func deleteGroupOnce(kafka *kgo.Client, group string) error {
	req := kmsg.NewPtrDeleteGroupsRequest()
	req.Groups = []string{group}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, kafka)
	if err != nil {
		return err
	}
	for _, g := range resp.Groups {
		if err := kerr.ErrorForCode(g.ErrorCode); err != nil && err != kerr.GroupIDNotFound {
			return fmt.Errorf("delete group %s: %w", group, err)
		}
	}
	return nil
}

// addPartitions raises topic's partition count to n.
func addPartitions(t *testing.T, kafka *kgo.Client, topic string, n int32) {
	t.Helper()
	if err := setPartitionCount(kafka, topic, n); err != nil {
		t.Fatal(err)
	}
}

// setPartitionCount raises topic's partition count to n.
func setPartitionCount(kafka *kgo.Client, topic string, n int32) error {
	req := kmsg.NewPtrCreatePartitionsRequest()
	rt := kmsg.NewCreatePartitionsRequestTopic()
	rt.Topic, rt.Count = topic, n
	req.Topics = append(req.Topics, rt)
	req.TimeoutMillis = 10000
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, kafka)
	if err != nil {
		return fmt.Errorf("create partitions: %w", err)
	}
	for _, r := range resp.Topics {
		if err := kerr.ErrorForCode(r.ErrorCode); err != nil {
			return fmt.Errorf("create partitions of %s: %w", r.Topic, err)
		}
	}
	return nil
}

// eventsIn counts the event records in one partition of topic.
func eventsIn(t *testing.T, kafka *kgo.Client, topic string, partition int32) int {
	t.Helper()
	seeds := kafka.OptValue(kgo.SeedBrokers).([]string)
	reader, err := kgo.NewClient(kgo.SeedBrokers(seeds...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {partition: kgo.NewOffset().AtStart()}}))
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	events := 0
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		reader.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			if header(r, headerKind) == kindEvent {
				events++
			}
		})
	}
	return events
}

// TestRestoredPositionsAreReadAgain takes EU's database back to a backup,
// under its running backend, after US wrote 10 listings that EU had
// applied; EU wrote nothing since, so it has nothing to rejoin for. Its
// positions went back with its rows, while its consumer had read on: it
// must read those records again, not save its own positions over the
// restored ones. A consumer that did would leave EU without US's writes
// for good, with a lag report of 0 (seen in the 10-minute fault campaign).
func TestRestoredPositionsAreReadAgain(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	backupDB(t, eu)
	for i := range 10 {
		id := int64(451 + i)
		if status, got := s.put(t, "us", id, newRequestID("restored-positions"), Money(451_00+i)); status != http.StatusOK {
			t.Fatalf("PUT /us/properties/%d = %d %+v", id, status, got)
		}
	}
	s.caughtUp(t, 30*time.Second)
	restoreDB(t, eu)
	// One more, so that EU's consumer has a batch to apply whatever the
	// heartbeats do.
	if status, got := s.put(t, "us", 461, newRequestID("restored-positions"), 461_00); status != http.StatusOK {
		t.Fatalf("PUT /us/properties/461 = %d %+v", status, got)
	}
	waitIdentical(t, us, eu, 30*time.Second)
	if !strings.Contains(s.control(t, "logs", "backend-eu"), "reading again from its positions") {
		t.Error("eu's log does not say its consumer read again from the restored positions")
	}
}
