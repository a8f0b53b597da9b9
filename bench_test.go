//go:build integration

package main

// Benchmarks of the running stack, through NGINX, with many concurrent
// clients. Each reports requests per second and latency percentiles with
// b.ReportMetric, and fails if any request errs. `./stack.sh bench` runs them
// with fixed request counts next to pgbench on the same PostgreSQL cluster and
// prints the ratios; CI runs each once (-benchtime=1x) so they cannot rot.

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/bits"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchClients is how many clients the closed-loop benchmarks run, and how
// many pgbench runs for the comparison (./stack.sh bench).
const benchClients = 32

// benchStack is newStack with an HTTP client that keeps many connections
// alive, for the open-loop benchmarks, which send each request from its own
// goroutine. The closed-loop ones give each client a conn instead.
func benchStack(b *testing.B) *stack {
	b.Helper()
	s := &stack{
		url: setting("STACK_URL", "http://localhost:8080"),
		client: &http.Client{
			Timeout: 15 * time.Second,
			Transport: &http.Transport{
				MaxIdleConns:        4 * benchClients,
				MaxIdleConnsPerHost: 4 * benchClients,
				IdleConnTimeout:     30 * time.Second,
			},
		},
	}
	status, _, _, err := s.do("GET", "/us/health", "", "")
	if err != nil || status != http.StatusOK {
		b.Fatalf("the stack at %s is not up (GET /us/health: %d, %v): start it with `./stack.sh up` or `docker compose up -d --wait`",
			s.url, status, err)
	}
	return s
}

// conn is one load-generating client: HTTP/1.1 keep-alive over a single TCP
// connection, each request written from a reused buffer and each answer
// parsed by http.ReadResponse. It is net/http's Transport cut down to one
// connection used by one goroutine: no pool, no per-connection reader and
// writer goroutines handing each request across channels. The load
// generator shares the two cores with the stack it measures, so every
// microsecond it spends is one the stack does not get; pgbench's client,
// the other side of the comparison, is lean C.
type conn struct {
	host string // host:port of NGINX
	c    net.Conn
	r    *bufio.Reader
	req  []byte
	body bytes.Buffer
}

func newConn(b *testing.B, s *stack) *conn {
	b.Helper()
	u, err := url.Parse(s.url)
	if err != nil {
		b.Fatalf("STACK_URL %q: %v", s.url, err)
	}
	return &conn{host: u.Host}
}

// do sends one request and decodes the JSON answer, like stack.do. On any
// error the connection is dropped and the next request dials a new one.
func (c *conn) do(method, path, requestID, body string) (status int, got response, err error) {
	defer func() {
		if err != nil && c.c != nil {
			c.c.Close()
			c.c = nil
		}
	}()
	if c.c == nil {
		if c.c, err = net.DialTimeout("tcp", c.host, 5*time.Second); err != nil {
			return 0, got, err
		}
		c.r = bufio.NewReader(c.c)
	}
	c.c.SetDeadline(time.Now().Add(15 * time.Second))
	r := append(c.req[:0], method...)
	r = append(r, ' ')
	r = append(r, path...)
	r = append(r, " HTTP/1.1\r\nHost: "...)
	r = append(r, c.host...)
	if requestID != "" {
		r = append(r, "\r\nX-Request-ID: "...)
		r = append(r, requestID...)
	}
	if body != "" {
		r = append(r, "\r\nContent-Type: application/json\r\nContent-Length: "...)
		r = strconv.AppendInt(r, int64(len(body)), 10)
	}
	r = append(r, "\r\n\r\n"...)
	r = append(r, body...)
	c.req = r
	if _, err := c.c.Write(r); err != nil {
		return 0, got, err
	}
	resp, err := http.ReadResponse(c.r, nil)
	if err != nil {
		return 0, got, err
	}
	c.body.Reset()
	_, err = c.body.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil {
		return resp.StatusCode, got, err
	}
	if resp.Close {
		c.c.Close()
		c.c = nil
	}
	if err := json.Unmarshal(c.body.Bytes(), &got); err != nil {
		return resp.StatusCode, got, fmt.Errorf("%s %s: decoding %q: %w", method, path, c.body.Bytes(), err)
	}
	return resp.StatusCode, got, nil
}

// outcome of one benchmark request.
type result int

const (
	resultOK       result = iota
	resultConflict        // a 409: a lost optimistic-locking race, not throughput
	resultFailed
)

