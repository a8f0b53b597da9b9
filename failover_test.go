//go:build integration

package main

// Failover through NGINX: a region's backend or database goes away, and its
// clients are served by the other region without a failed request; plus the
// races, retries and edges that NGINX sees. The harness is in stack_test.go.

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// clientLoop is a client reading and writing one property through one
// region's prefix, as fast as it gets answers, recording what it saw.
type clientLoop struct {
	mu       sync.Mutex
	total    int
	failures []string
	served   map[string]int // 2xx answers by the region that served them
	writes   map[string]int // successful PUTs by the region that served them
	// cannotTell are PUTs answered 503 or 502 (see standIn in handlers.go),
	// by request id: checked against NGINX's log by the test.
	cannotTell map[string]int
	maxDelay   time.Duration // the slowest answer, of those the service judged
	stop       chan struct{}
	done       chan struct{}
}

// startClientLoop alternates GET and PUT of property id under /region/. A
// PUT that meets a version mismatch takes the current version and goes on,
// as a real client would; anything but 200 or 409 is a failure.
func startClientLoop(t *testing.T, s *stack, region string, id int64) *clientLoop {
	t.Helper()
	l := &clientLoop{served: map[string]int{}, writes: map[string]int{}, cannotTell: map[string]int{}, stop: make(chan struct{}), done: make(chan struct{})}
	version := s.current(t, region, id).Version
	path := fmt.Sprintf("/%s/properties/%d", region, id)
	go func() {
		defer close(l.done)
		for i := 0; ; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			method, requestID, body := "GET", "", ""
			if i%2 == 1 {
				method, requestID = "PUT", newRequestID("loop")
				body = fmt.Sprintf(`{"price": %d.25, "version": %d}`, 200000+i, version)
			}
			start := time.Now()
			status, servedBy, got, err := s.do(method, path, requestID, body)
			delay := time.Since(start)
			l.mu.Lock()
			l.total++
			if err == nil && (status == http.StatusOK || status == http.StatusConflict) {
				l.maxDelay = max(l.maxDelay, delay)
			}
			switch {
			case err != nil:
				l.failures = append(l.failures, fmt.Sprintf("%s %s: %v", method, path, err))
			case method == "PUT" && (status == http.StatusServiceUnavailable || status == http.StatusBadGateway):
				// A stale version, standing in: this region cannot tell
				// whether the other committed it. The next GET refreshes
				// the version.
				l.cannotTell[requestID] = status
			case status == http.StatusOK:
				l.served[servedBy]++
				version = got.Version
				if method == "PUT" {
					l.writes[servedBy]++
				}
			case status == http.StatusConflict && method == "PUT":
				version = got.CurrentVersion
			default:
				l.failures = append(l.failures, fmt.Sprintf("%s %s: status %d %+v", method, path, status, got))
			}
			l.mu.Unlock()
		}
	}()
	t.Cleanup(l.halt)
	return l
}

// snapshot returns a copy of the loop's counters.
func (l *clientLoop) snapshot() (total int, served, writes map[string]int, failures []string, maxDelay time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total, maps.Clone(l.served), maps.Clone(l.writes), slices.Clone(l.failures), l.maxDelay
}

// checkCannotTell fails the test for a PUT answered 502 or 503 other than
// by a stand-in that could not tell (standin.go): NGINX's log
// must show the other region's 503 for it (then NGINX's own 502, when the
// primary it tried next was still marked down).
func (l *clientLoop) checkCannotTell(t *testing.T, s *stack) {
	t.Helper()
	l.mu.Lock()
	cannotTell := maps.Clone(l.cannotTell)
	l.mu.Unlock()
	for requestID, status := range cannotTell {
		e := s.accessLogEntry(t, requestID)
		if !strings.Contains(e.UpstreamStatus, "503") || e.Status != status {
			t.Errorf("PUT %s answered %d, upstream statuses %q: not a stand-in that could not tell", requestID, status, e.UpstreamStatus)
		}
	}
	t.Logf("%d PUTs with a stale version answered by a stand-in that could not tell", len(cannotTell))
}

// resetDelay forgets the slowest answer so far.
func (l *clientLoop) resetDelay() {
	l.mu.Lock()
	l.maxDelay = 0
	l.mu.Unlock()
}

