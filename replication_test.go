//go:build integration

package main

// Replication tests against the running stack. Besides STACK_URL and
// STACK_CMD (see failover_test.go) they read both databases and talk to Kafka:
//
//	STACK_DB_US, STACK_DB_EU  the regional databases (default: localhost:5433
//	                          and :5434 with POSTGRES_USER, POSTGRES_PASSWORD
//	                          and POSTGRES_DB, as in .env)
//	STACK_KAFKA               a broker for host clients (default localhost:9092)

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kgo"
)

// stackDB opens one region's database, failing with what to set if the
// address is unknown or the database does not answer.
func stackDB(t testing.TB, region string) *sql.DB {
	t.Helper()
	name := "STACK_DB_" + strings.ToUpper(region)
	url := os.Getenv(name)
	if url == "" {
		user, pass, db := os.Getenv("POSTGRES_USER"), os.Getenv("POSTGRES_PASSWORD"), os.Getenv("POSTGRES_DB")
		if user == "" || pass == "" || db == "" {
			t.Fatalf("%s is not set, nor POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB to build it from "+
				"(`set -a; . ./.env; set +a` for the compose stack; ./stack.sh test sets it)", name)
		}
		port := map[string]string{"us": "5433", "eu": "5434"}[region]
		url = fmt.Sprintf("postgres://%s:%s@localhost:%s/%s", user, pass, port, db)
	}
	db, err := openDB(config{databaseURL: url, dbMaxConns: 4})
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.PingContext(context.Background()); err != nil {
		t.Fatalf("%s does not answer (%v): is the stack up? `./stack.sh up` or `docker compose up -d --wait`", name, err)
	}
	return db
}

// lag reads one region's replication report through NGINX.
func (s *stack) lag(t *testing.T, region string) LagReport {
	t.Helper()
	resp, err := s.client.Get(s.url + "/" + region + "/replication-lag")
	if err != nil {
		t.Fatalf("GET /%s/replication-lag: %v", region, err)
	}
	defer resp.Body.Close()
	var r LagReport
	if err := decodeJSON(resp, &r); err != nil {
		t.Fatalf("GET /%s/replication-lag: %v", region, err)
	}
	return r
}

// decodeJSON decodes a 200 response's body into v.
func decodeJSON(resp *http.Response, v any) error {
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	return strictUnmarshal(b, v)
}

// caughtUp waits until neither region has anything left to replicate: no
// outbox backlog, no unread records, and a lag under a second.
func (s *stack) caughtUp(t *testing.T, timeout time.Duration) {
	t.Helper()
	s.waitFor(t, timeout, "both regions to catch up", func() bool {
		for _, region := range []string{"us", "eu"} {
			r := s.lag(t, region)
			if r.OutboxBacklog > 0 || r.RecordsBehind > 0 || r.LagSeconds > 1 {
				return false
			}
		}
		return true
	})
}

// allProperties reads a region's whole properties table, ordered by id.
func allProperties(t *testing.T, db *sql.DB) []Property {
	t.Helper()
	rows, err := db.QueryContext(context.Background(),
		`SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at FROM properties ORDER BY id`)
	if err != nil {
		t.Fatalf("read properties: %v", err)
	}
	defer rows.Close()
	var all []Property
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			t.Fatalf("read properties: %v", err)
		}
		all = append(all, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read properties: %v", err)
	}
	return all
}