// latencies collects what the workers saw.
type latencies struct {
	mu        sync.Mutex
	ok        []time.Duration
	conflicts int
	errors    int
	firstErr  string
}

func (l *latencies) add(r result, d time.Duration, err string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch r {
	case resultOK:
		l.ok = append(l.ok, d)
	case resultConflict:
		l.conflicts++
	case resultFailed:
		l.errors++
		if l.firstErr == "" {
			l.firstErr = err
		}
	}
}

// percentile returns the p-th quantile of the successful requests' latency,
// in milliseconds (0 if none succeeded).
func (l *latencies) percentile(p float64) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.percentileLocked(p)
}

func (l *latencies) percentileLocked(p float64) float64 {
	if len(l.ok) == 0 {
		return 0
	}
	slices.Sort(l.ok)
	return float64(l.ok[min(int(p*float64(len(l.ok))), len(l.ok)-1)]) / float64(time.Millisecond)
}

// report sets the benchmark's metrics: successful requests per second over
// elapsed, latency percentiles of the successful ones, errors and conflicts.
// It fails the benchmark if any request failed.
func (l *latencies) report(b *testing.B, elapsed time.Duration, unit string) {
	b.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	pct := l.percentileLocked
	b.ReportMetric(0, "ns/op") // meaningless here: requests overlap
	b.ReportMetric(float64(len(l.ok))/elapsed.Seconds(), unit+"/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
	b.ReportMetric(pct(1), "max_ms")
	b.ReportMetric(float64(l.errors), "errors")
	b.ReportMetric(float64(l.conflicts), "conflicts")
	if l.errors > 0 {
		b.Errorf("%d requests failed; first: %s", l.errors, l.firstErr)
	}
}

// closedLoop runs b.N calls of do over benchClients workers, each sending its
// next request when the previous one is answered, and reports the results.
func closedLoop(b *testing.B, unit string, do func(worker, i int) (result, string)) {
	b.Helper()
	var l latencies
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for w := range benchClients {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				t := time.Now()
				r, err := do(w, i)
				l.add(r, time.Since(t), err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	l.report(b, elapsed, unit)
}

// classify turns a response into a result.
func classify(status int, err error, method string) (result, string) {
	switch {
	case err != nil:
		return resultFailed, err.Error()
	case status == http.StatusOK, status == http.StatusCreated && method == "POST":
		return resultOK, ""
	case status == http.StatusConflict && method == "PUT":
		return resultConflict, ""
	}
	return resultFailed, fmt.Sprintf("%s: status %d", method, status)
}

// writer is one benchmark client's PUTs: it owns a range of ids no other
// writer touches and remembers their versions, as a client that read them
// would.
type writer struct {
	c        *conn
	region   string
	ids      []int64
	versions map[int64]int64
	run      string
}

func newWriter(c *conn, region string, worker, perWorker int) *writer {
	w := &writer{c: c, region: region, versions: map[int64]int64{}, run: fmt.Sprintf("%d-%d", time.Now().UnixNano(), worker)}
	for k := range perWorker {
		w.ids = append(w.ids, int64(1+worker*perWorker+k))
	}
	return w
}

// put updates the i-th of the writer's ids from the version it knows
// (reading it first if it knows none) with a fresh request id.
func (w *writer) put(i int) (result, string) {
	id := w.ids[i%len(w.ids)]
	path := fmt.Sprintf("/%s/properties/%d", w.region, id)
	version, known := w.versions[id]
	if !known {
		status, cur, err := w.c.do("GET", path, "", "")
		if r, msg := classify(status, err, "GET"); r != resultOK {
			return r, msg
		}
		version = cur.Version
	}
	status, got, err := w.c.do("PUT", path, fmt.Sprintf("bench-%s-%d", w.run, i),
		fmt.Sprintf(`{"price": %d.%02d, "version": %d}`, 100000+i%900000, i%100, version))
	r, msg := classify(status, err, "PUT")
	switch r {
	case resultOK:
		w.versions[id] = got.Version
	case resultConflict:
		w.versions[id] = got.CurrentVersion
	}
	return r, msg
}

// newWriters returns one writer per benchmark client, each on its own
// connection and with its own share of the US ids.
func newWriters(b *testing.B, s *stack) []*writer {
	b.Helper()
	writers := make([]*writer, benchClients)
	for w := range writers {
		writers[w] = newWriter(newConn(b, s), "us", w, 1000/benchClients)
	}
	return writers
}

// newConns returns one connection per benchmark client.
func newConns(b *testing.B, s *stack) []*conn {
	b.Helper()
	conns := make([]*conn, benchClients)
	for w := range conns {
		conns[w] = newConn(b, s)
	}
	return conns
}

func BenchmarkGetProperty(b *testing.B) {
	s := benchStack(b)
	conns := newConns(b, s)
	closedLoop(b, "req", func(worker, i int) (result, string) {
		id := 1 + rand.IntN(1000)
		status, _, err := conns[worker].do("GET", "/us/properties/"+strconv.Itoa(id), "", "")
		return classify(status, err, "GET")
	})
}

func BenchmarkPutProperty(b *testing.B) {
	s := benchStack(b)
	writers := newWriters(b, s)
	closedLoop(b, "req", func(worker, i int) (result, string) {
		return writers[worker].put(i)
	})
}

// BenchmarkGetRejected and BenchmarkPutRejected are the HTTP tier alone:
// the same requests as BenchmarkGetProperty and BenchmarkPutProperty, through
// NGINX and the backend's every layer (access log, metrics, session token,
// routing, JSON answer), except that the service rejects each with a 400
// before it reaches the database: a GET of id 0, and a PUT whose version is
// 0, which is decoded and validated first. Whatever the database, the
// relay and Kafka do, a GET or PUT cannot be served faster than these, so
// they are the ceiling the HTTP tier puts on the ratios to pgbench
// (docs/benchmarks.md, "The HTTP tier's ceiling").
func BenchmarkGetRejected(b *testing.B) {
	s := benchStack(b)
	conns := newConns(b, s)
	closedLoop(b, "req", func(worker, i int) (result, string) {
		status, _, err := conns[worker].do("GET", "/us/properties/0", "", "")
		return rejected(status, err, "GET")
	})
}

func BenchmarkPutRejected(b *testing.B) {
	s := benchStack(b)
	conns := newConns(b, s)
	run := time.Now().UnixNano()
	closedLoop(b, "req", func(worker, i int) (result, string) {
		id := 1 + i%1000
		status, _, err := conns[worker].do("PUT", "/us/properties/"+strconv.Itoa(id), fmt.Sprintf("bench-%d-%d", run, i),
			fmt.Sprintf(`{"price": %d.%02d, "version": 0}`, 100000+i%900000, i%100))
		return rejected(status, err, "PUT")
	})
}

// rejected is classify for the requests the service must reject: a 400 is
// what they are for, and anything else fails the benchmark.
func rejected(status int, err error, method string) (result, string) {
	switch {
	case err != nil:
		return resultFailed, err.Error()
	case status == http.StatusBadRequest:
		return resultOK, ""
	}
	return resultFailed, fmt.Sprintf("%s: status %d, not the 400 the benchmark sends it for", method, status)
}

// BenchmarkCreateProperty is POSTs of new listings in US, each with a
// fresh request id.
func BenchmarkCreateProperty(b *testing.B) {
	s := benchStack(b)
	conns := newConns(b, s)
	run := time.Now().UnixNano()
	closedLoop(b, "req", func(worker, i int) (result, string) {
		status, _, err := conns[worker].do("POST", "/us/properties", fmt.Sprintf("bench-create-%d-%d", run, i),
			fmt.Sprintf(`{"price": %d.%02d, "bedrooms": %d, "bathrooms": %d}`, 100000+i%900000, i%100, i%6, 1+i%4))
		return classify(status, err, "POST")
	})
}

// BenchmarkPutDuringPurge asks whether the purge (retention.go) is felt by
// writes. PUTs go to US at a steady putDuringPurgeRate, a write load below
// saturation, in ten rounds, five alone and five while a purge works
// through 50 expired request ids per PUT (a million in bench.sh's run),
// as a region's purge does after a long pause, in the order purgeRound
// gives. A closed loop at saturation would not ask the
// question: there, any work beside the requests takes its share of the two
// cores and shows in every percentile. The rounds alone measure the noise,
// and the question becomes a rank test (higherP): how likely is a split of
// the ten rounds' p99s into two groups of five, drawn at random, to put the
// purge's rounds at least as high as they are? bench.sh calls the purge
// within noise when that is 5% or more.
func BenchmarkPutDuringPurge(b *testing.B) {
	const rounds = 10
	s := benchStack(b)
	us := stackDB(b, "us")
	// The backlog is two hours old, expired for this purge (an hour's
	// retention) and not for the backend's own (RETENTION, days): the
	// backend's purge, which holds the region's purge lock for a whole
	// round, would otherwise take it on and keep the lock for the half hour
	// a million rows take, and the rounds alone would wait that long for it.
	p := newPurger(slog.New(slog.NewTextHandler(io.Discard, nil)), us, "us", time.Hour,
		func(context.Context) (time.Duration, error) { return time.Minute, nil })
	// What an earlier run left (a run purges only part of its backlog) goes
	// first, in one statement.
	if _, err := us.Exec(`DELETE FROM processed_requests WHERE request_id LIKE 'bench-expired-%'`); err != nil {
		b.Fatal(err)
	}
	// The backlog: request ids a millisecond apart, as a region's are.
	if _, err := us.Exec(`
INSERT INTO processed_requests (request_id, fingerprint, property_id, price, region_origin, version, updated_at, processed_at)
SELECT 'bench-expired-' || $1 || '-' || g, 'f', 1, 1, 'us', 2, now(), now() - interval '2 hours' + g * interval '1 ms'
FROM generate_series(1, $2) g`, strconv.FormatInt(time.Now().UnixNano(), 10), 50*b.N); err != nil {
		b.Fatal(err)
	}
	// The insert's own aftermath (autovacuum, dirty buffers) is not the
	// purge's: settle it before measuring.
	for _, q := range []string{`VACUUM ANALYZE processed_requests`, `CHECKPOINT`} {
		if _, err := us.Exec(q); err != nil {
			b.Fatal(err)
		}
	}
	expired := func() (n int) {
		if err := us.QueryRow(`SELECT count(*) FROM processed_requests WHERE request_id LIKE 'bench-expired-%'`).Scan(&n); err != nil {
			b.Fatal(err)
		}
		return n
	}
	before := expired()

	// A request takes whichever writer is free: each writer's PUTs stay
	// one at a time, as its versions need.
	free := make(chan *writer, benchClients)
	for _, w := range newWriters(b, s) {
		free <- w
	}
	// An unmeasured warm-up: each writer learns its listings' versions
	// (a GET before its first PUT of each), and the insert's cold pages
	// are read in.
	const warmUp = 5000
	pace(warmUp, putDuringPurgeRate, func(i int) {
		w := <-free
		defer func() { free <- w }()
		w.put(i)
	})
	var alone, purging, walAlone, walPurging, rows []float64
	// The write-ahead log a round wrote, in MiB: every PUT's commit
	// flushes the log up to its own record, the purge's records before it
	// included.
	walMiB := func() float64 {
		var lsn float64
		if err := us.QueryRow(`SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')`).Scan(&lsn); err != nil {
			b.Fatal(err)
		}
		return lsn / (1 << 20)
	}
	perRound := max(b.N/rounds, 1)
	b.ResetTimer()
	// Rounds alone are alone: holding the region's purge lock keeps any
	// purge out of them (a round tries the lock and skips when it is held),
	// the backend's own included, should it find rows of its own expired.
	lock, err := us.Conn(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer lock.Close()
	hold := func(held bool) {
		q := `SELECT pg_advisory_unlock($1)`
		if held {
			q = `SELECT pg_advisory_lock($1)`
		}
		if _, err := lock.ExecContext(context.Background(), q, purgeLockKey); err != nil {
			b.Fatal(err)
		}
	}
	for round := range rounds {
		purge := purgeRound(round)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		hold(!purge)
		if purge {
			// Purge rounds back to back, as a region's purge does with a
			// backlog.
			wg.Go(func() {
				for ctx.Err() == nil {
					if err := p.round(ctx); err != nil && ctx.Err() == nil {
						b.Error(err)
						return
					}
					sleep(ctx, purgePause)
				}
			})
		}
		var l latencies
		wal, purged := walMiB(), p.requestIDs.Load()
		pace(perRound, putDuringPurgeRate, func(i int) {
			w := <-free
			defer func() { free <- w }()
			t := time.Now()
			r, msg := w.put(warmUp + round*perRound + i)
			l.add(r, time.Since(t), msg)
		})
		cancel()
		wg.Wait()
		if !purge {
			hold(false)
		}
		if l.errors > 0 {
			b.Fatalf("round %d: %d requests failed; first: %s", round+1, l.errors, l.firstErr)
		}
		p99, wal := l.percentile(0.99), walMiB()-wal
		if purge {
			purging, walPurging = append(purging, p99), append(walPurging, wal)
			rows = append(rows, float64(p.requestIDs.Load()-purged))
		} else {
			alone, walAlone = append(alone, p99), append(walAlone, wal)
		}
	}
	b.StopTimer()
	b.Logf("%d PUTs a round: p99 alone %.2f ms, while purging %.2f ms; WAL written alone %.1f MiB, while purging %.1f MiB; rows purged by the round %.0f", perRound, alone, purging, walAlone, walPurging, rows)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(median(alone), "p99_alone_ms")
	b.ReportMetric(median(purging), "p99_purge_ms")
	b.ReportMetric(higherP(purging, alone), "p_value")
	b.ReportMetric(float64(before-expired()), "purged")
}

// purgeRound says whether round r (from 0) of BenchmarkPutDuringPurge
// purges: the rounds go alone, purge, purge, alone, alone, purge, purge, …
// (ABBA), so that a drift over the run (the table's growth, the machine
// warming) weighs on both kinds of round alike, where a plain alternation
// would always put the purge's round after its alone one.
func purgeRound(r int) bool { return (r+1)%4 >= 2 }

// higherP is a one-sided Mann–Whitney test, exact for small samples: the
// statistic is how many pairs (x from xs, y from ys) have x > y, and the
// result is the share of all ways to deal the pooled values into groups of
// len(xs) and len(ys) that give a statistic at least as large. A small
// share says xs are higher than chance would make them.
func higherP(xs, ys []float64) float64 {
	pairs := func(in []bool, pooled []float64) (n int) {
		for i, x := range pooled {
			for j, y := range pooled {
				if in[i] && !in[j] && x > y {
					n++
				}
			}
		}
		return n
	}
	pooled := append(slices.Clone(xs), ys...)
	in := make([]bool, len(pooled))
	for i := range xs {
		in[i] = true
	}
	observed := pairs(in, pooled)
	var dealt, asHigh int
	for mask := range 1 << len(pooled) {
		if bits.OnesCount(uint(mask)) != len(xs) {
			continue
		}
		for i := range in {
			in[i] = mask&(1<<i) != 0
		}
		dealt++
		if pairs(in, pooled) >= observed {
			asHigh++
		}
	}
	return float64(asHigh) / float64(dealt)
}

// putDuringPurgeRate is BenchmarkPutDuringPurge's PUTs per second: half of
// the thousand writes a second the service is sized for, a quarter of what
// this machine's stack takes at most.
const putDuringPurgeRate = 500

// BenchmarkMixed is nine reads of random listings for every write.
func BenchmarkMixed(b *testing.B) {
	s := benchStack(b)
	writers := newWriters(b, s)
	closedLoop(b, "req", func(worker, i int) (result, string) {
		if i%10 == 0 {
			return writers[worker].put(i / 10)
		}
		status, _, err := writers[worker].c.do("GET", "/us/properties/"+strconv.Itoa(1+rand.IntN(1000)), "", "")
		return classify(status, err, "GET")
	})
}

// paced sends b.N calls of do at rate per second (see pace) and returns how
// long the run took.
func paced(b *testing.B, rate int, do func(i int)) time.Duration {
	b.Helper()
	b.ResetTimer()
	elapsed := pace(b.N, rate, do)
	b.StopTimer()
	return elapsed
}

// pace sends n calls of do at rate per second, each in its own goroutine (an
// open loop: a slow answer does not delay the next request), and returns how
// long they took.
func pace(n, rate int, do func(i int)) time.Duration {
	interval := time.Second / time.Duration(rate)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		wg.Go(func() { do(i) })
	}
	wg.Wait()
	return time.Since(start)
}

// timedGet returns a call for pace: a GET through US of a random seeded
// listing, its time and outcome added to l.
func timedGet(s *stack, l *latencies) func(int) {
	return func(int) {
		t := time.Now()
		status, _, _, err := s.do("GET", fmt.Sprintf("/us/properties/%d", 1+rand.IntN(1000)), "", "")
		r, msg := classify(status, err, "GET")
		l.add(r, time.Since(t), msg)
	}
}

// BenchmarkGetPaced1000 measures GET latency at a steady 1,000 requests per
// second, below saturation, where latency rather than throughput is the
// question, and whether Prometheus's scrapes (every 5 s) show in its tail:
// the requests go in four quarters, Prometheus scraping, paused, paused,
// scraping, so that a drift over the run weighs on both alike. The usual
// figures are the scraped quarters'; p99_paused_ms and its kin the others'.
func BenchmarkGetPaced1000(b *testing.B) {
	s, control := benchStack(b), findStack()
	var scraped, paused latencies
	quarter := (b.N + 3) / 4
	var thaw func()
	var elapsed time.Duration
	b.ResetTimer()
	for q, l := range []*latencies{&scraped, &paused, &paused, &scraped} {
		switch q {
		case 1:
			thaw = control.freeze(b, "prometheus")
		case 3:
			thaw()
		}
		elapsed += pace(quarter, 1000, timedGet(s, l))
	}
	b.StopTimer()
	scraped.report(b, elapsed/2, "req")
	b.ReportMetric(paused.percentile(0.50), "p50_paused_ms")
	b.ReportMetric(paused.percentile(0.99), "p99_paused_ms")
	b.ReportMetric(paused.percentile(1), "max_paused_ms")
	if paused.errors > 0 {
		b.Errorf("%d requests failed while Prometheus was paused; first: %s", paused.errors, paused.firstErr)
	}
}

// listFirstID and listLastID bound the listings that ./stack.sh bench
// generates for BenchmarkListPage (ids after listFirstID, up to
// listLastID): above any id the regions' sequences hand out before a
// rejoin, and below any they hand out after one, which skips 2^31 ids
// (lostIDsAtMost in rejoin.go).
const (
	listFirstID = 10_000_000
	listLastID  = listFirstID + 1_000_000
)

// listFilter is the benchmark's filter: about half the generated listings
// pass it, so a page of 50 reads about 100 rows.
const listFilter = "min_bedrooms=2&max_price=750000&limit=50"

// listFilterSQL is what each of the two filters asks of the database.
var listFilterSQL = map[string]string{
	listFilter:  "bedrooms >= 2 AND price <= 750000",
	listNothing: "price >= 9999999999",
}

// listNothing is a filter no generated listing passes: without the page's
// scan window (list.go) its page would read every listing after the cursor.
const listNothing = "min_price=9999999999&limit=50"

// BenchmarkListPage measures one filtered page of the list, at a steady 200
// pages per second, in two places of the listings generated from
// listFirstID: the first page and one near the last. Keyset pagination
// promises that both cost the same, and the same whatever the count. And
// the first page of a filter that matches nothing, an empty page that
// reads at most the scan window.
func BenchmarkListPage(b *testing.B) {
	s := benchStack(b)
	var n int64
	if err := stackDB(b, "us").QueryRow(`SELECT count(*) FROM properties WHERE id > $1 AND id <= $2`, listFirstID, listLastID).Scan(&n); err != nil {
		b.Fatal(err)
	}
	for _, at := range []struct {
		name, filter string
		after        int64
	}{
		{"first", listFilter, listFirstID},
		{"last", listFilter, listFirstID + max(n-1000, 0)},
		{"empty_filter", listNothing, listFirstID},
	} {
		// The page holds what the database holds there, up to 50.
		var items int
		if err := stackDB(b, "us").QueryRow(`
SELECT count(*) FROM (SELECT 1 FROM properties WHERE id > $1 AND NOT deleted AND `+listFilterSQL[at.filter]+` LIMIT 50) AS page`,
			at.after).Scan(&items); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("listings=%d/page=%s", n, at.name), func(b *testing.B) {
			path := "/us/properties?" + at.filter + "&cursor=" + encodeCursor(at.after)
			var l latencies
			elapsed := paced(b, 200, func(int) {
				t := time.Now()
				resp, err := s.client.Get(s.url + path)
				var page Page
				if err == nil {
					err = decodeJSON(resp, &page)
					resp.Body.Close()
				}
				switch {
				case err != nil:
					l.add(resultFailed, 0, err.Error())
				case len(page.Items) != items:
					l.add(resultFailed, 0, fmt.Sprintf("a page of %d listings, want %d", len(page.Items), items))
				default:
					l.add(resultOK, time.Since(t), "")
				}
			})
			l.report(b, elapsed, "req")
		})
	}
}

// BenchmarkReplicationDelay writes to US at a steady 200 writes per second
// and measures, for each write, the time from its 200 in US until EU's
// database holds that version (which is what EU serves: a GET reads that
// row). One poller checks all pending writes every millisecond with one
// query, so the measurement itself adds little load.
func BenchmarkReplicationDelay(b *testing.B) {
	s := benchStack(b)
	eu := stackDB(b, "eu")
	const rate, ids = 200, 500
	var (
		mu       sync.Mutex
		versions = map[int64]int64{} // the version each property is at in US
		l        latencies
		delays   = &delayTracker{waiting: map[int64]pendingWrite{}, l: &l}
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var poller sync.WaitGroup
	poller.Go(func() { delays.poll(ctx, eu) }) // exits when cancel is called

	run := time.Now().UnixNano()
	elapsed := paced(b, rate, func(i int) {
		id := int64(1 + i%ids)
		path := fmt.Sprintf("/us/properties/%d", id)
		mu.Lock()
		version, known := versions[id]
		mu.Unlock()
		if !known {
			_, _, cur, err := s.do("GET", path, "", "")
			if err != nil {
				l.add(resultFailed, 0, err.Error())
				return
			}
			version = cur.Version
		}
		status, _, got, err := s.do("PUT", path, fmt.Sprintf("delay-%d-%d", run, i),
			fmt.Sprintf(`{"price": %d, "version": %d}`, 200000+i, version))
		r, msg := classify(status, err, "PUT")
		mu.Lock()
		defer mu.Unlock()
		switch r {
		case resultOK:
			versions[id] = got.Version
			delays.acked(id, got.Version)
		case resultConflict:
			versions[id] = got.CurrentVersion
			l.add(r, 0, msg)
		default:
			l.add(r, 0, msg)
		}
	})
	waitFor(b, 30*time.Second, "every write to reach eu", func() bool { return delays.pending() == 0 })
	cancel()
	poller.Wait()
	l.report(b, elapsed, "writes")
}

// delayTracker measures replication delay: for each write acknowledged in
// US, the time from its 200 until EU's database holds its version.
type delayTracker struct {
	mu      sync.Mutex
	waiting map[int64]pendingWrite // by property id
	l       *latencies
}

// pendingWrite is an acknowledged write not yet seen in EU.
type pendingWrite struct {
	version int64
	acked   time.Time
}

// acked starts the clock of a write of property id at version.
func (d *delayTracker) acked(id, version int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.waiting[id] = pendingWrite{version, time.Now()}
}

// pending is how many acknowledged writes EU does not hold yet.
func (d *delayTracker) pending() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.waiting)
}

// poll looks up the waiting writes in db every millisecond until ctx is
// cancelled, and records the delay of each it finds.
func (d *delayTracker) poll(ctx context.Context, db *sql.DB) {
	for ctx.Err() == nil {
		d.mu.Lock()
		ids := slices.Collect(maps.Keys(d.waiting))
		d.mu.Unlock()
		if len(ids) > 0 {
			d.check(ctx, db, ids)
		}
		time.Sleep(time.Millisecond)
	}
}

// check reads the versions of ids in db with one query and stops the clock
// of each write that has arrived.
func (d *delayTracker) check(ctx context.Context, db *sql.DB, ids []int64) {
	rows, err := db.QueryContext(ctx, `SELECT id, version FROM properties WHERE id = ANY($1)`, ids)
	if err != nil {
		return // the next poll asks again
	}
	defer rows.Close()
	now := time.Now()
	for rows.Next() {
		var id, v int64
		if rows.Scan(&id, &v) != nil {
			continue
		}
		d.mu.Lock()
		if p, found := d.waiting[id]; found && v >= p.version {
			d.l.add(resultOK, now.Sub(p.acked), "")
			delete(d.waiting, id)
		}
		d.mu.Unlock()
	}
}

// BenchmarkRelayDrain is the relay after a long outage of Kafka: a backlog
// of a million events in the outbox (hours of writes), and then the relay
// publishes to a topic of its own on the stack's broker until the outbox is
// empty. It reports the drain rate, and the delay of a write made when the
// drain began: the outbox is first in, first out, so a new write waits for
// the whole backlog before it leaves. On a scratch database, so that the
// stack's regions see nothing of it.
func BenchmarkRelayDrain(b *testing.B) {
	const backlog = 1_000_000
	if scratchURL == "" {
		b.Fatal("no scratch database: start the stack (./stack.sh up)")
	}
	// Without a statement timeout: the backlog takes a while to write.
	db, err := openDB(scratchURL, 2, sessionLimits{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	fillOutbox(b, db, backlog)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := db.ExecContext(ctx, `ANALYZE outbox`); err != nil {
		b.Fatal(err)
	}
	relayDB, err := openDB(scratchURL, replicationConns, replicationLimits)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { relayDB.Close() })
	topic := fmt.Sprintf("bench-drain-%d", time.Now().UnixNano())
	brokers := stackBrokers()
	rep, err := newReplicator(slog.New(slog.NewTextHandler(io.Discard, nil)), relayDB, relayDB, "us", brokers, topic, 1, defaultRetention, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rep.close(context.Background()) })
	partitions, ok := rep.ensureTopics(ctx)
	if !ok {
		b.Fatal("ensureTopics gave up")
	}
	// The new write, as a PUT's statement queues it: after the backlog.
	if _, err := db.ExecContext(ctx, `
INSERT INTO outbox (request_id, fingerprint, property_id, price, region_origin, version, updated_at)
VALUES ('drain-probe', repeat('0', 64), 1, 1000, 'us', 999999999, now())`); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	wg.Go(func() { rep.relay.run(ctx, partitions) })
	defer wg.Wait()
	defer cancel()
	var probeLeft time.Duration
	waitFor(b, 10*time.Minute, "the backlog to drain", func() bool {
		var left, probe int
		if err := db.QueryRow(`SELECT count(*), count(*) FILTER (WHERE request_id = 'drain-probe') FROM outbox`).Scan(&left, &probe); err != nil {
			b.Fatal(err)
		}
		if probe == 0 && probeLeft == 0 {
			probeLeft = time.Since(start)
		}
		return left == 0
	})
	elapsed := time.Since(start)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(backlog+1)/elapsed.Seconds(), "events/s")
	b.ReportMetric(probeLeft.Seconds(), "new_write_delay_s")
}

