//go:build integration && hostile

package main

// The hostile-client run: what a client that means harm can make the
// stack do, through NGINX, from addresses NGINX rate-limits (127.0.0.2 to
// 127.0.0.9; 127.0.0.1, the tests' own, is exempt). For a bounded time,
// while a steady load of PUTs replicates from US to EU, the hostile
// clients send made-up methods, 8 KiB header lines, bodies one byte a
// second, bodies at and over the limit, malformed JSON at every depth, list
// queries with every filter at its extreme, and a flood of lag reports.
//
// It holds when: no answer is a 5xx but a 503 (and 429s, NGINX's limit);
// every 4xx is JSON; neither backend's live heap passes heapBound nor its
// /metrics more than seriesBound series of requests; and the replication
// delay's p99 stays within twice that of the same load without the hostile
// clients (the baseline taken as at least 100 ms: below that, a few
// milliseconds of scheduling on two cores would be "twice").
//
//	go test -tags=integration,hostile -run TestHostileClients -v .

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	hostilePhase = 20 * time.Second
	// heapBound is the most live heap a backend may hold under the hostile
	// load (it holds about 5 MiB at rest).
	heapBound = 64 << 20
	// seriesBound is the most series of listing_http_requests_total a
	// backend may have: routes × the fixed methods × the statuses they
	// answer, a few dozen.
	seriesBound = 80
)

