//go:build integration && soak

package main

// The soak: a steady mixed load through NGINX for a long while, with the
// retention shortened so that purges happen during the run, and a sample of
// everything that could grow every few seconds. A service that runs for
// months must leave memory, latency and disk flat. `./stack.sh soak
// DURATION RATE` runs it against the local stack:
//
//	SOAK_DURATION  how long the load runs (default 2m)
//	SOAK_RATE      requests a second (default 200)
//	SOAK_OUT       where the report and the picture go (default .stack/soak)
//
// The load, per second: 70% GETs of seed listings, 20% PUTs of a few hot
// seed listings in both regions (so conflicts), 5% POSTs of new listings and
// 5% DELETEs of listings the soak created. The retention is set to two
// minutes (the topic's to one), so the purge deletes request ids and
// tombstones from the second minute on. Everything is restored at the end.
//
// The report gives, for each figure, the first and the last value and its
// growth per hour over the second half of the run (after the retention has
// filled and the caches have warmed), measured as suits the figure
// (soak_judge_test.go: its rises from one part of the half to the next,
// the ceiling of a saw-tooth, or the rises at a fixed number of
// processes), and fails a figure that grows faster than its bound.

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kgo"
)

const (
	// soakRetention is the service's retention during the soak, and
	// soakTopicRetention the topic's, which with its segments (half as
	// long: setTopicRetention) must be shorter.
	soakRetention      = 2 * time.Minute
	soakTopicRetention = time.Minute
	// soakSampleEvery is how often everything is sampled.
	soakSampleEvery = 5 * time.Second
	// soakJudgeAfter is the shortest run whose slopes are judged: the
	// slope of a few minutes, extrapolated to an hour, is warm-up and
	// noise. A shorter run (CI's two minutes) checks the rest: no failed
	// request, replication running, both regions identical at the end.
	soakJudgeAfter = 10 * time.Minute
)

// soakFigure is one thing the soak watches, and how fast it may grow: a
// growth per hour over the second half of the run above bound is a failure
// (bound < 0: reported, never failed). judge says how the growth is
// measured (soak_judge_test.go); given names the figure held fixed for
// atFixedGiven.
type soakFigure struct {
	name  string
	unit  string
	bound float64
	judge judge
	given string
	read  func() (float64, error)
}

func TestSoak(t *testing.T) {
	s := newStack(t)
	duration, err := time.ParseDuration(setting("SOAK_DURATION", "2m"))
	if err != nil {
		t.Fatalf("SOAK_DURATION: %v", err)
	}
	rate, err := strconv.Atoi(setting("SOAK_RATE", "200"))
	if err != nil || rate < 1 {
		t.Fatalf("SOAK_RATE must be a positive integer, got %q", setting("SOAK_RATE", "200"))
	}
	out := setting("SOAK_OUT", ".stack/soak")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	s.caughtUp(t, 60*time.Second)
	shortenRetention(t, s)
	// The load's own client: enough idle connections that an open loop at
	// the rate reuses them instead of opening one per request.
	s.client = &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{MaxIdleConns: 512, MaxIdleConnsPerHost: 512}}

	figures := soakFigures(t)
	var (
		samples [][]float64 // per figure
		times   []float64   // seconds since start
	)
	load := newSoakLoad(s, rate)
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	wg.Go(func() { load.run(ctx) })
	samples = make([][]float64, len(figures))
	sample := func() {
		times = append(times, time.Since(start).Seconds())
		for i, f := range figures {
			v, err := f.read()
			if err != nil {
				t.Logf("sample %s: %v", f.name, err)
				v = math.NaN()
			}
			samples[i] = append(samples[i], v)
		}
	}
	sample()
	tick := time.NewTicker(soakSampleEvery)
	for done := false; !done; {
		select {
		case <-tick.C:
			sample()
		case <-ctx.Done():
			done = true
		}
	}
	tick.Stop()
	wg.Wait()
	sample()

	// The load's latencies per minute are figures too.
	report, failed := soakReport(figures, times, samples, load, duration, rate)
	if duration < soakJudgeAfter {
		report += fmt.Sprintf("\nA run shorter than %v: the slopes are reported, not judged.\n", soakJudgeAfter)
		failed = nil
	}
	if err := os.WriteFile(filepath.Join(out, "report.md"), []byte(report), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "soak.svg"), []byte(soakSVG(figures, times, samples, load)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "samples.csv"), []byte(soakCSV(figures, times, samples)), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report: %s, picture: %s, samples: %s\n%s", filepath.Join(out, "report.md"), filepath.Join(out, "soak.svg"), filepath.Join(out, "samples.csv"), report)
	for _, f := range failed {
		t.Errorf("%s grows faster than its bound", f)
	}
	if load.errors.Load() > 0 {
		t.Errorf("%d requests failed (transport errors or 5xx); first: %s", load.errors.Load(), load.firstErr())
	}
	// Replication kept up all along: nothing stopped, and the regions agree.
	for _, region := range []string{"us", "eu"} {
		if r := s.lag(t, region); r.ReplicationStopped != "" {
			t.Errorf("%s stopped replicating during the soak: %s", region, r.ReplicationStopped)
		}
	}
	// Identical but for tombstones past the retention: each region purges
	// them in its own minute, so for up to a minute one region has
	// forgotten what the other still holds.
	s.caughtUp(t, 60*time.Second)
	// One cutoff for both regions' reads: reading a region takes a while,
	// and with an age judged at each read, a tombstone that crosses it
	// between the two reads would be kept in one list and not the other.
	live := func(db *sql.DB, cutoff time.Time) []Property {
		var kept []Property
		for _, p := range allProperties(t, db) {
			if !p.Deleted || p.UpdatedAt.After(cutoff) {
				kept = append(kept, p)
			}
		}
		return kept
	}
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Second) {
		cutoff := time.Now().Add(-(soakRetention - 10*time.Second))
		diff := cmp.Diff(live(us, cutoff), live(eu, cutoff))
		if diff == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("60 s after the load, the regions differ but for expired tombstones (-us +eu):\n%s", diff)
		}
	}
}

