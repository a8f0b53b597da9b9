//go:build integration

package main

// Replication against the running stack: writes cross in both directions,
// concurrent writes converge, and neither a Kafka outage, a crash nor a
// poison record loses an acknowledged write. The harness is in stack_test.go.

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func TestReplicationBothWays(t *testing.T) {
	s := newStack(t)
	tests := []struct {
		name     string
		from, to string
		id       int64
	}{
		{"us_to_eu", "us", "eu", 201},
		{"eu_to_us", "eu", "us", 202},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requestID := newRequestID("both-ways-" + tt.from)
			status, written := s.put(t, tt.from, tt.id, requestID, 654321_09)
			if status != http.StatusOK {
				t.Fatalf("PUT in %s: status %d (%+v)", tt.from, status, written)
			}
			got := s.waitReplicated(t, tt.to, written.Property, 10*time.Second)
			if diff := cmp.Diff(written.Property, got.Property); diff != "" {
				t.Errorf("property %d in %s after replication (-written in %s +served by %s):\n%s", tt.id, tt.to, tt.from, tt.to, diff)
			}

			// The request id travelled too: a retry in the other region is a 422.
			status, _, dup := s.mustDo(t, "PUT", fmt.Sprintf("/%s/properties/%d", tt.to, tt.id), requestID,
				fmt.Sprintf(`{"price": 654321.09, "version": %d}`, written.Version-1))
			want := response{Error: "duplicate request", RequestID: requestID, OriginalResponse: ptr(written.Property)}
			if status != http.StatusUnprocessableEntity {
				t.Errorf("retry of %s in %s: status %d, want 422", requestID, tt.to, status)
			}
			if diff := cmp.Diff(want, dup); diff != "" {
				t.Errorf("retry of %s in %s: body mismatch (-want +got):\n%s", requestID, tt.to, diff)
			}
		})
	}
}

func TestConvergenceUnderConcurrentWrites(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	before := [2]int64{s.lag(t, "us").Conflicts, s.lag(t, "eu").Conflicts}

	const workers, putsEach = 6, 40 // per region
	acked, counts, err := s.writeConcurrently(601, 50, workers, putsEach)
	if err != nil {
		t.Fatalf("a client failed: %v", err)
	}
	t.Logf("%d PUTs: statuses %v", 2*workers*putsEach, counts)
	if counts[http.StatusOK]+counts[http.StatusConflict] != 2*workers*putsEach {
		t.Errorf("statuses %v: want only 200 and 409", counts)
	}

	s.caughtUp(t, 60*time.Second)
	final := waitIdentical(t, us, eu, 30*time.Second)
	assertNoneLost(t, final, acked)
	conflicts := s.lag(t, "us").Conflicts - before[0] + s.lag(t, "eu").Conflicts - before[1]
	t.Logf("%d writes acknowledged; %d cross-region conflicts resolved; %d rows identical in both regions", len(acked), conflicts, len(final))
}

// writeConcurrently runs workers clients in each region, each sending
// putsEach PUTs to random properties among ids from firstID, from the version
// it has just read. It returns the acknowledged writes and the count of each
// status, or the first transport error.
func (s *stack) writeConcurrently(firstID int64, ids, workers, putsEach int) (acked []Property, counts map[int]int, err error) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	counts = map[int]int{}
	for r, region := range []string{"us", "eu"} {
		for w := range workers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(w), uint64(r)))
				for i := range putsEach {
					path := fmt.Sprintf("/%s/properties/%d", region, firstID+int64(rng.IntN(ids)))
					_, _, cur, gerr := s.do("GET", path, "", "")
					var status int
					var got response
					if gerr == nil {
						status, _, got, gerr = s.do("PUT", path, newRequestID(fmt.Sprintf("converge-%s-%d-%d", region, w, i)),
							fmt.Sprintf(`{"price": %d.%02d, "version": %d}`, 100000+rng.IntN(900000), rng.IntN(100), cur.Version))
					}
					mu.Lock()
					if gerr != nil {
						if err == nil {
							err = gerr
						}
						mu.Unlock()
						return
					}
					counts[status]++
					if status == http.StatusOK {
						acked = append(acked, got.Property)
					}
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	return acked, counts, err
}