func TestHostileClients(t *testing.T) {
	s := newStack(t)
	s.caughtUp(t, 60*time.Second)
	eu := stackDB(t, "eu")

	baseline := replicationDelayP99(t, s, eu, hostilePhase, nil)
	t.Logf("replication delay p99 without hostile clients: %v", baseline)

	var (
		statuses sync.Map // "kind status" -> *atomic.Int64
		bad      = make(chan string, 100)
	)
	count := func(kind string, status int) {
		v, _ := statuses.LoadOrStore(fmt.Sprintf("%s %d", kind, status), new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	}
	judge := func(kind string, status int, h http.Header, body []byte) {
		count(kind, status)
		switch {
		case status >= 500 && status != http.StatusServiceUnavailable:
			reportBad(bad, fmt.Sprintf("%s: %d %.200s", kind, status, body))
		case status >= 400 && status != http.StatusTooManyRequests && !isJSONError(body):
			reportBad(bad, fmt.Sprintf("%s: %d is not a JSON error: %.200q", kind, status, body))
		}
	}
	during := replicationDelayP99(t, s, eu, hostilePhase, func(ctx context.Context) {
		var wg sync.WaitGroup
		for a := range 8 {
			addr := fmt.Sprintf("127.0.0.%d", a+2)
			wg.Go(func() { hostileClient(ctx, s, addr, a, judge) })
		}
		// Slow bodies: a few connections per address that send a PUT's
		// body one byte a second (NGINX holds them, not a backend).
		for a := range 8 {
			addr := fmt.Sprintf("127.0.0.%d", a+2)
			for range 4 {
				wg.Go(func() { slowBody(ctx, s, addr) })
			}
		}
		wg.Wait()
	})
	t.Logf("replication delay p99 with hostile clients: %v", during)
	close(bad)
	for b := range bad {
		t.Error(b)
	}
	statuses.Range(func(k, v any) bool {
		t.Logf("%s × %d", k, v.(*atomic.Int64).Load())
		return true
	})
	if limit := 2 * max(baseline, 100*time.Millisecond); during > limit {
		t.Errorf("replication delay p99 %v under hostile load, want at most %v (twice %v)", during, limit, max(baseline, 100*time.Millisecond))
	}
	for _, port := range []string{"8001", "8002"} {
		url := "http://127.0.0.1:" + port + "/metrics"
		heap, err := scrape(url, "go_gc_heap_live_bytes")
		if err != nil || heap > heapBound {
			t.Errorf("backend on %s: live heap %.0f MiB (%v), want at most %d MiB", port, heap/(1<<20), err, heapBound>>20)
		}
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		n := strings.Count(string(body), "\nlisting_http_requests_total{")
		if n > seriesBound {
			t.Errorf("backend on %s: %d series of listing_http_requests_total, want at most %d", port, n, seriesBound)
		}
		t.Logf("backend on %s: live heap %.1f MiB, %d request series", port, heap/(1<<20), n)
	}
}

// reportBad records a finding, the first hundred of them.
func reportBad(bad chan<- string, s string) {
	select {
	case bad <- s:
	default:
	}
}

// isJSONError reports whether body is {"error": "..."}.
func isJSONError(body []byte) bool {
	var e struct {
		Error string `json:"error"`
	}
	return json.Unmarshal(body, &e) == nil && e.Error != ""
}

// replicationDelayP99 writes to US at 50 writes a second for d, with
// hostile running meanwhile (nil: nothing), and returns the p99 of the time
// from each write's 200 until EU's database holds it. Every write must be
// answered 200.
func replicationDelayP99(t *testing.T, s *stack, eu *sql.DB, d time.Duration, hostile func(context.Context)) time.Duration {
	t.Helper()
	const rate, ids = 50, 200
	var (
		mu       sync.Mutex
		versions = map[int64]int64{}
		l        latencies
		delays   = &delayTracker{waiting: map[int64]pendingWrite{}, l: &l}
		failures = make(chan string, 10)
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var background sync.WaitGroup
	background.Go(func() { delays.poll(ctx, eu) }) // until cancel
	hostileCtx, stopHostile := context.WithCancel(ctx)
	if hostile != nil {
		background.Go(func() { hostile(hostileCtx) })
	}
	run := time.Now().UnixNano()
	pace(int(d.Seconds())*rate, rate, func(i int) {
		id := int64(1 + i%ids)
		path := fmt.Sprintf("/us/properties/%d", id)
		mu.Lock()
		version, known := versions[id]
		mu.Unlock()
		if !known {
			_, _, cur, err := s.do("GET", path, "", "")
			if err != nil {
				reportBad(failures, err.Error())
				return
			}
			version = cur.Version
		}
		status, _, got, err := s.do("PUT", path, fmt.Sprintf("hostile-load-%d-%d", run, i), fmt.Sprintf(`{"price": %d, "version": %d}`, 300000+i, version))
		mu.Lock()
		defer mu.Unlock()
		if err != nil || status != http.StatusOK {
			reportBad(failures, fmt.Sprintf("PUT %s: %d %v", path, status, err))
			if status == http.StatusConflict {
				versions[id] = got.CurrentVersion
			}
			return
		}
		versions[id] = got.Version
		delays.acked(id, got.Version)
	})
	stopHostile()
	waitFor(t, 30*time.Second, "every write to reach eu", func() bool { return delays.pending() == 0 })
	cancel()
	background.Wait()
	close(failures)
	for f := range failures {
		t.Errorf("the steady load: %s", f)
	}
	return time.Duration(l.percentile(0.99) * float64(time.Millisecond))
}

// hostileClient sends one kind of hostile request after another from addr
// until ctx ends, and judges every answer.
func hostileClient(ctx context.Context, s *stack, addr string, seed int, judge func(kind string, status int, h http.Header, body []byte)) {
	client := clientFrom(addr)
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	send := func(kind, method, path string, header http.Header, body string) {
		req, err := http.NewRequestWithContext(ctx, method, s.url+path, strings.NewReader(body))
		if err != nil {
			return
		}
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := client.Do(req)
		if err != nil {
			return // ctx ended, or NGINX closed a connection it would not serve
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		resp.Body.Close()
		judge(kind, resp.StatusCode, resp.Header, b)
	}
	letters := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte('A' + rng.IntN(26))
		}
		return string(b)
	}
	for i := 0; ctx.Err() == nil; i++ {
		id := 1 + rng.IntN(500)
		switch i % 7 {
		case 0:
			send("made-up method", letters(3+rng.IntN(1000)), fmt.Sprintf("/us/properties/%d", id), nil, "")
		case 1:
			send("8 KiB header", "GET", fmt.Sprintf("/eu/properties/%d", id), http.Header{"X-Filler": {strings.Repeat("a", 8<<10)}}, "")
		case 2:
			// A body one byte under, at, and one over the limit (64 KiB).
			size := 64<<10 + rng.IntN(3) - 1
			prefix, suffix := `{"price": 1, "x": "`, `"}`
			send("body at the limit", "PUT", fmt.Sprintf("/us/properties/%d", id),
				http.Header{"X-Request-Id": {newRequestID("hostile")}, "Content-Type": {"application/json"}},
				prefix+strings.Repeat("a", size-len(prefix)-len(suffix))+suffix)
		case 3:
			depth := 1 + rng.IntN(200)
			body := strings.Repeat(`{"a":`, depth) + strings.Repeat("[", rng.IntN(3)) + `1` + strings.Repeat("}", rng.IntN(depth+1))
			send("malformed JSON", "POST", "/eu/properties", http.Header{"X-Request-Id": {newRequestID("hostile")}, "Content-Type": {"application/json"}}, body)
		case 4:
			q := []string{
				"min_price=9999999999.99", "max_price=0.01", "min_price=0.01&max_price=9999999999.99",
				"min_bedrooms=100&min_bathrooms=100", "region_origin=eu&min_bedrooms=100&limit=200",
				"limit=200&cursor=" + encodeCursor(1<<62),
			}[rng.IntN(6)]
			send("extreme list query", "GET", "/us/properties?"+q, nil, "")
		default:
			send("lag report", "GET", "/us/replication-lag", nil, "")
		}
	}
}

// slowBody opens a connection from addr and sends a PUT whose body comes
// one byte a second, until ctx ends.
func slowBody(ctx context.Context, s *stack, addr string) {
	host := strings.TrimPrefix(s.url, "http://")
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(addr)}, Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return
	}
	defer c.Close()
	context.AfterFunc(ctx, func() { c.Close() })
	fmt.Fprintf(c, "PUT /us/properties/1 HTTP/1.1\r\nHost: %s\r\nX-Request-ID: %s\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n", host, newRequestID("slow"))
	r := bufio.NewReader(c)
	for ctx.Err() == nil {
		if _, err := c.Write([]byte{' '}); err != nil {
			r.ReadString('\n')
			return
		}
		time.Sleep(time.Second)
	}
}