// shortenRetention sets the topic's retention to soakTopicRetention and
// restarts both backends with RETENTION=soakRetention; t.Cleanup puts both
// back.
func shortenRetention(t *testing.T, s *stack) {
	t.Helper()
	kafka := kafkaAdmin(t)
	setTopicRetention(t, kafka, soakTopicRetention)
	// The consumers commit their offsets after every batch (consume.go),
	// into __consumer_offsets, which Kafka compacts to the last commit of
	// each group and partition, but only in segments it has closed, and
	// it closes one at 100 MiB (offsets.topic.segment.bytes). In service
	// the topic grows to that and stays there; in an hour's soak it would
	// only grow. A segment closed every minute lets the compaction run
	// during the soak, as the shortened retention lets the purge.
	alterTopic(t, kafka, "__consumer_offsets", map[string]*string{"segment.ms": millis(soakTopicRetention)})
	restart := func(retention string) {
		for _, svc := range []string{"backend-us", "backend-eu"} {
			s.control(t, "stop", svc)
			cmd := exec.Command(s.cmd[0], append(s.cmd[1:], "start", svc)...)
			cmd.Env = append(os.Environ(), "RETENTION="+retention)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("start %s with RETENTION=%s: %v\n%s", svc, retention, err, out)
			}
		}
	}
	restart(soakRetention.String())
	t.Cleanup(func() {
		setTopicRetention(t, kafka, topicRetention)
		alterTopic(t, kafka, "__consumer_offsets", map[string]*string{"segment.ms": nil})
		restart(defaultRetention.String())
		// Each region purged at its own minute: one may still hold a
		// tombstone the other has purged, and now would keep it for
		// RETENTION. The load has stopped and replicated, so a cutoff of
		// now is past every tombstone in both regions: purge both to it,
		// and they are left identical, whichever goes first. (A purge to
		// now - soakRetention would not do: the two cutoffs would be
		// seconds apart, and the tombstones between them kept in one.)
		// A round gives way to the backend's own purge if that holds the
		// lock, hence the wait.
		s.caughtUp(t, 60*time.Second)
		for _, region := range []string{"us", "eu"} {
			db := stackDB(t, region)
			p := newPurger(slog.New(slog.NewTextHandler(io.Discard, nil)), db, region, time.Millisecond,
				func(context.Context) (time.Duration, error) { return 0, nil })
			waitFor(t, 30*time.Second, region+" purged of its tombstones", func() bool {
				var left int
				err := p.round(context.Background())
				if err == nil {
					err = db.QueryRow(`SELECT count(*) FROM properties WHERE deleted`).Scan(&left)
				}
				return err == nil && left == 0
			})
		}
	})
}

