//go:build integration

package main

// Replication against the running stack: writes cross in both directions,
// concurrent writes converge, and neither a Kafka outage, a crash nor a
// poison record loses an acknowledged write. The harness is in stack_test.go.

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
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

// TestConvergenceUnderConcurrentWrites creates listings in both regions,
// then races clients in both regions over them with updates and, now and
// then, deletes, each from the state it has just read. Once replication has
// caught up, both regions hold identical rows, and no acknowledged write was
// lost except to a greater one under the conflict rule.
func TestConvergenceUnderConcurrentWrites(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	before := [2]int64{s.lag(t, "us").Conflicts, s.lag(t, "eu").Conflicts}

	var ids []int64
	for i := range 40 {
		region := []string{"us", "eu"}[i%2]
		status, _, got := s.mustDo(t, "POST", "/"+region+"/properties", newRequestID("converge-create"), `{"price": 100000}`)
		if status != http.StatusCreated {
			t.Fatalf("POST in %s: %d %+v", region, status, got)
		}
		ids = append(ids, got.ID)
	}
	// Every client reads before it writes, in either region: each new
	// listing must be in both first.
	waitIdentical(t, us, eu, 30*time.Second)
	const workers, writesEach = 6, 40 // per region
	acked, counts, err := s.writeConcurrently(ids, workers, writesEach)
	if err != nil {
		t.Fatalf("a client failed: %v", err)
	}
	t.Logf("%d writes: statuses %v", 2*workers*writesEach, counts)
	if counts[http.StatusOK]+counts[http.StatusConflict]+counts[http.StatusPreconditionFailed]+counts[http.StatusGone] != 2*workers*writesEach {
		t.Errorf("statuses %v: want only 200, 409, 412 and 410", counts)
	}

	s.caughtUp(t, 60*time.Second)
	final := waitIdentical(t, us, eu, 30*time.Second)
	assertNoneLost(t, final, acked)
	conflicts := s.lag(t, "us").Conflicts - before[0] + s.lag(t, "eu").Conflicts - before[1]
	deleted := 0
	for _, p := range final {
		if p.Deleted && slices.Contains(ids, p.ID) {
			deleted++
		}
	}
	t.Logf("%d writes acknowledged; %d cross-region conflicts resolved; %d rows identical in both regions, %d of the %d new listings deleted",
		len(acked), conflicts, len(final), deleted, len(ids))
}