// halt stops the loop and waits for its last request.
func (l *clientLoop) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
}

func TestFailoverBackendStopped(t *testing.T) {
	s := newStack(t)
	const id = 101
	loop := startClientLoop(t, s, "us", id)
	waitFor(t, 10*time.Second, "the client loop to be served by us", func() bool {
		_, served, _, _, _ := loop.snapshot()
		return served["us"] >= 20
	})

	loop.resetDelay()
	stopped := time.Now()
	s.stop(t, "backend-us", false)
	took := waitFor(t, 10*time.Second, "/us/health to be served by eu", func() bool {
		status, servedBy, got, err := s.do("GET", "/us/health", "", "")
		return err == nil && status == http.StatusOK && servedBy == "eu" && got.Region == "eu"
	})
	t.Logf("stop backend-us returned after %v; /us/health served by eu %v later", time.Since(stopped)-took, took)

	// Reads and writes of the US listing go on, served by EU.
	_, before, beforeWrites, _, _ := loop.snapshot()
	waitFor(t, 15*time.Second, "EU to serve 20 more reads and 3 writes of /us/", func() bool {
		_, served, writes, _, _ := loop.snapshot()
		return served["eu"] >= before["eu"]+20 && writes["eu"] >= beforeWrites["eu"]+3
	})
	_, _, _, _, outageDelay := loop.snapshot()

	// Back in service: within NGINX's fail_timeout (5s) traffic returns to US.
	s.control(t, "start", "backend-us")
	started := time.Now()
	waitFor(t, 10*time.Second, "the client loop to be served by us again", func() bool {
		_, served, _, _, _ := loop.snapshot()
		return served["us"] > before["us"]+5
	})
	returned := time.Since(started)
	loop.halt()

	total, served, writes, failures, _ := loop.snapshot()
	t.Logf("client loop: %d requests, served %v, writes %v; slowest answer during the outage %v; back on us %v after start",
		total, served, writes, outageDelay, returned)
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed during the failover; first: %s", len(failures), total, failures[0])
	}
	loop.checkCannotTell(t, s)
	if outageDelay > time.Second {
		t.Errorf("slowest answer while backend-us was down = %v, want well under a second", outageDelay)
	}
	if returned > 8*time.Second {
		t.Errorf("traffic returned to us %v after backend-us started, want within the 5s fail timeout (plus start-up)", returned)
	}
}

func TestFailoverDatabaseStopped(t *testing.T) {
	s := newStack(t)
	const id = 103
	s.stop(t, "db-us", false)

	// backend-us answers 503 and NGINX moves the request to EU. The access
	// log shows both attempts for this request id.
	requestID := newRequestID("db-failover")
	var status int
	var servedBy string
	var got response
	waitFor(t, 10*time.Second, "/us/health to be served by eu", func() bool {
		var err error
		status, servedBy, got, err = s.do("GET", "/us/health", requestID, "")
		return err == nil && status == http.StatusOK && servedBy == "eu"
	})
	if diff := cmp.Diff(response{Status: "ok", Region: "eu"}, got); diff != "" {
		t.Errorf("GET /us/health with db-us down: body mismatch (-want +got):\n%s", diff)
	}
	entry := s.accessLogEntry(t, requestID)
	if entry.UpstreamStatus != "503, 200" {
		t.Errorf("access log of %s: upstream_status = %q, want \"503, 200\" (backend-us 503, then backend-eu)", requestID, entry.UpstreamStatus)
	}

	p := s.current(t, "us", id)
	status, servedBy, got = s.mustDo(t, "PUT", fmt.Sprintf("/us/properties/%d", id), newRequestID("db-failover-put"),
		fmt.Sprintf(`{"price": 321000, "version": %d}`, p.Version))
	if status != http.StatusOK || servedBy != "eu" || got.RegionOrigin != "eu" {
		t.Errorf("PUT /us/properties/%d with db-us down = %d served by %q %+v, want 200 written by eu", id, status, servedBy, got)
	}

	s.start(t, "db-us")
}