// setTopicRetention sets the replication topic's retention.ms, and its
// segment.ms to half as long (at most topicSegment, as the service creates
// it): Kafka deletes only whole segments, so with week-long segments a
// minute's retention would delete nothing and the log would grow through
// the soak. The topic then keeps an event at most 1.5 times d, which the
// service's RETENTION must exceed, or its purge pauses (retention.go).
func setTopicRetention(t *testing.T, kafka *kgo.Client, d time.Duration) {
	t.Helper()
	alterTopic(t, kafka, setting("KAFKA_TOPIC", "property-updates"), map[string]*string{
		"retention.ms": millis(d),
		"segment.ms":   millis(min(d/2, topicSegment)),
	})
}

// soakFigures lists what the soak samples: each process's memory, open
// files and threads; each backend's goroutines and heap; each database's
// size and its three tables'; Kafka's log.
func soakFigures(t *testing.T) []soakFigure {
	t.Helper()
	// The local stack's pid files and data (STACK_STATE, from stack.env):
	// the soak runs against ./stack.sh's processes, not compose's.
	state := setting("STACK_STATE", ".stack")
	var figures []soakFigure
	pidOf := func(svc string) func() (int, error) {
		return func() (int, error) {
			file := filepath.Join(state, "run", svc+".pid")
			if strings.HasPrefix(svc, "db-") {
				file = filepath.Join(state, "pg", svc, "postmaster.pid")
			}
			b, err := os.ReadFile(file)
			if err != nil {
				return 0, err
			}
			return strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
		}
	}
	for _, svc := range []string{"backend-us", "backend-eu", "kafka", "nginx", "db-us", "db-eu"} {
		pid := pidOf(svc)
		// Memory may grow to a working set in the first half; after it, a
		// leak of a megabyte an hour per process tree is the bound. It is
		// the proportional set size (PSS), not the resident size: each of
		// PostgreSQL's processes counts every page of the shared buffers it
		// has touched in its RSS, so the tree's RSS grows for hours as its
		// connections touch more of the same buffers, while the memory in
		// use does not. PSS divides a shared page among the processes that
		// map it, so the tree's sum counts each page once.
		memory := soakFigure{name: svc + " memory (PSS)", unit: "MiB", bound: 1, read: func() (float64, error) { return procTree(pid, pssMiB) }}
		files := soakFigure{name: svc + " open files", bound: 5, read: func() (float64, error) { return procTree(pid, openFiles) }}
		procs := soakFigure{name: svc + " threads", bound: 5, read: func() (float64, error) { return procTree(pid, threads) }}
		switch {
		case strings.HasPrefix(svc, "db-"):
			// A process per connection (threads count processes here): the
			// tree's memory and files follow how many connections the pools
			// hold, which moves with the load (a burst opens some, five idle
			// minutes close them, none lives past 30 minutes: database.go).
			// The number itself cannot grow past the pools' caps, and one
			// process more or less in a part is already 12 an hour:
			// reported. A connection coming or going moves the tree by 2 to
			// 3 MiB and 25 to 35 files. The memory is judged at a fixed
			// number of processes, half an hour apart (atFixedGiven), where
			// it still wanders by a MiB or two as connections are replaced:
			// 3 MiB/h, a quarter of a MiB a connection. The files are
			// reported at a fixed number of processes, not bounded:
			// PostgreSQL caps each process's open files itself
			// (max_files_per_process, 1,000, beyond which it closes the
			// least recently used), and how many a process holds follows
			// which tables, indexes and segments it has touched, which
			// moves with its age by tens (+24 in an hour's run at 14
			// processes, between the second quarter and the fourth).
			procs.name, procs.bound = svc+" processes", -1
			memory.judge, memory.given, memory.bound = atFixedGiven, procs.name, 3
			files.judge, files.given, files.bound = atFixedGiven, procs.name, -1
		case svc == "nginx":
			// NGINX's open files are mostly its connections: the clients'
			// keep-alive ones, which move with the load, and its own
			// keep-alive pools to the backends (at most 32 idle per worker
			// and backend, nginx.conf), all capped by worker_connections.
			// They are reported, and the other files judged.
			socks := soakFigure{name: "nginx sockets", bound: -1, read: func() (float64, error) { return procTree(pid, sockets) }}
			files.name, files.read = "nginx open files but sockets", func() (float64, error) { return procTree(pid, filesButSockets) }
			figures = append(figures, socks)
		case svc == "kafka":
			// The JVM compiles hot code for hours, and the code cache it
			// compiles into grows by the code (native memory tracking put
			// +759 of a +791 KiB growth there): up to the cache's cap
			// (ReservedCodeCacheSize, 240 MiB), so reported, and the rest
			// of the JVM judged.
			jit := soakFigure{name: "kafka JIT code", unit: "MiB", bound: -1, read: ofProcess(pid, jitMiB)}
			memory.name, memory.read = "kafka memory (PSS) but JIT code", ofProcess(pid, pssButJITMiB)
			figures = append(figures, jit)
		}
		figures = append(figures, memory, files, procs)
	}
	for _, b := range []struct{ name, port string }{{"backend-us", "8001"}, {"backend-eu", "8002"}} {
		for _, m := range []struct {
			metric, label, unit string
			scale, bound        float64
		}{
			{"go_goroutines", "goroutines", "", 1, 10},
			// The heap the last collection found reachable: a leak lifts
			// it. The heap allocated, garbage included, is a saw-tooth from
			// about one to twice that, sampled at random points of its
			// teeth, and a line through it tilts by more than its bound
			// either way in a half hour of a level heap.
			{"go_gc_heap_live_bytes", "live heap", "MiB", 1 << 20, 1},
			// What the Go runtime holds from the system, released pages
			// included: the ceiling of the heap's resident memory, to read
			// the PSS against. It is a high-water mark that steps up by
			// whole chunks when the heap peaks, and a line through a step
			// is no slope: reported, not bounded.
			{"go_memstats_sys_bytes", "runtime memory", "MiB", 1 << 20, -1},
		} {
			figures = append(figures, soakFigure{name: b.name + " " + m.label, unit: m.unit, bound: m.bound, read: func() (float64, error) {
				v, err := scrape("http://127.0.0.1:"+b.port+"/metrics", m.metric)
				return v / m.scale, err
			}})
		}
	}
	for _, region := range []string{"us", "eu"} {
		db := stackDB(t, region)
		for _, q := range []struct{ name, query string }{
			{"database", `SELECT pg_database_size(current_database())`},
			{"processed_requests", `SELECT pg_total_relation_size('processed_requests')`},
			{"outbox", `SELECT pg_total_relation_size('outbox')`},
			{"properties", `SELECT pg_total_relation_size('properties')`},
		} {
			// The listings grow with the creates (5% of the load), which is
			// the business, not a leak: reported, not bounded. The rest is
			// bounded by the retention and must level off.
			bound := 1.0
			if q.name == "properties" || q.name == "database" {
				bound = -1
			}
			// A table grows a page at a time and gets pages back at a
			// vacuum: a saw-tooth, judged by its ceiling.
			figures = append(figures, soakFigure{name: "db-" + region + " " + q.name, unit: "MiB", bound: bound, judge: byCeiling, read: func() (float64, error) {
				return querySize(db, q.query)
			}})
		}
	}
	// The log grows a record at a time and loses whole segments at each
	// retention check (every five minutes): a saw-tooth, judged by its
	// ceiling.
	figures = append(figures, soakFigure{name: "kafka log", unit: "MiB", bound: 1, judge: byCeiling, read: func() (float64, error) {
		return dirMiB(filepath.Join(state, "kafka", "data"))
	}})
	// The services' log files: one line per request, rotated by size
	// (stack.sh, rotate_logs), so a saw-tooth whose ceiling must level
	// off at three files a service.
	figures = append(figures, soakFigure{name: "log files", unit: "MiB", bound: 1, judge: byCeiling, read: func() (float64, error) {
		return dirMiB(filepath.Join(state, "logs"))
	}})
	return figures
}