// writeConcurrently runs workers clients in each region, each sending
// writesEach writes to random listings among ids, from the state it has just
// read: a PUT of its version, or one time in twenty a DELETE of its ETag. It
// returns the acknowledged writes (a delete as its tombstone, which keeps the
// values it deleted) and the count of each status, or the first transport
// error.
func (s *stack) writeConcurrently(ids []int64, workers, writesEach int) (acked []Property, counts map[int]int, err error) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	counts = map[int]int{}
	for r, region := range []string{"us", "eu"} {
		for w := range workers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(w), uint64(r)))
				for i := range writesEach {
					path := fmt.Sprintf("/%s/properties/%d", region, ids[rng.IntN(len(ids))])
					requestID := newRequestID(fmt.Sprintf("converge-%s-%d-%d", region, w, i))
					status, h, cur, gerr := s.doWith("GET", path, http.Header{}, "")
					got := cur
					if gerr == nil && status == http.StatusOK && rng.IntN(20) == 0 {
						status, _, got, gerr = s.doWith("DELETE", path, http.Header{"X-Request-Id": {requestID}, "If-Match": {h.Get("ETag")}}, "")
						// The tombstone keeps the values of the state it deleted.
						got.Price, got.Bedrooms, got.Bathrooms = cur.Price, cur.Bedrooms, cur.Bathrooms
					} else if gerr == nil && status == http.StatusOK {
						status, _, got, gerr = s.do("PUT", path, requestID,
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
	// The report may be a read old (reportInterval, lag.go): it counts
	// every write within a moment, and never drops one.
	var backlog int64
	waitFor(t, 2*time.Second, fmt.Sprintf("us outbox backlog with Kafka down to count all %d writes", puts), func() bool {
		backlog = s.lag(t, "us").OutboxBacklog
		return backlog >= puts
	})

	// EU's lag grows in real time while nothing can arrive.
	first := s.lag(t, "eu").LagSeconds
	waitFor(t, 10*time.Second, "eu's lag to grow by 2 seconds", func() bool {
		return s.lag(t, "eu").LagSeconds >= first+2
	})
	t.Logf("eu lag with Kafka down: %.1fs, and growing", s.lag(t, "eu").LagSeconds)

	// A backend stops in order with Kafka away, its writes waiting in the
	// outbox. Its relay's round was waiting for a broker that went away
	// with a request of it unanswered, which franz-go cannot cancel
	// (relay.produce).
	stopInOrder(t, s, "backend-us")
	s.start(t, "backend-us")

	s.start(t, "kafka")
	recovered := time.Now()
	s.caughtUp(t, 90*time.Second)
	t.Logf("both regions caught up %v after Kafka was back; eu lag %.3fs", time.Since(recovered), s.lag(t, "eu").LagSeconds)
	waitIdentical(t, us, eu, 30*time.Second)
	assertDelivered(t, eu, acked)
}

// TestBackendStopsWithKafkaSilent stops a backend in order while the broker
// is frozen: its connections stay open and nothing answers, as with a hung
// broker or a link that drops packets. franz-go's Close waits to leave the
// consumer group with no deadline of its own (replicator.close). The write
// made meanwhile waits in the outbox and arrives once the broker is back.
func TestBackendStopsWithKafkaSilent(t *testing.T) {
	s := newStack(t)
	s.caughtUp(t, 30*time.Second)
	thaw := s.freeze(t, "kafka")
	status, got := s.put(t, "eu", 421, newRequestID("kafka-silent"), 4210_00)
	if status != http.StatusOK {
		t.Fatalf("PUT /eu/properties/421 with the broker frozen = %d %+v, want 200", status, got)
	}
	stopInOrder(t, s, "backend-eu")
	thaw()
	s.start(t, "backend-eu")
	s.waitReplicated(t, "us", got.Property, 60*time.Second)
}

// stopInOrder stops a backend as an orchestrator does (SIGTERM) and fails
// the test unless it stopped in order, within its shutdown budget (main.go):
// ./stack.sh stop fails when it had to kill it after 30 s, and its log must
// say "stopped" after its last "shutting down" (docker compose stop kills
// without failing).
func stopInOrder(t *testing.T, s *stack, backend string) {
	t.Helper()
	t.Cleanup(func() { s.start(t, backend) })
	s.control(t, "stop", backend)
	logs := s.control(t, "logs", backend)
	if last := strings.LastIndex(logs, `"msg":"shutting down"`); last < 0 || !strings.Contains(logs[last:], `"msg":"stopped"`) {
		t.Errorf("%s did not stop in order: its log has no \"stopped\" after its last \"shutting down\"", backend)
	}
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
	// Each region's conflict and replay counters. A batch redelivered after
	// Kafka's restart is applied again and counts its replay again, so a
	// region counts at least one.
	counters := func() (conflicts, replays map[string]int64) {
		conflicts, replays = map[string]int64{}, map[string]int64{}
		for _, region := range []string{"us", "eu"} {
			r := s.lag(t, region)
			conflicts[region], replays[region] = r.Conflicts, r.Replays
		}
		return conflicts, replays
	}
	conflictsBefore, replaysBefore := counters()

	const id = 207
	version := s.current(t, "us", id).Version
	thawKafka := s.freeze(t, "kafka")
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
	thawKafka()
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
	// The counters are counted as each batch commits, and the lag report
	// that carries them may be up to reportInterval old (lag.go): they are
	// waited for, not read once.
	var conflictsAfter, replaysAfter map[string]int64
	waitFor(t, 10*time.Second, "both regions to count the replay", func() bool {
		conflictsAfter, replaysAfter = counters()
		return replaysAfter["us"] > replaysBefore["us"] && replaysAfter["eu"] > replaysBefore["eu"]
	})
	for _, region := range []string{"us", "eu"} {
		if conflictsAfter[region] != conflictsBefore[region] || replaysAfter[region] < replaysBefore[region]+1 {
			t.Errorf("%s: conflicts %d -> %d, replays %d -> %d; want conflicts unchanged and the replay counted", region,
				conflictsBefore[region], conflictsAfter[region], replaysBefore[region], replaysAfter[region])
		}
	}
}

// TestETagNamesTheWriteNotTheVersion is the case the ETag exists for: both
// regions write the same version of a listing while they cannot hear of each
// other, so "version N+1" names two writes. Once the conflict rule has kept
// one, the losing writer's If-Match is refused in both regions, and the
// 412 names the state that won.
func TestETagNamesTheWriteNotTheVersion(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	const id = 212
	version := s.current(t, "us", id).Version
	thawKafka := s.freeze(t, "kafka")
	written := map[string]Property{}
	tags := map[string]string{}
	for _, region := range []string{"us", "eu"} {
		header := http.Header{"X-Request-Id": {newRequestID("etag-" + region)}}
		status, h, got, err := s.doWith("PUT", fmt.Sprintf("/%s/properties/%d", region, id), header,
			fmt.Sprintf(`{"price": 212212.12, "version": %d}`, version))
		if err != nil || status != http.StatusOK {
			t.Fatalf("PUT in %s at version %d: %d %+v %v", region, version, status, got, err)
		}
		written[region], tags[region] = got.Property, h.Get("ETag")
	}
	if want := fmt.Sprintf(`"%d-eu"`, version+1); tags["eu"] != want {
		t.Errorf("EU's write: ETag %q, want %q", tags["eu"], want)
	}
	thawKafka()
	s.caughtUp(t, 90*time.Second)
	waitIdentical(t, us, eu, 30*time.Second)

	winner, loser := "us", "eu"
	if compareWrites(written["eu"], written["us"]) > 0 {
		winner, loser = "eu", "us"
	}
	for _, region := range []string{"us", "eu"} {
		header := http.Header{"X-Request-Id": {newRequestID("etag-late")}, "If-Match": {tags[loser]}}
		status, h, got, err := s.doWith("PUT", fmt.Sprintf("/%s/properties/%d", region, id), header,
			fmt.Sprintf(`{"price": 1, "version": %d}`, version+1))
		if err != nil || status != http.StatusPreconditionFailed || h.Get("ETag") != tags[winner] {
			t.Errorf("PUT in %s with the losing writer's If-Match %s = %d, ETag %q (%+v, %v); want 412 naming %s",
				region, tags[loser], status, h.Get("ETag"), got, err, tags[winner])
		}
	}
}

// TestCreateStorm creates listings in both regions at once: no id is handed
// out twice, and every 201 is readable in both regions once they have
// exchanged their events.
func TestCreateStorm(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	const each = 25 // per region
	var (
		mu      sync.Mutex
		created []Property
		wg      sync.WaitGroup
	)
	for _, region := range []string{"us", "eu"} {
		for i := range each {
			wg.Go(func() {
				status, servedBy, got, err := s.do("POST", "/"+region+"/properties", newRequestID("storm-"+region),
					fmt.Sprintf(`{"price": %d.%02d, "bedrooms": %d}`, 300000+i, i, i%6))
				mu.Lock()
				defer mu.Unlock()
				if err != nil || status != http.StatusCreated || servedBy != region {
					t.Errorf("POST /%s/properties: %d served by %s %+v %v, want 201 from %s", region, status, servedBy, got, err, region)
					return
				}
				created = append(created, got.Property)
			})
		}
	}
	wg.Wait()
	ids := map[int64]bool{}
	for _, p := range created {
		if ids[p.ID] {
			t.Errorf("id %d handed out twice", p.ID)
		}
		ids[p.ID] = true
		if want := map[string]int64{"us": 1, "eu": 0}[p.RegionOrigin]; p.ID%2 != want {
			t.Errorf("id %d created in %s, not of that region's parity", p.ID, p.RegionOrigin)
		}
	}
	s.caughtUp(t, 60*time.Second)
	final := waitIdentical(t, us, eu, 30*time.Second)
	byID := map[int64]Property{}
	for _, p := range final {
		byID[p.ID] = p
	}
	for _, p := range created {
		if !cmp.Equal(p, byID[p.ID]) {
			t.Errorf("created %+v, but both regions hold %+v", p, byID[p.ID])
		}
	}
	t.Logf("%d listings created in both regions at once; all %d rows identical in both", len(created), len(final))
}

// TestOvertakenWriteIsRecorded is the loss that equal versions alone do not
// show: with Kafka frozen, EU writes A on version v, US writes B on v
// (acknowledged), and EU writes C on A. Both regions end with C, the
// greater write, and B is gone: it must be recorded lost, naming its
// request, at GET /{region}/conflicts of a region that found it.
func TestOvertakenWriteIsRecorded(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	const id = 260
	base := s.current(t, "us", id)
	thawKafka := s.freeze(t, "kafka")
	put := func(region string, version int64, requestID string, price int) response {
		t.Helper()
		status, servedBy, got, err := s.do("PUT", fmt.Sprintf("/%s/properties/%d", region, id), requestID, fmt.Sprintf(`{"price": %d, "version": %d}`, price, version))
		if err != nil || status != http.StatusOK || servedBy != region {
			t.Fatalf("PUT /%s/properties/%d: %d from %s %+v (%v)", region, id, status, servedBy, got, err)
		}
		return got
	}
	put("eu", base.Version, newRequestID("overtaken-a"), 260001)
	b := newRequestID("overtaken-b")
	put("us", base.Version, b, 260002)
	c := put("eu", base.Version+1, newRequestID("overtaken-c"), 260003)
	thawKafka()
	s.caughtUp(t, 60*time.Second)
	waitIdentical(t, us, eu, 30*time.Second)
	if got := s.current(t, "us", id); got.Version != c.Version || got.RegionOrigin != "eu" {
		t.Fatalf("listing %d after replication: %+v, want C (%d-eu)", id, got.Property, c.Version)
	}
	var regions []string
	for _, region := range []string{"us", "eu"} {
		var page ConflictPage
		resp, err := s.client.Get(fmt.Sprintf("%s/%s/conflicts?limit=200", s.url, region))
		if err == nil {
			err = decodeJSON(resp, &page)
			resp.Body.Close()
		}
		if err != nil {
			t.Fatalf("GET /%s/conflicts: %v", region, err)
		}
		for _, r := range page.Items {
			if r.Lost.RequestID != nil && *r.Lost.RequestID == b {
				regions = append(regions, r.FoundIn)
				if r.PropertyID != id || r.Lost.RegionOrigin != "us" || r.Won.Version < base.Version+1 {
					t.Errorf("the record of B: %+v", r)
				}
			}
		}
	}
	if len(regions) == 0 {
		t.Errorf("B (request %s) was lost and no region recorded it", b)
	}
}