// BenchmarkRejoin rebuilds EU from nothing (property-listing rejoin
// --from-nothing) with the listings the database holds (./stack.sh bench
// runs it with 10,000 and with 1,000,000 generated listings beside the
// seeds' and the runs' own) and measures the
// time from the command to EU serving again, and US's GET latency at a
// steady 500 requests per second: five seconds before, as a baseline, and
// while EU copies its snapshot from US. b.N is not used: one rebuild.
func BenchmarkRejoin(b *testing.B) {
	s := benchStack(b)
	s.cmd = findStack().cmd
	var n int64
	if err := stackDB(b, "us").QueryRow(`SELECT count(*) FROM properties WHERE id > $1 AND id <= $2`, listFirstID, listLastID).Scan(&n); err != nil {
		b.Fatal(err)
	}
	b.Run(fmt.Sprintf("generated=%d", n), func(b *testing.B) {
		eu := stackDB(b, "eu")
		// The generated listings have ids of both parities: EU's sequence,
		// which the rebuild moves past the highest even one, is put back.
		var next int64
		if err := eu.QueryRow(`SELECT last_value FROM property_ids_eu`).Scan(&next); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { eu.Exec(`SELECT setval('property_ids_eu', $1)`, next) })
		const rate = 500
		var before, during latencies
		b.ResetTimer()
		pace(5*rate, rate, timedGet(s, &before))
		start := time.Now()
		cmd := rejoinCmd(s, "eu", "--from-nothing")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		var took time.Duration
		var err error
		for rejoined := false; !rejoined; {
			pace(rate/10, rate, timedGet(s, &during)) // a tenth of a second at a time
			select {
			case err = <-done:
				took, rejoined = time.Since(start), true
			default:
			}
		}
		b.StopTimer()
		if err != nil {
			b.Fatalf("rejoin: %v\n%s", err, out.String())
		}
		// What the rebuild copied: besides the generated listings, every
		// listing and request record the stack's history left (the
		// benchmarks' own writes among them).
		var listings, records int64
		if err := eu.QueryRow(`SELECT (SELECT count(*) FROM properties), (SELECT count(*) FROM processed_requests)`).Scan(&listings, &records); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(took.Seconds(), "rejoin_s")
		b.ReportMetric(float64(listings), "listings")
		b.ReportMetric(float64(records), "request_records")
		b.ReportMetric(before.percentile(0.99), "p99_before_ms")
		b.ReportMetric(during.percentile(0.99), "p99_during_ms")
		b.ReportMetric(float64(before.errors+during.errors), "errors")
		if before.errors+during.errors > 0 {
			b.Errorf("%d GETs failed; first: %s%s", before.errors+during.errors, before.firstErr, during.firstErr)
		}
	})
}