// ofProcess reads one process, without its children.
func ofProcess(pid func() (int, error), read func(int) (float64, error)) func() (float64, error) {
	return func() (float64, error) {
		p, err := pid()
		if err != nil {
			return 0, err
		}
		return read(p)
	}
}

// procTree adds read over a process and its children (PostgreSQL's and
// NGINX's workers, the JVM's threads are the process's own).
func procTree(pid func() (int, error), read func(int) (float64, error)) (float64, error) {
	root, err := pid()
	if err != nil {
		return 0, err
	}
	total, err := read(root)
	if err != nil {
		return 0, err
	}
	children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", root, root))
	for _, c := range strings.Fields(string(children)) {
		if n, err := strconv.Atoi(c); err == nil {
			if v, err := read(n); err == nil {
				total += v
			}
		}
	}
	return total, nil
}

// statusField reads a field of /proc/PID/status.
func statusField(pid int, field string) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseFloat(strings.Fields(rest)[0], 64)
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// pssMiB reads a process's proportional set size from
// /proc/PID/smaps_rollup.
func pssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Pss:"); ok {
			kb, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no Pss in /proc/%d/smaps_rollup", pid)
}

// jitMiB reads how much of a JVM's PSS is the code its JIT compiled: the
// code cache is the one mapping a JVM makes writable and executable at
// once.
func jitMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, err
	}
	var kb float64
	code := false
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		switch {
		case len(fields) >= 2 && strings.Contains(fields[0], "-") && len(fields[1]) == 4:
			code = fields[1] == "rwxp" // a mapping's header: range, permissions, ...
		case code && len(fields) >= 2 && fields[0] == "Pss:":
			v, err := strconv.ParseFloat(fields[1], 64)
			if err != nil {
				return 0, err
			}
			kb += v
		}
	}
	return kb / 1024, nil
}