func TestRaceThroughNGINX(t *testing.T) {
	s := newStack(t)
	tests := []struct {
		name string
		id   int64
		n    int
	}{
		{"two_writers", 104, 2},
		{"ten_writers", 105, 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			version := s.current(t, "us", tt.id).Version
			path := fmt.Sprintf("/us/properties/%d", tt.id)
			statuses := race(t, tt.n, func(i int) int {
				status, _, _, err := s.do("PUT", path, newRequestID(fmt.Sprintf("race-%d", i)),
					fmt.Sprintf(`{"price": %d, "version": %d}`, 400000+i, version))
				if err != nil {
					t.Errorf("PUT %s: %v", path, err)
				}
				return status
			})
			want := map[int]int{http.StatusOK: 1, http.StatusConflict: tt.n - 1}
			if diff := cmp.Diff(want, statuses); diff != "" {
				t.Errorf("%d parallel PUTs of %s at version %d: statuses mismatch (-want +got):\n%s", tt.n, path, version, diff)
			}
			if got := s.current(t, "us", tt.id).Version; got != version+1 {
				t.Errorf("version of %d after the race = %d, want %d", tt.id, got, version+1)
			}
		})
	}
}

func TestIdempotencyThroughNGINX(t *testing.T) {
	s := newStack(t)
	const id = 106
	path := fmt.Sprintf("/us/properties/%d", id)
	p := s.current(t, "us", id)
	requestID := newRequestID("idempotent")
	body := fmt.Sprintf(`{"price": 275000.99, "version": %d}`, p.Version)

	status, _, first := s.mustDo(t, "PUT", path, requestID, body)
	if status != http.StatusOK {
		t.Fatalf("PUT %s %s: status %d (%+v), want 200", path, requestID, status, first)
	}
	status, _, second := s.mustDo(t, "PUT", path, requestID, body)
	want := response{
		Error: "duplicate request", RequestID: requestID,
		OriginalResponse: &first.Property,
	}
	if status != http.StatusUnprocessableEntity {
		t.Errorf("second PUT %s %s: status %d, want 422", path, requestID, status)
	}
	if diff := cmp.Diff(want, second); diff != "" {
		t.Errorf("second PUT %s %s: body mismatch (-want +got):\n%s", path, requestID, diff)
	}

	// NGINX neither invents nor drops X-Request-ID: without it, the backend's 400.
	status, servedBy, got := s.mustDo(t, "PUT", path, "", body)
	if status != http.StatusBadRequest || servedBy != "us" {
		t.Errorf("PUT %s without X-Request-ID: status %d served by %q, want 400 from us", path, status, servedBy)
	}
	if diff := cmp.Diff(response{Error: "X-Request-ID header is required"}, got); diff != "" {
		t.Errorf("PUT %s without X-Request-ID: body mismatch (-want +got):\n%s", path, diff)
	}
}

func TestNGINXEdges(t *testing.T) {
	s := newStack(t)
	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		wantStatus int
		want       response
	}{
		{"unknown_prefix", "GET", "/asia/properties/1", "", 404, response{Error: "not found"}},
		{"bare_health_not_exposed", "GET", "/health", "", 404, response{Error: "not found"}},
		{"debug_not_exposed", "GET", "/debug/pprof/", "", 404, response{Error: "not found"}},
		{"debug_under_prefix_not_served", "GET", "/us/debug/pprof/", "", 404, response{Error: "not found"}},
		{"body_over_limit", "PUT", "/us/properties/1", strings.Repeat("x", 70_000), 413, response{Error: "request body is larger than 65536 bytes"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, _, got := s.mustDo(t, tt.method, tt.path, newRequestID("edge"), tt.body)
			if status != tt.wantStatus {
				t.Errorf("%s %s: status %d, want %d", tt.method, tt.path, status, tt.wantStatus)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("%s %s: body mismatch (-want +got):\n%s", tt.method, tt.path, diff)
			}
		})
	}
}