// waitIdentical waits until both databases hold identical properties tables
// and fails with the difference if they do not within timeout.
func waitIdentical(t *testing.T, us, eu *sql.DB, timeout time.Duration) []Property {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		a, b := allProperties(t, us), allProperties(t, eu)
		diff := cmp.Diff(a, b)
		if diff == "" {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("the regions' properties tables still differ after %v (-us +eu):\n%s", timeout, diff)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// asProperty is the property part of a response.
func asProperty(r response) Property {
	return Property{ID: r.ID, Price: r.Price, Bedrooms: r.Bedrooms, Bathrooms: r.Bathrooms,
		RegionOrigin: r.RegionOrigin, Version: r.Version, UpdatedAt: r.UpdatedAt}
}

// put updates property id through region's prefix from its current version
// there, and returns the status and body.
func (s *stack) put(t *testing.T, region string, id int64, requestID string, price Money) (int, response) {
	t.Helper()
	version := s.current(t, region, id).Version
	status, _, got := s.mustDo(t, "PUT", fmt.Sprintf("/%s/properties/%d", region, id), requestID,
		fmt.Sprintf(`{"price": %s, "version": %d}`, price, version))
	return status, got
}

// waitReplicated waits until region serves property id at want's version or
// later, and returns what it serves.
func (s *stack) waitReplicated(t *testing.T, region string, want Property, timeout time.Duration) response {
	t.Helper()
	var got response
	s.waitFor(t, timeout, fmt.Sprintf("%s to serve property %d at version %d", region, want.ID, want.Version), func() bool {
		var servedBy string
		var status int
		var err error
		status, servedBy, got, err = s.do("GET", fmt.Sprintf("/%s/properties/%d", region, want.ID), "", "")
		return err == nil && status == http.StatusOK && servedBy == region && got.Version >= want.Version
	})
	return got
}

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
			got := s.waitReplicated(t, tt.to, asProperty(written), 10*time.Second)
			if diff := cmp.Diff(asProperty(written), asProperty(got)); diff != "" {
				t.Errorf("property %d in %s after replication (-written in %s +served by %s):\n%s", tt.id, tt.to, tt.from, tt.to, diff)
			}

			// The request id travelled too: a retry in the other region is a 422.
			status, _, dup := s.mustDo(t, "PUT", fmt.Sprintf("/%s/properties/%d", tt.to, tt.id), requestID,
				fmt.Sprintf(`{"price": 1, "version": %d}`, written.Version))
			want := response{Error: "duplicate request", RequestID: requestID, OriginalResponse: ptr(asProperty(written))}
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

	const (
		firstID, ids = 601, 50
		workers      = 6 // per region
		putsEach     = 40
	)
	var (
		mu      sync.Mutex
		acked   []Property // every 200 the clients saw
		counts  = map[int]int{}
		wg      sync.WaitGroup
		failure string
	)
	for r, region := range []string{"us", "eu"} {
		for w := range workers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(w), uint64(r)))
				for i := range putsEach {
					id := int64(firstID + rng.IntN(ids))
					path := fmt.Sprintf("/%s/properties/%d", region, id)
					_, _, cur, err := s.do("GET", path, "", "")
					if err == nil {
						var status int
						var got response
						status, _, got, err = s.do("PUT", path, newRequestID(fmt.Sprintf("converge-%s-%d-%d", region, w, i)),
							fmt.Sprintf(`{"price": %d.%02d, "version": %d}`, 100000+rng.IntN(900000), rng.IntN(100), cur.Version))
						mu.Lock()
						counts[status]++
						if status == http.StatusOK {
							acked = append(acked, asProperty(got))
						}
						mu.Unlock()
					}
					if err != nil {
						mu.Lock()
						failure = err.Error()
						mu.Unlock()
						return
					}
				}
			})
		}
	}
	wg.Wait()
	if failure != "" {
		t.Fatalf("a client failed: %s", failure)
	}
	t.Logf("%d PUTs: statuses %v", 2*workers*putsEach, counts)
	if counts[http.StatusOK]+counts[http.StatusConflict] != 2*workers*putsEach {
		t.Errorf("statuses %v: want only 200 and 409", counts)
	}

	s.caughtUp(t, 60*time.Second)
	final := waitIdentical(t, us, eu, 30*time.Second)
	byID := map[int64]Property{}
	for _, p := range final {
		byID[p.ID] = p
	}
	// Every acknowledged write is either the final row or lost to a greater
	// one under the conflict rule: none vanished in favour of a lesser write.
	for _, w := range acked {
		f := byID[w.ID]
		switch c := compareWrites(f, w); {
		case c < 0:
			t.Errorf("acknowledged write %+v lost to the lesser final row %+v", w, f)
		case c == 0 && !cmp.Equal(f, w):
			t.Errorf("final row %+v ties acknowledged write %+v under the rule but differs", f, w)
		}
	}
	conflicts := s.lag(t, "us").Conflicts - before[0] + s.lag(t, "eu").Conflicts - before[1]
	t.Logf("%d writes acknowledged; %d cross-region conflicts resolved; 1000 rows identical in both regions", len(acked), conflicts)
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
		acked = append(acked, ackedWrite{requestID, asProperty(got)})
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
		got, err := scanProperty(db.QueryRow(lookupRequestSQL, w.requestID))
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
	s.waitFor(t, 10*time.Second, "eu's lag to grow by 2 seconds", func() bool {
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
	topic := envOr("KAFKA_TOPIC", "property-updates")
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(envOr("STACK_KAFKA", "localhost:9092"), ",")...),
		kgo.ConsumeTopics(topic+".dlq"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	poison := fmt.Sprintf(`{"id": 7, "price": "not a number", "token": %q`, newRequestID("poison"))
	rec := &kgo.Record{Topic: topic, Key: []byte("7"), Value: []byte(poison),
		Headers: []kgo.RecordHeader{{Key: headerKind, Value: []byte("event")}, {Key: headerRegion, Value: []byte("us")}}}
	if err := client.ProduceSync(ctx, rec).FirstErr(); err != nil {
		t.Fatalf("produce the poison record: %v", err)
	}

	// EU, the region that applies US events, rejects it into the DLQ.
	var dead *kgo.Record
	for dead == nil {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("the poison record did not reach %s.dlq within 60s", topic)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			if string(r.Value) == poison && header(r, "rejected-by") == "eu" {
				dead = r
			}
		})
	}
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
	got := s.waitReplicated(t, "eu", asProperty(written), 10*time.Second)
	if diff := cmp.Diff(asProperty(written), asProperty(got)); diff != "" {
		t.Errorf("property 7 in eu after the poison record (-written +served):\n%s", diff)
	}
}

// header returns the value of a record's header, or "".
func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}