// pssButJITMiB is a JVM's PSS less the code its JIT compiled.
func pssButJITMiB(pid int) (float64, error) {
	all, err := pssMiB(pid)
	if err != nil {
		return 0, err
	}
	code, err := jitMiB(pid)
	return all - code, err
}

func threads(pid int) (float64, error) { return statusField(pid, "Threads") }

func openFiles(pid int) (float64, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return float64(len(entries)), err
}

// sockets counts the process's open files that are sockets, and
// filesButSockets the rest.
func sockets(pid int) (float64, error) {
	n, _, err := socketsAndRest(pid)
	return n, err
}

func filesButSockets(pid int) (float64, error) {
	_, rest, err := socketsAndRest(pid)
	return rest, err
}

func socketsAndRest(pid int) (socks, rest float64, err error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		switch {
		case err != nil:
			// closed since the directory was read
		case strings.HasPrefix(target, "socket:"):
			socks++
		default:
			rest++
		}
	}
	return socks, rest, err
}

func querySize(db *sql.DB, query string) (float64, error) {
	var bytes int64
	err := db.QueryRow(query).Scan(&bytes)
	return float64(bytes) / (1 << 20), err
}

// dirMiB is the disk a directory's files take, as du counts it: Kafka
// preallocates each segment's index files at 10 MiB, sparse, and their
// length says nothing of the disk they fill.
func dirMiB(dir string) (float64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return nil // a segment deleted while walking
		}
		if info, err := d.Info(); err == nil && !d.IsDir() {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return float64(total) / (1 << 20), err
}

// soakLoad is the soak's open-loop load: rate requests a second, each in
// its own goroutine, whatever the answers take.
type soakLoad struct {
	s       *stack
	rate    int
	errors  atomic.Int64
	mu      sync.Mutex
	first   string
	created []string // ETag-addressed listings to delete: "id etag"
	// latencies per minute of the run, in milliseconds.
	perMinute map[int][]float64
	statuses  map[int]int
}

func newSoakLoad(s *stack, rate int) *soakLoad {
	return &soakLoad{s: s, rate: rate, perMinute: map[int][]float64{}, statuses: map[int]int{}}
}

func (l *soakLoad) firstErr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first
}

// run sends requests until ctx ends, and waits for the last answers.
func (l *soakLoad) run(ctx context.Context) {
	interval := time.Second / time.Duration(l.rate)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; ctx.Err() == nil; i++ {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		wg.Go(func() { l.one(i, time.Since(start)) })
	}
	wg.Wait()
}