// TestBackupThatFailsOnceStaysInService: while US's backend is down, /us/ has
// EU's alone. One failed answer from EU (its database stopped for a moment)
// must not take EU out of /us/'s rotation: once EU's database is back, /us/
// is served again at once, not after a fail timeout.
func TestBackupThatFailsOnceStaysInService(t *testing.T) {
	s := newStack(t)
	eu := stackDB(t, "eu")
	s.stop(t, "backend-us", false)
	waitFor(t, 10*time.Second, "/us/health to be served by eu", func() bool {
		status, servedBy, _, err := s.do("GET", "/us/health", "", "")
		return err == nil && status == http.StatusOK && servedBy == "eu"
	})

	// Not s.stop: its clean-up would wait for US to be served by US, before
	// backend-us's own clean-up has started it.
	s.control(t, "stop", "db-eu")
	t.Cleanup(func() { s.control(t, "start", "db-eu") })
	status, _, got, err := s.do("GET", "/us/health", "", "")
	if err != nil || status < 500 {
		t.Fatalf("GET /us/health with backend-us and db-eu down = %d %+v %v, want a 5xx", status, got, err)
	}
	s.control(t, "start", "db-eu")
	waitFor(t, 30*time.Second, "db-eu to answer", func() bool { return eu.Ping() == nil })
	// EU's own pool reconnects within a moment; NGINX must not add its
	// fail timeout (10 s by default) to that.
	waitFor(t, 3*time.Second, "/us/ to be served by eu again", func() bool {
		status, servedBy, _, err := s.do("GET", "/us/properties/1", "", "")
		return err == nil && status == http.StatusOK && servedBy == "eu"
	})
}

// TestFailoverAfterCommitIsNotRefused is "a write retried through NGINX
// after the first attempt committed", where the other region has not heard
// of the first attempt: US deletes a listing it created while Kafka is
// frozen, dies, and NGINX hands the same DELETE to EU. EU has no such
// listing, but a 404 would tell the client the delete did not happen; it
// answers 503 instead (it cannot tell), and once US's writes have arrived,
// the same request is a 422 with the tombstone.
func TestFailoverAfterCommitIsNotRefused(t *testing.T) {
	s := newStack(t)
	s.caughtUp(t, 30*time.Second)
	thawKafka := s.freeze(t, "kafka")
	status, _, created := s.mustDo(t, "POST", "/us/properties", newRequestID("stand-in-create"), `{"price": 123456.78}`)
	if status != http.StatusCreated {
		t.Fatalf("POST /us/properties: %d %+v, want 201", status, created)
	}
	path := fmt.Sprintf("/us/properties/%d", created.ID)
	header := http.Header{"X-Request-Id": {newRequestID("stand-in-delete")}, "If-Match": {etag(created.Property)}}
	status, h, deleted, err := s.doWith("DELETE", path, header, "")
	if err != nil || status != http.StatusOK || h.Get("X-Served-By") != "us" {
		t.Fatalf("DELETE %s: %d from %q (%+v, %v), want 200 from us", path, status, h.Get("X-Served-By"), deleted, err)
	}

	s.stop(t, "backend-us", true)
	status, h, got, err := s.doWith("DELETE", path, header, "")
	want := response{Error: "this region cannot tell yet whether the listing's own region applied this request: retry with the same X-Request-ID"}
	if err != nil || status != http.StatusServiceUnavailable || h.Get("X-Served-By") != "eu" || h.Get("Retry-After") != "1" || !cmp.Equal(want, got) {
		t.Errorf("the same DELETE failed over to eu: %d from %q, Retry-After %q, %+v (%v); want 503 from eu, Retry-After 1, %+v",
			status, h.Get("X-Served-By"), h.Get("Retry-After"), got, err, want)
	}

	// Kafka first: a backend started against a frozen broker takes its
	// time to call itself healthy.
	thawKafka()
	s.start(t, "backend-us")
	s.caughtUp(t, 60*time.Second)
	eu := fmt.Sprintf("/eu/properties/%d", created.ID)
	status, h, got, err = s.doWith("DELETE", eu, header, "")
	want = response{Error: "duplicate request", RequestID: header.Get("X-Request-Id"), OriginalResponse: &deleted.Property}
	if err != nil || status != http.StatusUnprocessableEntity || h.Get("X-Served-By") != "eu" || !cmp.Equal(want, got) {
		t.Errorf("the same DELETE in eu once replicated: %d from %q (%v) (-want +got):\n%s", status, h.Get("X-Served-By"), err, cmp.Diff(want, got))
	}
}

