//go:build integration

package main

// The dead-letter queue on the running stack: a record that cannot be
// decoded, and an event the database refuses, each go there alone, and
// replication goes on.

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kgo"
)

func TestPoisonRecordGoesToDLQ(t *testing.T) {
	s := newStack(t)
	dlq := dlqReader(t)
	topic := setting("KAFKA_TOPIC", "property-updates")
	poison := fmt.Sprintf(`{"id": 7, "price": "not a number", "token": %q`, newRequestID("poison"))
	rec := &kgo.Record{Topic: topic, Key: []byte("7"), Value: []byte(poison), Headers: recordHeaders(kindEvent, "us")}
	if err := dlq.ProduceSync(context.Background(), rec).FirstErr(); err != nil {
		t.Fatalf("produce the poison record: %v", err)
	}

	// EU, the region that applies US events, rejects it into the DLQ.
	dead := waitDeadLetter(t, dlq, "the poison record", func(r *kgo.Record) bool {
		return string(r.Value) == poison && header(r, "rejected-by") == "eu"
	})
	if reason := header(dead, headerReason); !strings.HasPrefix(reason, "event: ") {
		t.Errorf("dead letter reason = %q, want the decoding error", reason)
	}
	if source := header(dead, "source"); !strings.HasPrefix(source, topic+"/") {
		t.Errorf("dead letter source = %q, want %s/partition/offset", source, topic)
	}

	// Consumption went on: the next good write still arrives.
	status, written := s.put(t, "us", 7, newRequestID("after-poison"), 707070_70)
	if status != http.StatusOK {
		t.Fatalf("PUT /us/properties/7 after the poison record: status %d", status)
	}
	got := s.waitReplicated(t, "eu", written.Property, 10*time.Second)
	if diff := cmp.Diff(written.Property, got.Property); diff != "" {
		t.Errorf("property 7 in eu after the poison record (-written +served):\n%s", diff)
	}
}

// TestEventRefusedByDatabaseGoesToDLQ gives EU's database a rule the service
// does not know, and writes in US an event that breaks it: one the decoder
// accepts and the database refuses (SQLSTATE 23514). After a few tries it
// goes to the dead-letter queue, alone, and replication goes on.
func TestEventRefusedByDatabaseGoesToDLQ(t *testing.T) {
	s := newStack(t)
	eu := stackDB(t, "eu")
	dlq := dlqReader(t)
	const refused, other = 208, 209
	if _, err := eu.Exec(`ALTER TABLE properties ADD CONSTRAINT refuse_test_price CHECK (price <> 424242.42) NOT VALID`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := eu.Exec(`ALTER TABLE properties DROP CONSTRAINT IF EXISTS refuse_test_price`); err != nil {
			t.Errorf("drop the test's constraint: %v", err)
		}
		// A later write of the property brings both regions together again.
		_, written := s.put(t, "us", refused, newRequestID("after-refusal"), 525252_52)
		s.waitReplicated(t, "eu", written.Property, 20*time.Second)
	})

	requestID := newRequestID("refused")
	if status, got := s.put(t, "us", refused, requestID, 424242_42); status != http.StatusOK {
		t.Fatalf("PUT /us/properties/%d: status %d (%+v), want 200", refused, status, got)
	}
	dead := waitDeadLetter(t, dlq, "the refused event", func(r *kgo.Record) bool {
		return strings.Contains(string(r.Value), requestID) && header(r, "rejected-by") == "eu"
	})
	if reason := header(dead, headerReason); !strings.Contains(reason, "refused by the database") || !strings.Contains(reason, "23514") {
		t.Errorf("dead letter reason = %q, want the database's refusal (SQLSTATE 23514)", reason)
	}
	status, written := s.put(t, "us", other, newRequestID("after-refused"), 313131_31)
	if status != http.StatusOK {
		t.Fatalf("PUT /us/properties/%d: status %d", other, status)
	}
	s.waitReplicated(t, "eu", written.Property, 20*time.Second)
}

// dlqReader returns a Kafka client that reads the dead-letter queue from its
// start (and may produce, too).
func dlqReader(t *testing.T) *kgo.Client {
	t.Helper()
	client, err := kgo.NewClient(
		kgo.SeedBrokers(stackBrokers()...),
		kgo.ConsumeTopics(setting("KAFKA_TOPIC", "property-updates")+".dlq"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	return client
}

// waitDeadLetter reads the dead-letter queue until a record that match
// accepts, and returns it.
func waitDeadLetter(t *testing.T, dlq *kgo.Client, what string, match func(*kgo.Record) bool) *kgo.Record {
	t.Helper()
	var dead *kgo.Record
	waitFor(t, 60*time.Second, what+" in the dead-letter queue", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		dlq.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			if match(r) {
				dead = r
			}
		})
		return dead != nil
	})
	return dead
}