// one sends the i-th request of the mix.
func (l *soakLoad) one(i int, at time.Duration) {
	region := []string{"us", "eu"}[i%2]
	rng := rand.New(rand.NewPCG(uint64(i), 7))
	requestID := fmt.Sprintf("soak-%d-%d", time.Now().UnixNano(), i)
	t0 := time.Now()
	var (
		status int
		h      http.Header
		got    response
		err    error
	)
	switch p := rng.IntN(100); {
	case p < 70:
		status, h, got, err = l.s.doWith("GET", fmt.Sprintf("/%s/properties/%d", region, 1+rng.IntN(1000)), http.Header{}, "")
	case p < 90:
		// A few hot listings, written in both regions: conflicts.
		path := fmt.Sprintf("/%s/properties/%d", region, 301+rng.IntN(5))
		if status, _, got, err = l.s.doWith("GET", path, http.Header{}, ""); err == nil && status == http.StatusOK {
			status, _, got, err = l.s.doWith("PUT", path, http.Header{"X-Request-Id": {requestID}},
				fmt.Sprintf(`{"price": %d, "version": %d}`, 100000+rng.IntN(900000), got.Version))
		}
	case p < 95:
		status, h, got, err = l.s.doWith("POST", "/"+region+"/properties", http.Header{"X-Request-Id": {requestID}}, `{"price": 250000}`)
		if err == nil && status == http.StatusCreated {
			l.mu.Lock()
			l.created = append(l.created, fmt.Sprintf("%d %s", got.ID, h.Get("ETag")))
			l.mu.Unlock()
		}
	default:
		l.mu.Lock()
		var target string
		if len(l.created) > 0 {
			target, l.created = l.created[0], l.created[1:]
		}
		l.mu.Unlock()
		if target == "" {
			status, _, got, err = l.s.doWith("GET", "/"+region+"/properties?limit=20", http.Header{}, "")
			break
		}
		id, tag, _ := strings.Cut(target, " ")
		status, _, got, err = l.s.doWith("DELETE", "/"+region+"/properties/"+id,
			http.Header{"X-Request-Id": {requestID}, "If-Match": {tag}}, "")
	}
	took := float64(time.Since(t0).Microseconds()) / 1000
	l.mu.Lock()
	defer l.mu.Unlock()
	l.statuses[status]++
	l.perMinute[int(at.Minutes())] = append(l.perMinute[int(at.Minutes())], took)
	if err != nil || status >= 500 {
		if l.errors.Add(1) == 1 {
			l.first = fmt.Sprintf("%d %v %+v", status, err, got)
		}
	}
}

// percentile of sorted values.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	return sorted[min(int(p*float64(len(sorted))), len(sorted)-1)]
}

// soakReport writes the report, and names the figures over their bounds.
func soakReport(figures []soakFigure, times []float64, samples [][]float64, load *soakLoad, duration time.Duration, rate int) (string, []string) {
	var b strings.Builder
	var failed []string
	fmt.Fprintf(&b, "Soak of %v at %d requests/s through NGINX (%s), retention %v (topic %v), a sample every %v.\n\n",
		duration, rate, time.Now().UTC().Format("2006-01-02 15:04 UTC"), soakRetention, soakTopicRetention, soakSampleEvery)
	fmt.Fprintf(&b, "| figure | first | last | growth per hour (second half) | how | bound | |\n|---|---|---|---|---|---|---|\n")
	byName := map[string][]float64{}
	for i, f := range figures {
		byName[f.name] = samples[i]
	}
	for i, f := range figures {
		perHour, how := growth(f.judge, times, samples[i], byName[f.given])
		verdict, bound := "", "-"
		if f.bound >= 0 {
			bound = fmt.Sprintf("%g %s/h", f.bound, f.unit)
			verdict = "PASS"
			if !(perHour <= f.bound) {
				verdict = "**FAIL**"
				failed = append(failed, f.name)
			}
		}
		fmt.Fprintf(&b, "| %s | %.1f %s | %.1f %s | %+.2f %s/h | %s | %s | %s |\n", f.name, samples[i][0], f.unit,
			samples[i][len(samples[i])-1], f.unit, perHour, f.unit, how, bound, verdict)
	}
	load.mu.Lock()
	defer load.mu.Unlock()
	fmt.Fprintf(&b, "\nLatency per minute, every request (ms):\n\n| minute | requests | p50 | p99 | max |\n|---|---|---|---|---|\n")
	minutes := slices.Sorted(maps.Keys(load.perMinute))
	var p99s []float64
	for _, m := range minutes {
		v := slices.Clone(load.perMinute[m])
		slices.Sort(v)
		p99s = append(p99s, percentile(v, 0.99))
		fmt.Fprintf(&b, "| %d | %d | %.2f | %.2f | %.2f |\n", m+1, len(v), percentile(v, 0.5), percentile(v, 0.99), v[len(v)-1])
	}
	if len(p99s) >= 4 {
		xs := make([]float64, len(p99s))
		for i := range xs {
			xs[i] = float64(i) * 60
		}
		slope := slopePerHour(xs, p99s)
		verdict := "PASS"
		if slope > 5 {
			verdict = "**FAIL**"
			failed = append(failed, "p99 latency")
		}
		fmt.Fprintf(&b, "\np99 slope over the second half: %+.2f ms/h (bound 5 ms/h): %s\n", slope, verdict)
	}
	fmt.Fprintf(&b, "\nStatuses: %v; failed requests (transport errors, 5xx): %d\n", load.statuses, load.errors.Load())
	return b.String(), failed
}