// TestStandInIndependentOfClocks: whether a stand-in may refuse must not
// depend on the two regions' clocks agreeing. US takes two writes of one
// listing while Kafka is frozen and dies; EU's copy of US's watermark reads
// 0.9 s ahead of EU's clock, as a US clock 0.9 s fast would send. The second
// write, retried through /us/, reaches EU, whose copy is two versions
// behind: a 409 would tell the client its committed write did not happen,
// so EU must answer 503. And on a healthy stack a stand-in's refusal comes
// within the stand-in's wait: it waits for a heartbeat of the other region
// that echoes EU's own clock, not for the other clock to agree.
func TestStandInIndependentOfClocks(t *testing.T) {
	s := newStack(t)
	eu := stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	const id = 250
	p := s.current(t, "eu", id)

	// US's clock fast, US down with writes EU has not seen.
	thawKafka := s.freeze(t, "kafka")
	status, first := s.put(t, "us", id, newRequestID("clock-first"), 250250_01)
	if status != http.StatusOK || first.Version != p.Version+1 {
		t.Fatalf("first PUT in us: %d %+v", status, first)
	}
	second := newRequestID("clock-second")
	body := fmt.Sprintf(`{"price": 250250.02, "version": %d}`, first.Version)
	status, servedBy, _, err := s.do("PUT", fmt.Sprintf("/us/properties/%d", id), second, body)
	if err != nil || status != http.StatusOK || servedBy != "us" {
		t.Fatalf("second PUT in us: %d from %s, %v", status, servedBy, err)
	}
	s.stop(t, "backend-us", true)
	if _, err := eu.Exec(`UPDATE replication_watermarks SET watermark = clock_timestamp() + interval '900 milliseconds' WHERE peer_region = 'us'`); err != nil {
		t.Fatal(err)
	}
	status, servedBy, got, err := s.do("PUT", fmt.Sprintf("/us/properties/%d", id), second, body)
	if err != nil || status != http.StatusServiceUnavailable || servedBy != "eu" {
		t.Errorf("the second PUT retried through /us/ with us down and its clock fast: %d from %s %+v (%v); want 503 from eu", status, servedBy, got, err)
	}
	thawKafka() // first: see TestFailoverAfterCommitIsNotRefused
	s.start(t, "backend-us")
	s.caughtUp(t, 60*time.Second)

	// Healthy: US's heartbeats echo EU's clock back within a round trip
	// through Kafka, which is what lets a stand-in in EU refuse.
	var now time.Time
	if err := eu.QueryRow(`SELECT clock_timestamp()`).Scan(&now); err != nil {
		t.Fatal(err)
	}
	// Idle, each relay sends a heartbeat every idleHeartbeatInterval, and
	// the echo needs EU's to reach US and then US's to reach EU: up to two
	// intervals, and a third to spare.
	took := waitFor(t, 3*idleHeartbeatInterval, "a heartbeat of US in every partition echoing EU's clock", func() bool {
		var caughtUp bool
		err := eu.QueryRow(peerCaughtUpSQL, "us", now).Scan(&caughtUp)
		return err == nil && caughtUp
	})
	if took >= standInWait {
		t.Logf("the echo took %v, longer than a stand-in waits (%v)", took, standInWait)
	}
}