// assertNoneLost checks every acknowledged write against the converged
// rows: it is either the final row or lost to a greater one under the
// conflict rule. None vanished in favour of a lesser write.
func assertNoneLost(t *testing.T, final, acked []Property) {
	t.Helper()
	byID := map[int64]Property{}
	for _, p := range final {
		byID[p.ID] = p
	}
	for _, w := range acked {
		f := byID[w.ID]
		switch c := compareWrites(f, w); {
		case c < 0:
			t.Errorf("acknowledged write %+v lost to the lesser final row %+v", w, f)
		case c == 0 && !cmp.Equal(f, w):
			t.Errorf("final row %+v ties acknowledged write %+v under the rule but differs", f, w)
		}
	}
}

// ackedWrite is a PUT the client saw answered 200.
type ackedWrite struct {
	requestID string
	property  Property
}

// putMany sends n PUTs to region, one at a time, cycling over ids from
// firstID, each from the version the previous answer returned. It returns
// the acknowledged writes, and an error unless every PUT was acknowledged.
// It is safe to call from several goroutines.
func (s *stack) putMany(region, prefix string, firstID int64, ids, n int) ([]ackedWrite, error) {
	versions := map[int64]int64{}
	var acked []ackedWrite
	for i := range n {
		id := firstID + int64(i%ids)
		path := fmt.Sprintf("/%s/properties/%d", region, id)
		if _, ok := versions[id]; !ok {
			status, _, cur, err := s.do("GET", path, "", "")
			if err != nil || status != http.StatusOK {
				return acked, fmt.Errorf("GET %s: %d %v", path, status, err)
			}
			versions[id] = cur.Version
		}
		requestID := newRequestID(fmt.Sprintf("%s-%d", prefix, i))
		status, _, got, err := s.do("PUT", path, requestID, fmt.Sprintf(`{"price": %s, "version": %d}`, Money(100_000_00+i), versions[id]))
		if err != nil || status != http.StatusOK {
			return acked, fmt.Errorf("PUT %d of %d to %s: status %d (%+v) %v, want 200", i+1, n, path, status, got, err)
		}
		versions[id] = got.Version
		acked = append(acked, ackedWrite{requestID, got.Property})
	}
	return acked, nil
}