// soakCSV writes every sample, a row per sample and a column per figure,
// for a closer look than the picture gives.
func soakCSV(figures []soakFigure, times []float64, samples [][]float64) string {
	var b strings.Builder
	b.WriteString("seconds")
	for _, f := range figures {
		b.WriteString("," + f.name)
	}
	b.WriteString("\n")
	for j, at := range times {
		fmt.Fprintf(&b, "%.1f", at)
		for i := range figures {
			fmt.Fprintf(&b, ",%g", samples[i][j])
		}
		b.WriteString("\n")
	}
	return b.String()
}

// soakSVG draws each figure as a small line chart over the run's time, and
// the latency per minute, in a grid a person can scan for a line that
// climbs.
func soakSVG(figures []soakFigure, times []float64, samples [][]float64, load *soakLoad) string {
	const cols, w, h, pad = 4, 300, 140, 28
	type chart struct {
		title string
		xs    []float64
		ys    []float64
	}
	var charts []chart
	for i, f := range figures {
		charts = append(charts, chart{f.name + " (" + strings.TrimSpace(f.unit) + ")", times, samples[i]})
	}
	load.mu.Lock()
	var xs, p50, p99 []float64
	for _, m := range slices.Sorted(maps.Keys(load.perMinute)) {
		v := slices.Clone(load.perMinute[m])
		slices.Sort(v)
		xs = append(xs, float64(m)*60)
		p50 = append(p50, percentile(v, 0.5))
		p99 = append(p99, percentile(v, 0.99))
	}
	load.mu.Unlock()
	charts = append(charts, chart{"latency p50 per minute (ms)", xs, p50}, chart{"latency p99 per minute (ms)", xs, p99})

	rows := (len(charts) + cols - 1) / cols
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", cols*w, rows*h)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	for i, c := range charts {
		x0, y0 := float64(i%cols*w), float64(i/cols*h)
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, y := range c.ys {
			if !math.IsNaN(y) {
				lo, hi = min(lo, y), max(hi, y)
			}
		}
		if math.IsInf(lo, 0) {
			continue
		}
		// From zero, so that a small wobble is drawn small.
		lo = min(lo, 0)
		if hi == lo {
			hi = lo + 1
		}
		tmax := 1.0
		if len(c.xs) > 0 {
			tmax = max(c.xs[len(c.xs)-1], 1)
		}
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f">%s</text>`+"\n", x0+8, y0+14, svgEscape(c.title))
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" fill="#666">%.3g … %.3g</text>`+"\n", x0+8, y0+h-6, lo, hi)
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%d" height="%d" fill="none" stroke="#ccc"/>`+"\n", x0+8, y0+pad-8, w-16, h-pad-14)
		var pts []string
		for j, y := range c.ys {
			if math.IsNaN(y) {
				continue
			}
			px := x0 + 8 + (c.xs[j]/tmax)*float64(w-16)
			py := y0 + float64(h-22) - (y-lo)/(hi-lo)*float64(h-pad-14)
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px, py))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="%s"/>`+"\n", strings.Join(pts, " "))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func svgEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