// sessionDo sends one request with a session token ("" for none) and
// returns the status, the answer's headers and body.
func sessionDo(t *testing.T, s *stack, method, path, token, requestID, body string) (int, http.Header, response) {
	t.Helper()
	header := http.Header{}
	if token != "" {
		header.Set(sessionHeader, token)
	}
	if requestID != "" {
		header.Set("X-Request-ID", requestID)
	}
	status, h, got, err := s.doWith(method, path, header, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return status, h, got
}

// behind sends a GET with a session token that the serving region cannot
// have caught up with, and fails the test unless the answer is the
// session's 503: from the region itself, or NGINX's 502 after it (NGINX
// answers so when the region's 503 came first and the prefix's own
// backend, next in line, is marked down).
func behind(t *testing.T, s *stack, path, token, what string) {
	t.Helper()
	requestID := newRequestID("session-get") // to find it in NGINX's log
	status, h, got := sessionDo(t, s, "GET", path, token, requestID, "")
	switch {
	case status == http.StatusServiceUnavailable && got.Error == "this region has not caught up with your session yet" && h.Get("Retry-After") == "1":
	case status == http.StatusBadGateway:
		if e := s.accessLogEntry(t, requestID); !strings.Contains(e.UpstreamStatus, "503") {
			t.Fatalf("%s: NGINX's 502, upstream statuses %q: no region's 503", what, e.UpstreamStatus)
		}
	default:
		t.Fatalf("%s = %d %+v from %s (Retry-After %q), want the session's 503", what, status, got, h.Get("X-Served-By"), h.Get("Retry-After"))
	}
}

// TestSessionReadsItsWriteAcrossFailover: a client writes in US while
// Kafka is down (frozen: stopping and starting a broker costs the suite
// half a minute, and for the writes it is the same outage), and US's
// backend stops before the write could leave.
// Through /us/, EU serves: without the token it shows the state before the
// write, as it always did; with it, a 503, never that older state. Once
// Kafka and US's backend are back (US's relay is in its backend), the same
// token gets the write from either region.
func TestSessionReadsItsWriteAcrossFailover(t *testing.T) {
	s := newStack(t)
	const id = 433
	path := fmt.Sprintf("/us/properties/%d", id)
	s.caughtUp(t, 30*time.Second)
	before := s.current(t, "us", id)

	thaw := s.freeze(t, "kafka")
	status, h, wrote := sessionDo(t, s, "PUT", path, "", newRequestID("session"), fmt.Sprintf(`{"price": 433000, "version": %d}`, before.Version))
	token := h.Get(sessionHeader)
	if status != http.StatusOK || !strings.Contains(token, "us=") {
		t.Fatalf("PUT %s = %d %+v, token %q", path, status, wrote, token)
	}
	s.stop(t, "backend-us", true) // killed, as a crash: the write stays in its outbox

	behind(t, s, path, token, "GET "+path+" with the token")
	status, h, got := sessionDo(t, s, "GET", path, "", "", "")
	if status != http.StatusOK || got.Version != before.Version || h.Get("X-Served-By") != "eu" {
		t.Fatalf("GET %s without a token = %d %+v from %s, want EU's older version %d", path, status, got, h.Get("X-Served-By"), before.Version)
	}

	thaw()
	// The write may still be in US's outbox, with no relay to send it, or
	// have reached EU with the produce request the relay had sent before
	// it stopped: the session's 503, or the write, never the older state.
	status, h, got = sessionDo(t, s, "GET", path, token, "", "")
	if status == http.StatusOK && got.Version != wrote.Version {
		t.Fatalf("GET %s with the token, Kafka back, US's backend not = %+v from %s, older than the session's write", path, got, h.Get("X-Served-By"))
	}

	s.start(t, "backend-us")
	for _, prefix := range []string{"eu", "us"} {
		p := fmt.Sprintf("/%s/properties/%d", prefix, id)
		var got response
		waitFor(t, 10*time.Second, p+" with the token answered", func() bool {
			var status int
			status, h, got = sessionDo(t, s, "GET", p, token, "", "")
			if status == http.StatusOK && got.Version < wrote.Version {
				t.Fatalf("GET %s with the token = version %d from %s, older than the session's %d", p, got.Version, h.Get("X-Served-By"), wrote.Version)
			}
			return status == http.StatusOK && h.Get("X-Served-By") == prefix
		})
		if got.Version != wrote.Version || got.Price != wrote.Price || h.Get("X-Served-By") != prefix {
			t.Errorf("GET %s with the token = %+v from %s, want the session's write from %s", p, got, h.Get("X-Served-By"), prefix)
		}
	}
}

// TestSessionMonotonicReads: a session reads a listing in US after another
// client's write there, while Kafka is frozen, then reads it through /eu/.
// EU has not got the write and cannot within the session's wait: NGINX
// takes EU's 503 to US, which has it. Never the older state, which EU
// still serves to a client without the token. Once Kafka resumes, EU
// serves the session itself.
func TestSessionMonotonicReads(t *testing.T) {
	s := newStack(t)
	const id = 435
	us, eu := fmt.Sprintf("/us/properties/%d", id), fmt.Sprintf("/eu/properties/%d", id)
	s.caughtUp(t, 30*time.Second)
	old := s.current(t, "us", id)

	thaw := s.freeze(t, "kafka")
	status, _, wrote := s.mustDo(t, "PUT", us, newRequestID("other-client"), fmt.Sprintf(`{"price": 435000, "version": %d}`, old.Version))
	if status != http.StatusOK {
		t.Fatalf("PUT %s = %d %+v", us, status, wrote)
	}
	status, h, got := sessionDo(t, s, "GET", us, "", "", "")
	token := h.Get(sessionHeader)
	if status != http.StatusOK || got.Version != wrote.Version || !strings.Contains(token, "us=") {
		t.Fatalf("GET %s = %d %+v, token %q", us, status, got, token)
	}
	status, h, got = sessionDo(t, s, "GET", eu, token, "", "")
	if status != http.StatusOK || got.Version != wrote.Version || h.Get("X-Served-By") != "us" {
		t.Fatalf("GET %s with the token, Kafka frozen = %d %+v from %s; want version %d from US", eu, status, got, h.Get("X-Served-By"), wrote.Version)
	}
	// Without the token: EU's own copy, from before the write. (NGINX may
	// still send /eu/ to US for a few seconds after EU's 503.)
	waitFor(t, 10*time.Second, "EU serving /eu/ again", func() bool {
		status, h, got = sessionDo(t, s, "GET", eu, "", "", "")
		return h.Get("X-Served-By") == "eu"
	})
	if status != http.StatusOK || got.Version != old.Version {
		t.Fatalf("GET %s without a token = %d %+v, want EU's older version %d", eu, status, got, old.Version)
	}

	thaw()
	waitFor(t, 15*time.Second, "EU serving the session itself", func() bool {
		status, h, got = sessionDo(t, s, "GET", eu, token, "", "")
		if status == http.StatusOK && got.Version < wrote.Version {
			t.Fatalf("GET %s with the token = version %d from %s, older than the session's %d", eu, got.Version, h.Get("X-Served-By"), wrote.Version)
		}
		return status == http.StatusOK && h.Get("X-Served-By") == "eu"
	})
	if next := h.Get(sessionHeader); next != token {
		t.Errorf("EU's answer carries %q, want the token it was sent, %q: it showed nothing of EU's own", next, token)
	}
}

// TestSessionAcrossAClockSetBack sets EU's database clock back by 5 s (a
// restart under libfaketime, as the fault campaign's clock faults do),
// then writes in EU and reads through US with the write's token at once.
// US holds a watermark of EU from before the step, ahead of EU's clock
// now: had EU served at once, its write would carry a time US has vouched
// for already, and US would answer the older state. EU serves again only
// once its clock has passed that watermark (rejoin.go, clockPast).
func TestSessionAcrossAClockSetBack(t *testing.T) {
	s := newStack(t)
	const id = 434
	path := fmt.Sprintf("/eu/properties/%d", id)
	s.caughtUp(t, 30*time.Second)
	// A write in EU, so that US's watermark of EU is a fresh one.
	if status, got := s.put(t, "eu", id, newRequestID("clock-before"), 4340_00); status != http.StatusOK {
		t.Fatalf("PUT %s = %d %+v", path, status, got)
	}
	s.caughtUp(t, 30*time.Second)

	t.Cleanup(func() { s.control(t, "unskew", "db-eu") })
	s.control(t, "skew", "db-eu", "-5")
	waitFor(t, 30*time.Second, "eu serving again after its clock was set back", func() bool {
		status, servedBy, _, err := s.do("GET", "/eu/health", "", "")
		return err == nil && status == http.StatusOK && servedBy == "eu"
	})
	before := s.current(t, "eu", id)
	status, h, wrote := sessionDo(t, s, "PUT", path, "", newRequestID("clock-after"), fmt.Sprintf(`{"price": 4341, "version": %d}`, before.Version))
	token := h.Get(sessionHeader)
	if status != http.StatusOK || h.Get("X-Served-By") != "eu" || !strings.Contains(token, "eu=") {
		t.Fatalf("PUT %s = %d %+v from %s, token %q; want 200 from eu", path, status, wrote, h.Get("X-Served-By"), token)
	}
	us := fmt.Sprintf("/us/properties/%d", id)
	status, h, got := sessionDo(t, s, "GET", us, token, "", "")
	if status == http.StatusOK && got.Version < wrote.Version {
		t.Fatalf("GET %s with the token of EU's write = version %d from %s, older than the session's %d: US vouched for EU's new write before it was made",
			us, got.Version, h.Get("X-Served-By"), wrote.Version)
	}
	if status != http.StatusOK && status != http.StatusServiceUnavailable {
		t.Fatalf("GET %s with the token = %d %+v", us, status, got)
	}
}