// assertDelivered checks that db holds each acknowledged write exactly once:
// its request id recorded once with the acknowledged response, and each
// property at the last acknowledged version (a write applied twice would have
// moved it further).
func assertDelivered(t *testing.T, db *sql.DB, acked []ackedWrite) {
	t.Helper()
	last := map[int64]Property{}
	for _, w := range acked {
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM processed_requests WHERE request_id = $1`, w.requestID).Scan(&n); err != nil {
			t.Fatalf("count request %s: %v", w.requestID, err)
		}
		if n != 1 {
			t.Errorf("request %s recorded %d times, want once", w.requestID, n)
			continue
		}
		var fingerprint string
		got, err := scanProperty(db.QueryRow(lookupRequestSQL, w.requestID), &fingerprint)
		if err != nil {
			t.Fatalf("look up request %s: %v", w.requestID, err)
		}
		if diff := cmp.Diff(w.property, got); diff != "" {
			t.Errorf("request %s: recorded response differs from the acknowledged one (-acked +recorded):\n%s", w.requestID, diff)
		}
		last[w.property.ID] = w.property
	}
	for id, want := range last {
		got, err := getProperty(context.Background(), db, id)
		if err != nil {
			t.Fatalf("getProperty(%d): %v", id, err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("property %d is not its last acknowledged write (-acked +stored):\n%s", id, diff)
		}
	}
}

func TestReplicationSurvivesKafkaOutage(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	s.stop(t, "kafka", false)

	// Writes never wait for Kafka: all 100 are acknowledged.
	const puts = 100
	acked, err := s.putMany("us", "outage", 301, 20, puts)
	if err != nil {
		t.Fatalf("with Kafka down: %v", err)
	}
	if backlog := s.lag(t, "us").OutboxBacklog; backlog < puts {
		t.Errorf("us outbox backlog with Kafka down = %d, want at least %d", backlog, puts)
	}

	// EU's lag grows in real time while nothing can arrive.
	first := s.lag(t, "eu").LagSeconds
	waitFor(t, 10*time.Second, "eu's lag to grow by 2 seconds", func() bool {
		return s.lag(t, "eu").LagSeconds >= first+2
	})
	t.Logf("eu lag with Kafka down: %.1fs, and growing", s.lag(t, "eu").LagSeconds)

	s.start(t, "kafka")
	recovered := time.Now()
	s.caughtUp(t, 90*time.Second)
	t.Logf("both regions caught up %v after Kafka was back; eu lag %.3fs", time.Since(recovered), s.lag(t, "eu").LagSeconds)
	waitIdentical(t, us, eu, 30*time.Second)
	assertDelivered(t, eu, acked)
}

func TestReplicationSurvivesCrash(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)

	// A burst of acknowledged writes from concurrent clients, then SIGKILL
	// at once: some events are still in the outbox, maybe some half-published.
	const clients, each = 10, 5
	var (
		mu    sync.Mutex
		acked []ackedWrite
		errs  []error
		wg    sync.WaitGroup
	)
	for c := range clients {
		wg.Go(func() {
			w, err := s.putMany("us", fmt.Sprintf("crash-%d", c), int64(401+c*each), each, each)
			mu.Lock()
			acked = append(acked, w...)
			if err != nil {
				errs = append(errs, err)
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	s.stop(t, "backend-us", true)
	for _, err := range errs {
		t.Errorf("burst before the crash: %v", err)
	}
	s.start(t, "backend-us")

	s.caughtUp(t, 60*time.Second)
	waitIdentical(t, us, eu, 30*time.Second)
	assertDelivered(t, eu, acked)
	t.Logf("%d writes acknowledged before SIGKILL; all reached eu exactly once", len(acked))
}

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
		kgo.SeedBrokers(strings.Split(setting("STACK_KAFKA", "localhost:9092"), ",")...),
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

// TestRequestReplayedInBothRegions writes one request in both regions, as a
// retry that NGINX replays in the other region after the first attempt
// committed does, while the regions cannot hear of each other (Kafka is
// stopped). Once they have, both hold one record of the request, the same
// one, and the greater write alone survives; the pair counts as a replay,
// not as a conflict.
func TestRequestReplayedInBothRegions(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	counters := func() (conflicts, replays int64) {
		for _, region := range []string{"us", "eu"} {
			r := s.lag(t, region)
			conflicts, replays = conflicts+r.Conflicts, replays+r.Replays
		}
		return conflicts, replays
	}
	conflictsBefore, replaysBefore := counters()

	const id = 207
	version := s.current(t, "us", id).Version
	s.stop(t, "kafka", false)
	requestID := newRequestID("replayed")
	body := fmt.Sprintf(`{"price": 207207.07, "version": %d}`, version)
	var written []Property
	for _, region := range []string{"us", "eu"} {
		status, servedBy, got := s.mustDo(t, "PUT", fmt.Sprintf("/%s/properties/%d", region, id), requestID, body)
		if status != http.StatusOK || servedBy != region {
			t.Fatalf("PUT of request %s in %s: %d served by %s (%+v), want 200 from %s", requestID, region, status, servedBy, got, region)
		}
		written = append(written, got.Property)
	}
	s.start(t, "kafka")
	s.caughtUp(t, 90*time.Second)
	final := waitIdentical(t, us, eu, 30*time.Second)

	want := written[0]
	if compareWrites(written[1], want) > 0 {
		want = written[1]
	}
	for _, p := range final {
		if p.ID == id && !cmp.Equal(want, p) {
			t.Errorf("property %d after both writes of one request = %+v, want the greater write %+v", id, p, want)
		}
	}
	for _, db := range []*sql.DB{us, eu} {
		var fingerprint string
		got, err := scanProperty(db.QueryRow(lookupRequestSQL, requestID), &fingerprint)
		if err != nil {
			t.Fatalf("look up request %s: %v", requestID, err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("the record of request %s differs from the surviving write (-want +got):\n%s", requestID, diff)
		}
	}
	conflictsAfter, replaysAfter := counters()
	if conflictsAfter != conflictsBefore || replaysAfter != replaysBefore+2 {
		t.Errorf("conflicts %d -> %d, replays %d -> %d; want conflicts unchanged and one replay counted in each region",
			conflictsBefore, conflictsAfter, replaysBefore, replaysAfter)
	}
}

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
		id, p.Version, Money(210210_10), nil, nil, "us", requestID, strings.Repeat("0", 64)))
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
	// Events of old writes, each a millisecond after the last, in the
	// outbox of the scratch database, emptied first of what other tests
	// left there; their request records first.
	if _, err := db.ExecContext(ctx, `DELETE FROM outbox`); err != nil {
		t.Fatal(err)
	}
	for _, table := range []string{"processed_requests", "outbox"} {
		_, err := db.ExecContext(ctx, `
INSERT INTO `+table+` (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT 'full-round-' || i, repeat('0', 64), 1 + i % 500, 1000, NULL, NULL, 'us', 1000 + i,
       TIMESTAMPTZ '2026-06-01 00:00:00+00' + i * interval '1 millisecond'
FROM generate_series(1, $1) AS i`, queued)
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

	topic := fmt.Sprintf("test-full-round-%d", time.Now().UnixNano())
	brokers := strings.Split(setting("STACK_KAFKA", "localhost:9092"), ",")
	rep, err := newReplicator(slog.New(slog.NewTextHandler(io.Discard, nil)), db, "us", brokers, topic)
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
	waitFor(t, 30*time.Second, "a relay round to publish", func() bool {
		full, err = rep.relay.publishRound(ctx, partitions)
		return err == nil
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

// TestLostEventsStopReplicationLoudly makes the broker lose events a region
// needs, as a region away for longer than the retention finds: EU is
// stopped, US writes, every record of the topic is deleted, and EU comes
// back. EU must not skip ahead as if nothing happened: it stops applying,
// and says so in its lag report, its log and its health (still 200: it
// serves its clients). The clean-up re-seeds EU from US, as the README says.
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
	deleteAllRecords(t, kafka)
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
	client, err := kgo.NewClient(kgo.SeedBrokers(strings.Split(setting("STACK_KAFKA", "localhost:9092"), ",")...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	return client
}

// deleteAllRecords moves the log start of every partition of the topic to
// its end, as retention does to a region that was away too long.
func deleteAllRecords(t *testing.T, kafka *kgo.Client) {
	t.Helper()
	req := kmsg.NewPtrDeleteRecordsRequest()
	rt := kmsg.NewDeleteRecordsRequestTopic()
	rt.Topic = setting("KAFKA_TOPIC", "property-updates")
	for p := range int32(topicPartitions) {
		rp := kmsg.NewDeleteRecordsRequestTopicPartition()
		rp.Partition, rp.Offset = p, -1
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
// as the README's procedure does: read the topic's end offsets; merge the
// peer's listings and request records in by the conflict rule; forget the
// old watermarks; move the region's consumer group to those offsets; start
// the backend.
func reseed(t *testing.T, s *stack, kafka *kgo.Client, from, to *sql.DB, region string) {
	t.Helper()
	ctx := context.Background()
	s.control(t, "stop", "backend-"+region)
	topic := setting("KAFKA_TOPIC", "property-updates")
	ends := endOffsets(t, kafka, topic)

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
		t.Fatalf("re-seed %s: merge listings: %v", region, err)
	}
	rows, err := from.QueryContext(ctx, `SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, request_id, fingerprint FROM processed_requests`)
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
		t.Fatalf("re-seed %s: merge request records: %v", region, err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM replication_watermarks`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	commit := kmsg.NewPtrOffsetCommitRequest()
	commit.Group, commit.Generation = "property-replicator-"+region, -1
	ct := kmsg.NewOffsetCommitRequestTopic()
	ct.Topic = topic
	for p, offset := range ends {
		cp := kmsg.NewOffsetCommitRequestTopicPartition()
		cp.Partition, cp.Offset = p, offset
		ct.Partitions = append(ct.Partitions, cp)
	}
	commit.Topics = append(commit.Topics, ct)
	resp, err := commit.RequestWith(ctx, kafka)
	if err != nil {
		t.Fatalf("re-seed %s: commit offsets: %v", region, err)
	}
	for _, topic := range resp.Topics {
		for _, p := range topic.Partitions {
			if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
				t.Fatalf("re-seed %s: commit offset of partition %d: %v", region, p.Partition, err)
			}
		}
	}
	s.start(t, "backend-"+region)
	s.caughtUp(t, 60*time.Second)
	waitIdentical(t, from, to, 30*time.Second)
}

// endOffsets returns the end of each partition of topic.
func endOffsets(t *testing.T, kafka *kgo.Client, topic string) map[int32]int64 {
	t.Helper()
	req := kmsg.NewPtrListOffsetsRequest()
	rt := kmsg.NewListOffsetsRequestTopic()
	rt.Topic = topic
	for p := range int32(topicPartitions) {
		rp := kmsg.NewListOffsetsRequestTopicPartition()
		rp.Partition, rp.Timestamp = p, -1 // -1: the end
		rt.Partitions = append(rt.Partitions, rp)
	}
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(context.Background(), kafka)
	if err != nil {
		t.Fatalf("list offsets: %v", err)
	}
	ends := map[int32]int64{}
	for _, topic := range resp.Topics {
		for _, p := range topic.Partitions {
			if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
				t.Fatalf("list offsets of partition %d: %v", p.Partition, err)
			}
			ends[p.Partition] = p.Offset
		}
	}
	return ends
}
