//go:build integration && chaos

package main

// The fault campaign: many clients write through NGINX while faults come and
// go at random, in combination, and a checker then reads the final state and
// the history of every operation (chaos_check_test.go). It is how the claim
// that the system survives its faults (docs/semantics.md, §11) is tested as a whole rather
// than one fault at a time: no combination of those faults may lose an
// acknowledged write, invent a value, or leave the regions different.
//
//	./stack.sh chaos 60s 1      (CHAOS_DURATION, CHAOS_SEED)
//
// The seed fixes the fault schedule (which faults, when, for how long) and
// each client's choices; the timing of the requests, and so what exactly
// the faults catch in flight, differs from run to run.
//
// The three parts:
//   - the workload: clients that PUT (mostly to a few hot listings, so the
//     two regions' writes conflict), POST, DELETE and GET through both
//     prefixes, retry a request after a timeout or a 5xx with the same
//     request id, and sometimes re-send a request id with another body;
//     every request is recorded as ok, fail (a definite 4xx) or unknown (no
//     answer, or a 5xx: it may or may not have happened);
//   - the nemesis: SIGKILL and restart, or SIGSTOP and SIGCONT, a backend or
//     Kafka; an immediate shutdown of a region's PostgreSQL and its restart;
//     a region's backend cut off from Kafka, its packets dropped, while it
//     keeps serving and reaching its database (./stack.sh partition);
//   - the checker, once every fault is healed and both regions have drained
//     their backlogs, and a sampler that reads each region's lag report
//     during the run, for rule 6.
//
// It runs against the local stack (./stack.sh): the nemesis signals its
// processes and drops packets with iptables, which needs root.

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gocmp "github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kgo"
)

// chaosSettings are the campaign's knobs, from the environment.
type chaosSettings struct {
	duration time.Duration // how long the clients write and the faults come
	seed     uint64
	clients  int
	out      string // where report.md is written; "" for nowhere
}

func loadChaosSettings(t *testing.T) chaosSettings {
	t.Helper()
	c := chaosSettings{out: os.Getenv("CHAOS_OUT")}
	var err error
	if c.duration, err = time.ParseDuration(setting("CHAOS_DURATION", "60s")); err != nil || c.duration < 20*time.Second {
		t.Fatalf("CHAOS_DURATION must be a duration of 20s or more: %q", os.Getenv("CHAOS_DURATION"))
	}
	if c.seed, err = strconv.ParseUint(setting("CHAOS_SEED", "1"), 10, 64); err != nil {
		t.Fatalf("CHAOS_SEED must be a whole number: %v", err)
	}
	if c.clients, err = strconv.Atoi(setting("CHAOS_CLIENTS", "16")); err != nil || c.clients < 1 {
		t.Fatalf("CHAOS_CLIENTS must be a positive number: %q", os.Getenv("CHAOS_CLIENTS"))
	}
	return c
}

func TestChaos(t *testing.T) {
	cfg := loadChaosSettings(t)
	s := newStack(t)
	if os.Geteuid() != 0 {
		t.Fatal("the campaign drops packets with iptables and signals the stack's processes: run it as root (./stack.sh chaos)")
	}
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	dbs := map[string]*sql.DB{"us": us, "eu": eu}

	// A clean start: what earlier tests wrote has replicated, so that the
	// regions agree on every listing the campaign begins from.
	s.caughtUp(t, 2*time.Minute)
	start := waitIdentical(t, us, eu, time.Minute)
	dlqBefore := deadLetters(t)

	w := newWorkload(s, cfg, start)
	topology := setting("STACK_TOPOLOGY", "single")
	kinds := faultKinds(topology)
	faults := faultSchedule(cfg.seed, cfg.duration, kinds)
	n := newNemesis(s, kinds)
	t.Cleanup(n.healAll) // a failed test leaves the stack whole

	t.Logf("seed %d, topology %s: %d clients for %v, %d faults scheduled", cfg.seed, topology, cfg.clients, cfg.duration, len(faults))
	ctx, cancel := context.WithTimeout(context.Background(), cfg.duration)
	defer cancel()
	var wg sync.WaitGroup
	for c := range cfg.clients {
		wg.Go(func() { w.client(ctx, c) })
	}
	var samples []lagSample
	wg.Go(func() { samples = sampleLag(ctx, s, dbs, w) })
	n.run(faults) // returns when the last fault is healed
	<-ctx.Done()
	wg.Wait()
	n.healAll() // what a failed heal left broken
	lastHeal := time.Now().Add(-cfg.duration)
	for _, f := range n.log() {
		if f.healed.After(lastHeal) {
			lastHeal = f.healed
		}
	}
	for _, err := range n.errors() {
		t.Errorf("nemesis: %v", err)
	}

	// Converged: both regions served by themselves, their backlogs drained,
	// and the tables identical. Each wait is bounded; a region that does
	// not get there fails rule 1 with the difference.
	converged := settle(s, dbs, 3*time.Minute)
	convergence := time.Since(lastHeal)
	final := finalState(t, s, dbs, w.requestPrefix)
	final.dlqAdded = deadLetters(t) - dlqBefore
	final.converged = converged
	restores := restoreWindows(n.log())
	mayBeRestored := map[string]bool{}
	for _, o := range w.history() {
		if o.Outcome == opOK && o.Kind != "GET" && lostToRestore(o, restores) {
			mayBeRestored[o.RequestID] = true
		}
	}
	final.published = publishedRequests(t, mayBeRestored)
	results := check(w.history(), w.initial, final, samples, restores)
	if topology == "single" {
		results = append(results, longOutage(t, s, us, eu))
	}

	r := report{
		settings: cfg, topology: topology, kinds: kinds, ops: w.history(), faults: n.log(), results: results, final: final,
		samples: samples, converged: converged, convergence: convergence,
	}
	text := r.markdown()
	fmt.Println(text)
	if cfg.out != "" {
		if err := os.MkdirAll(cfg.out, 0o755); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(cfg.out, "report.md")
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("report: %s", path)
	}
	if writes := r.writes(); writes == 0 {
		t.Error("no write was acknowledged: the campaign tested nothing")
	}
	for _, res := range results {
		if !res.pass {
			t.Errorf("rule %d (%s) FAILED: %s", res.rule, res.name, res.counterexample)
		}
	}
}

// longOutage is the campaign's last scene, the fault of days compressed
// into seconds: EU cut off from Kafka for longer than the topic keeps an
// event. EU is cut off, US writes, and the broker deletes every record US
// has read (DeleteRecords: the state retention leaves once its time has
// passed, without waiting days or for the broker's five-minute retention
// check). When EU can reach the broker again, the events it needs are
// gone. Rule 7: EU says so (its log, at error level) and rejoins from US
// (rejoin.go); at no moment does it serve its clients while it lacks the
// listings created in the gap, and once it serves again it holds them all.
func longOutage(t *testing.T, s *stack, us, eu *sql.DB) ruleResult {
	t.Helper()
	r := ruleResult{rule: 7, name: "a region the broker left behind says so and rejoins", pass: true}
	kafka := kafkaAdmin(t)
	s.caughtUp(t, 2*time.Minute)
	s.control(t, "partition", "eu")
	t.Cleanup(func() { s.control(t, "heal", "eu") }) // a failed scene leaves the stack whole
	// A fetch of EU's that was waiting at the broker when the link was cut
	// is answered within a heartbeat interval (FetchMaxWait at most), and
	// that answer, held up by the cut, arrives when the link is back, in
	// order: it must hold nothing the scene writes, or EU would apply it
	// rightly and look as if it had skipped.
	time.Sleep(1500 * time.Millisecond)
	var created []int64
	for i := range 3 {
		status, _, got := s.mustDo(t, "POST", "/us/properties", newRequestID(fmt.Sprintf("long-outage-%d", i)), `{"price": 777777.77}`)
		if status != http.StatusCreated {
			t.Fatalf("POST /us/properties during the long outage: %d %+v", status, got)
		}
		created = append(created, got.ID)
	}
	// Published, and US has read everything there was (EU, cut off, sends
	// nothing), so that only EU misses events when the log is deleted.
	waitFor(t, 30*time.Second, "us's outbox to drain and its consumer to read all", func() bool {
		r := s.lag(t, "us")
		return r.OutboxBacklog == 0 && r.RecordsBehind == 0
	})
	time.Sleep(3 * time.Second) // an outage long enough for the lag to show it
	for _, id := range created {
		if _, err := getProperty(context.Background(), eu, id); err == nil {
			t.Fatalf("EU applied listing %d while cut off from Kafka: the partition fault did not hold, and the scene cannot judge anything", id)
		}
	}
	deleteReadRecords(t, kafka, us)
	logged := len(s.control(t, "logs", "backend-eu"))
	s.control(t, "heal", "eu")

	// Until EU has rejoined, its lag must not read about 0 while a listing
	// of the gap is missing; once it has, it must hold them all.
	missing := func() []int64 {
		var m []int64
		for _, id := range created {
			if _, err := getProperty(context.Background(), eu, id); err != nil {
				m = append(m, id)
			}
		}
		return m
	}
	start := time.Now()
	var understated string
	rejoined := waitUntil(90*time.Second, func() bool {
		if rejoinedAfterLoss(s.control(t, "logs", "backend-eu"), logged) {
			return true
		}
		if report := s.lag(t, "eu"); report.LagSeconds < 1 && understated == "" {
			if m := missing(); len(m) > 0 {
				understated = fmt.Sprintf("EU's lag read %.3f s while it lacked listings %v", report.LagSeconds, m)
			}
		}
		return false
	})
	took := time.Since(start)
	switch m := missing(); {
	case understated != "":
		r.pass = false
		r.counterexample = understated
	case !rejoined:
		r.pass = false
		r.counterexample = fmt.Sprintf("EU did not say the events were lost and rejoin within 90 s of the heal; listings %v missing", m)
	case len(m) > 0:
		r.pass = false
		r.counterexample = fmt.Sprintf("EU rejoined without listings %v, created in US in the gap: it skipped it", m)
	default:
		r.detail = fmt.Sprintf("EU cut off, %d listings created in US, the topic's records deleted: EU said the events were lost (error log) "+
			"and rejoined from US %.1f s after the heal, holding all of them", len(created), took.Seconds())
	}
	return r
}

// waitUntil polls cond every 200 ms until it holds or timeout passes, and
// reports whether it held.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); ; time.Sleep(200 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// ------------------------------------------------------------------ workload

// outcome of one request, as a client knows it.
type opOutcome string

const (
	opOK      opOutcome = "ok"      // 2xx, or a 422 with the original: it happened, and the answer says how
	opFail    opOutcome = "fail"    // a definite 4xx: it did not happen
	opUnknown opOutcome = "unknown" // no answer, or a 5xx: it may have happened
)

// op is one request of the history.
type op struct {
	Client     int
	Kind       string // GET, PUT, POST, DELETE
	Prefix     string // us or eu: the NGINX prefix it went to
	ID         int64  // the listing; 0 for a POST not answered
	RequestID  string
	Price      Money // the price a PUT or POST wrote
	Attempt    int   // 0 for the first attempt, then each retry with the same request id
	Resend     bool  // the request id of an earlier write, with another body
	Start, End time.Time
	Status     int
	Outcome    opOutcome
	// Row is what the answer says the write made: the new row of a 200 or
	// 201, or the original of a 422 (the request id's first write).
	Row *Property
	// Session is a request that carried its client's session token.
	// Shown is the state of the listing the answer showed: the row of a
	// 2xx, or only the version that a 404 (0), 409, 410 or 412 names.
	// SessionWait is how long the serving region said it waited for the
	// session (Server-Timing), and ServedBy which region answered.
	// SessionBehind is the 503 of a region that had not caught up with
	// the session.
	Session       bool
	Shown         *Property
	SessionWait   time.Duration
	SessionBehind bool
	ServedBy      string
	// Cached is the state a conditional GET named in If-None-Match: its
	// 304 shows that state. List is a list read's query, and Page the
	// listings its page showed.
	Cached *Property
	List   string
	Page   []Property
}

// known is what the clients have learned of a listing: its latest version
// and who wrote it, as the last answer told.
type known struct {
	version int64
	region  string
	deleted bool
}

// workload is the clients' shared state and the history they write.
type workload struct {
	s             *stack
	cfg           chaosSettings
	http          *http.Client
	requestPrefix string             // every request id of this run begins so
	initial       map[int64]Property // the listings the campaign starts from
	hot, spread   []int64            // listings the PUTs pick from
	mu            sync.Mutex         // guards what follows
	ops           []op               // the history
	listings      map[int64]known    // what clients know of each listing
	created       []int64            // listings the campaign created and did not delete
	nextPrice     Money              // each write writes a price no other does
	acked         map[int][]op       // each client's acknowledged PUTs, for re-sends
	tokens        map[int]string     // each session client's token, as its last answer gave it
}

// sessionClient reports whether client c sends a session token with
// every request: half of them do.
func sessionClient(c int) bool { return c%2 == 0 }

// The listings the campaign writes: a few hot seed listings that both
// regions write at once, and a wider spread. Seed ids 1 to 1000 exist in
// every stack; the benchmarks and other tests write them too, so the
// campaign begins from whatever they hold.
var (
	chaosHot    = []int64{901, 902, 903, 904}
	chaosSpread = func() (ids []int64) {
		for id := int64(601); id <= 700; id++ {
			ids = append(ids, id)
		}
		return ids
	}()
)

func newWorkload(s *stack, cfg chaosSettings, start []Property) *workload {
	w := &workload{
		s:   s,
		cfg: cfg,
		// Longer than NGINX's worst case (a 5-second read timeout, then
		// the backup): a client that gives up earlier turns answers into
		// unknowns for nothing.
		http:          &http.Client{Timeout: 12 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}},
		requestPrefix: fmt.Sprintf("chaos-%d-%d-", cfg.seed, time.Now().UnixNano()),
		initial:       map[int64]Property{},
		hot:           chaosHot,
		spread:        chaosSpread,
		listings:      map[int64]known{},
		acked:         map[int][]op{},
		tokens:        map[int]string{},
		// Prices from 1,000,000.00 up, one cent apart: a price names the
		// request that wrote it.
		nextPrice: 100_000_000,
	}
	for _, p := range start {
		w.listings[p.ID] = known{version: p.Version, region: p.RegionOrigin, deleted: p.Deleted}
		w.initial[p.ID] = p
	}
	return w
}

// since returns the operations recorded after the first i, and how many
// there are now.
func (w *workload) since(i int) ([]op, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]op(nil), w.ops[i:]...), len(w.ops)
}

// history returns a copy of the operations recorded so far.
func (w *workload) history() []op {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]op(nil), w.ops...)
}

func (w *workload) price() Money {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.nextPrice++
	return w.nextPrice
}

func (w *workload) record(o op) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ops = append(w.ops, o)
	if o.Outcome == opOK && o.Kind == "PUT" && !o.Resend {
		w.acked[o.Client] = append(w.acked[o.Client], o)
	}
}

// learn updates what clients know of a listing from an answer.
func (w *workload) learn(id int64, k known) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if cur, ok := w.listings[id]; !ok || k.version >= cur.version {
		w.listings[id] = k
	}
	if k.deleted {
		for i, c := range w.created {
			if c == id {
				w.created = append(w.created[:i], w.created[i+1:]...)
				break
			}
		}
	}
}

func (w *workload) knownOf(id int64) known {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.listings[id]
}

// client is one client's loop until ctx ends: a request, its retries, the
// next. Its choices come from its own generator, seeded from the seed.
func (w *workload) client(ctx context.Context, c int) {
	rng := rand.New(rand.NewPCG(w.cfg.seed, uint64(c)+1))
	for n := 0; ctx.Err() == nil; n++ {
		prefix := []string{"us", "eu"}[rng.IntN(2)]
		requestID := fmt.Sprintf("%s%d-%d", w.requestPrefix, c, n)
		switch r := rng.IntN(100); {
		case r < 12:
			w.get(c, rng, prefix, w.pick(rng))
		case r < 15:
			w.list(c, rng, prefix)
		case r < 75:
			w.put(c, rng, prefix, w.pick(rng), requestID)
		case r < 85:
			w.post(c, prefix, requestID)
		case r < 95:
			if id, ok := w.pickCreated(rng); ok {
				w.delete(c, rng, prefix, id, requestID)
			}
		default:
			w.resend(c, rng, prefix)
		}
	}
}

// pick chooses a listing to read or update: mostly a hot one.
func (w *workload) pick(rng *rand.Rand) int64 {
	if rng.IntN(100) < 70 {
		return w.hot[rng.IntN(len(w.hot))]
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.created) > 0 && rng.IntN(3) == 0 {
		return w.created[rng.IntN(len(w.created))]
	}
	return w.spread[rng.IntN(len(w.spread))]
}

func (w *workload) pickCreated(rng *rand.Rand) (int64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.created) == 0 {
		return 0, false
	}
	return w.created[rng.IntN(len(w.created))], true
}

// get reads a listing; a third of the reads are conditional, naming the
// state the clients know in If-None-Match.
func (w *workload) get(c int, rng *rand.Rand, prefix string, id int64) {
	o := op{Client: c, Kind: "GET", Prefix: prefix, ID: id}
	if k := w.knownOf(id); k.version > 0 && !k.deleted && rng.IntN(3) == 0 {
		o.Cached = &Property{ID: id, Version: k.version, RegionOrigin: k.region}
	}
	o = w.send(o, "", "")
	if o.Row != nil {
		w.learn(id, known{version: o.Row.Version, region: o.Row.RegionOrigin})
	}
	o.Row = nil // a read acknowledges no write
	w.record(o)
}

// list reads a page of listings the campaign writes, in id order: mostly
// the hot ones, else the spread. A session's page must not show any of
// them older than the session has seen (ruleSessions).
func (w *workload) list(c int, rng *rand.Rand, prefix string) {
	page := w.hot
	if rng.IntN(3) == 0 {
		page = w.spread
	}
	query := fmt.Sprintf("cursor=%s&limit=%d", encodeCursor(page[0]-1), len(page))
	w.record(w.send(op{Client: c, Kind: "GET", Prefix: prefix, List: query}, "", ""))
}

// put updates a listing from the version the clients know, and retries it
// after an unknown outcome, as a client does, with the same request id.
func (w *workload) put(c int, rng *rand.Rand, prefix string, id int64, requestID string) {
	k := w.knownOf(id)
	o := op{Client: c, Kind: "PUT", Prefix: prefix, ID: id, RequestID: requestID, Price: w.price()}
	body := fmt.Sprintf(`{"price": %s, "version": %d}`, o.Price, k.version)
	w.retrying(rng, o, body, "")
}

// post creates a listing. A POST with no answer is not retried: a retry
// through the other region, before the first create replicated, would
// make a second listing (docs/decisions.md).
func (w *workload) post(c int, prefix, requestID string) {
	o := op{Client: c, Kind: "POST", Prefix: prefix, RequestID: requestID, Price: w.price()}
	o = w.send(o, fmt.Sprintf(`{"price": %s, "bedrooms": 2, "bathrooms": 1}`, o.Price), "")
	w.record(o)
	if o.Outcome == opOK {
		w.learn(o.Row.ID, known{version: o.Row.Version, region: o.Row.RegionOrigin})
		w.mu.Lock()
		w.created = append(w.created, o.Row.ID)
		w.mu.Unlock()
	}
}

// delete deletes a listing the campaign created, naming the state the
// clients know with If-Match.
func (w *workload) delete(c int, rng *rand.Rand, prefix string, id int64, requestID string) {
	k := w.knownOf(id)
	o := op{Client: c, Kind: "DELETE", Prefix: prefix, ID: id, RequestID: requestID}
	w.retrying(rng, o, "", `"`+tagValue(k.version, k.region)+`"`)
}

// resend sends an acknowledged PUT's request id again with another price:
// a confused client. The service must refuse it (422) and change nothing.
func (w *workload) resend(c int, rng *rand.Rand, prefix string) {
	w.mu.Lock()
	acked := w.acked[c]
	w.mu.Unlock()
	if len(acked) == 0 {
		return
	}
	first := acked[rng.IntN(len(acked))]
	o := op{Client: c, Kind: "PUT", Prefix: prefix, ID: first.ID, RequestID: first.RequestID, Price: w.price(), Resend: true}
	o = w.send(o, fmt.Sprintf(`{"price": %s, "version": %d}`, o.Price, w.knownOf(first.ID).version), "")
	w.record(o)
}

// retrying sends a write, and after an unknown outcome sends it again with
// the same request id and body, up to two more times, half the time
// through the other prefix, or gives up (as a client may).
func (w *workload) retrying(rng *rand.Rand, o op, body, ifMatch string) {
	for attempt := 0; ; attempt++ {
		o.Attempt = attempt
		got := w.send(o, body, ifMatch)
		w.record(got)
		switch {
		case got.Row != nil:
			w.learn(got.Row.ID, known{version: got.Row.Version, region: got.Row.RegionOrigin, deleted: got.Row.Deleted})
		case got.Status == http.StatusConflict || got.Status == http.StatusPreconditionFailed || got.Status == http.StatusGone:
			w.learnCurrent(got)
		}
		if got.Outcome != opUnknown || attempt == 2 || rng.IntN(4) == 0 {
			return
		}
		if rng.IntN(2) == 0 {
			o.Prefix = map[string]string{"us": "eu", "eu": "us"}[o.Prefix]
		}
		time.Sleep(time.Duration(100+rng.IntN(400)) * time.Millisecond)
	}
}

// learnCurrent reads the listing after a 409, 412 or 410, as a client
// that lost a race does, to know its version.
func (w *workload) learnCurrent(o op) {
	got := w.send(op{Client: o.Client, Kind: "GET", Prefix: o.Prefix, ID: o.ID}, "", "")
	switch {
	case got.Outcome == opOK:
		w.learn(o.ID, known{version: got.Row.Version, region: got.Row.RegionOrigin})
	case got.Status == http.StatusGone:
		w.learn(o.ID, known{version: w.knownOf(o.ID).version, deleted: true})
	}
	got.Row = nil
	w.record(got)
}

// send makes one request through NGINX and classifies its answer.
func (w *workload) send(o op, body, ifMatch string) op {
	req, err := http.NewRequest(o.Kind, w.s.url+o.path(), strings.NewReader(body))
	if err != nil {
		panic(err) // the campaign's own bug
	}
	if o.RequestID != "" {
		req.Header.Set("X-Request-ID", o.RequestID)
	}
	if ifMatch != "" {
		req.Header.Set("If-Match", ifMatch)
	}
	if o.Cached != nil {
		req.Header.Set("If-None-Match", `"`+tagValue(o.Cached.Version, o.Cached.RegionOrigin)+`"`)
	}
	if o.Session = sessionClient(o.Client); o.Session {
		w.mu.Lock()
		if token := w.tokens[o.Client]; token != "" {
			req.Header.Set(sessionHeader, token)
		}
		w.mu.Unlock()
	}
	o.Start = time.Now()
	resp, err := w.http.Do(req)
	var got answer
	var tag string
	if err == nil {
		err = decodeAny(resp, &got)
		o.Status = resp.StatusCode
		tag = resp.Header.Get("ETag")
		o.ServedBy = resp.Header.Get("X-Served-By")
		o.SessionWait = serverTiming(resp.Header, "session-wait")
		if token := resp.Header.Get(sessionHeader); o.Session && token != "" && err == nil {
			w.mu.Lock()
			w.tokens[o.Client] = token
			w.mu.Unlock()
		}
	}
	o.End = time.Now()
	switch {
	case err != nil || o.Status >= 500:
		o.Outcome = opUnknown
		o.SessionBehind = o.Status == http.StatusServiceUnavailable && got.Error == errSessionBehind.Error()
	case o.Status == http.StatusUnprocessableEntity && got.OriginalResponse != nil:
		// "Duplicate request": this request was applied before, by an
		// attempt this client may never have seen answered (NGINX's first
		// try at an instance that committed and died), and the answer is
		// that write.
		o.Outcome = opOK
		row := *got.OriginalResponse
		o.Row = &row
	case o.Status >= 400:
		o.Outcome = opFail
		switch o.Status {
		case http.StatusNotFound:
			o.Shown = &Property{ID: o.ID}
		case http.StatusConflict, http.StatusGone, http.StatusPreconditionFailed:
			o.Shown = &Property{ID: o.ID, Version: got.CurrentVersion, Deleted: o.Status == http.StatusGone}
		}
	case o.Status == http.StatusNotModified:
		// The listing is in the state the answer's ETag names: the one
		// the request named, unless the server compared wrong, and then
		// the state it holds is what the session rule checks.
		o.Outcome = opOK
		o.Shown = taggedState(o.ID, tag)
	case o.List != "":
		o.Outcome = opOK
		o.Page = got.Items
	default:
		o.Outcome = opOK
		row := got.Property
		if o.Kind == "DELETE" {
			row.Deleted = true // the answer says so in its own shape
		}
		o.Row = &row
		if o.Kind == "POST" {
			o.ID = row.ID
		}
		shown := row
		o.Shown = &shown
	}
	return o
}

// serverTiming reads the duration of one metric of a Server-Timing
// header ("session-wait;dur=12.5"): 0 if there is none.
func serverTiming(h http.Header, metric string) time.Duration {
	for _, entry := range strings.Split(h.Get("Server-Timing"), ",") {
		name, params, _ := strings.Cut(strings.TrimSpace(entry), ";")
		if name != metric {
			continue
		}
		for _, p := range strings.Split(params, ";") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(p), "dur="); ok {
				ms, _ := strconv.ParseFloat(v, 64)
				return time.Duration(ms * float64(time.Millisecond))
			}
		}
	}
	return 0
}

// taggedState is the state an ETag ("7-us") names, nil if it names none.
func taggedState(id int64, tag string) *Property {
	version, region, ok := strings.Cut(strings.Trim(strings.TrimPrefix(tag, "W/"), `"`), "-")
	v, err := strconv.ParseInt(version, 10, 64)
	if !ok || err != nil {
		return nil
	}
	return &Property{ID: id, Version: v, RegionOrigin: region}
}

// answer is every field an answer to the campaign may carry: a listing's
// or an error's (response), and a list page's items.
type answer struct {
	response
	Items []Property `json:"items"`
}

// decodeAny reads a JSON answer of any status (an empty body, such as a
// 304's, decodes to nothing).
func decodeAny(resp *http.Response, v *answer) error {
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil || len(raw) == 0 {
		return err
	}
	return json.Unmarshal(raw, v)
}

// ------------------------------------------------------------------- nemesis

// faultKind is one of the nemesis's faults: how to cause it on a target
// and how to heal it, as ./stack.sh commands.
type faultKind struct {
	name    string
	targets []string
	apply   func(target string) []string
	heal    func(target string) []string
	// then, if set, finishes the fault after apply's command, from here
	// (what ./stack.sh cannot do without Kafka's own tools: the broker's
	// admin requests).
	then func(target string) error
}

// faultKinds returns the nemesis's faults for a topology: under "ha" the
// backend faults may hit any of the four backends, and the broker faults
// any of the three brokers.
func faultKinds(topology string) []faultKind {
	backends, brokers := []string{"backend-us", "backend-eu"}, []string{"kafka"}
	if topology == "ha" {
		backends = append(backends, "backend-us-2", "backend-eu-2")
		brokers = append(brokers, "kafka-2", "kafka-3")
	}
	command := func(verb string) func(string) []string {
		return func(target string) []string { return []string{verb, target} }
	}
	kinds := []faultKind{
		{"kill a backend", backends, command("kill"), command("start"), nil},
		// An orderly stop, as a deploy's: whatever else is failing, the
		// backend must stop within its shutdown budget (main.go).
		// ./stack.sh stop fails when it had to kill it, and so does the
		// fault, and the campaign.
		{"stop a backend", backends, command("stop"), command("start"), nil},
		{"pause a backend", backends, command("pause"), command("unpause"), nil},
		{"kill a broker", brokers, command("kill"), command("start"), nil},
		{"pause a broker", brokers, command("pause"), command("unpause"), nil},
		{"kill a database", []string{"db-us", "db-eu"}, command("kill"), command("start"), nil},
		{"partition from kafka", []string{"us", "eu"}, command("partition"), command("heal"), nil},
		// A region's clock ahead or behind by 0.9 s, as its database (where
		// the service takes every time it compares) sees it; restarting
		// the database to shift it is an outage of its own.
		{"a clock 0.9 s fast", []string{"db-us", "db-eu"},
			func(db string) []string { return []string{"skew", db, "+0.9"} }, command("unskew"), nil},
		{"a clock 0.9 s slow", []string{"db-us", "db-eu"},
			func(db string) []string { return []string{"skew", db, "-0.9"} }, command("unskew"), nil},
		// A region's database restored from a backup taken when the fault
		// began, its hold earlier: the writes it acknowledged meanwhile
		// that had not left its outbox are lost with it (the fault's RPO,
		// which the checker counts), and the region rejoins (rejoin.go).
		{restoreFault, []string{"db-us", "db-eu"}, command("backup"), command("restore"), nil},
		// An operator scales the topic out; nothing to heal.
		{name: "add a partition", targets: []string{"topic"},
			apply: func(string) []string { return []string{"ps"} }, heal: func(string) []string { return []string{"ps"} },
			then: func(string) error {
				kafka, err := kgo.NewClient(kgo.SeedBrokers(stackBrokers()...))
				if err != nil {
					return err
				}
				defer kafka.Close()
				topic := setting("KAFKA_TOPIC", "property-updates")
				// Kafka may be down under another fault: try until it is
				// back, as an operator would.
				for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Second) {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					n, err := partitionCount(ctx, kafka, topic)
					cancel()
					if err == nil {
						err = setPartitionCount(kafka, topic, n+1)
					}
					if err == nil || time.Now().After(deadline) {
						return err
					}
				}
			}},
	}
	if topology == "ha" {
		// One instance of a region cut off from Kafka while the other is
		// not: the relay's lock must go to the one that can publish.
		kinds = append(kinds, faultKind{"cut one instance off from kafka", backends[:4], command("partition"), command("heal"), nil})
		// A group lost is a region's whole group, which needs every
		// instance of the region down at once: that fault stays with the
		// single topology (the positions it tests live in the region's
		// database, whichever instance applies).
		return kinds
	}
	// The state Kafka's offset expiry leaves: the region's group gone
	// while it is down. Its target is the backend, whose other faults
	// wait their turn.
	kinds = append(kinds, faultKind{name: "lose a consumer group", targets: []string{"backend-us", "backend-eu"},
		apply: command("stop"), heal: command("start"),
		then: func(backend string) error {
			kafka, err := kgo.NewClient(kgo.SeedBrokers(stackBrokers()...))
			if err != nil {
				return err
			}
			defer kafka.Close()
			group := "property-replicator-" + strings.TrimPrefix(backend, "backend-")
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Second) {
				// A member that just left may count for a moment.
				if err = deleteGroupOnce(kafka, group); err == nil || time.Now().After(deadline) {
					return err
				}
			}
		}})
	return kinds
}

// restoreFault is the name of the fault that restores a database from a
// backup.
const restoreFault = "restore a database from a backup"

// restoreWindows are the restores the nemesis made: each region's database
// taken back from when it healed the fault to when it caused it.
func restoreWindows(runs []faultRun) []restoreWindow {
	var out []restoreWindow
	for _, r := range runs {
		if r.kind == restoreFault && r.err == nil {
			out = append(out, restoreWindow{region: strings.TrimPrefix(r.target, "db-"), from: r.applied, to: r.healed})
		}
	}
	return out
}

// fault is one entry of the schedule.
type fault struct {
	at     time.Duration // after the start
	kind   *faultKind
	target string
	hold   time.Duration
}

// faultSchedule draws the faults of a campaign from the seed: one every
// half second to four and a half seconds, each held one to eight seconds,
// so that faults overlap and combine; never two at once on one target
// (a killed process cannot also be paused).
func faultSchedule(seed uint64, d time.Duration, kinds []faultKind) []fault {
	rng := rand.New(rand.NewPCG(seed, 0x6e656d65736973)) // "nemesis"
	busy := map[string]time.Duration{}
	var out []fault
	for at := 2 * time.Second; ; {
		at += time.Duration(500+rng.IntN(4000)) * time.Millisecond
		kind := &kinds[rng.IntN(len(kinds))]
		target := kind.targets[rng.IntN(len(kind.targets))]
		hold := time.Duration(1000+rng.IntN(7000)) * time.Millisecond
		if at+hold > d-3*time.Second {
			return out
		}
		// A restart takes a while after the heal begins.
		if busy[target] > at {
			continue
		}
		busy[target] = at + hold + 15*time.Second
		out = append(out, fault{at: at, kind: kind, target: target, hold: hold})
	}
}

// faultRun is what happened to one fault of the schedule.
type faultRun struct {
	kind, target    string
	applied, healed time.Time
	err             error
}

// nemesis runs a schedule against the stack.
type nemesis struct {
	s      *stack
	kinds  []faultKind
	mu     sync.Mutex
	runs   []faultRun
	active map[string]*faultKind // target: the fault on it, until healed
	locks  map[string]*sync.Mutex
}

func newNemesis(s *stack, kinds []faultKind) *nemesis {
	n := &nemesis{s: s, kinds: kinds, active: map[string]*faultKind{}, locks: map[string]*sync.Mutex{}}
	for _, k := range kinds {
		for _, t := range k.targets {
			n.locks[t] = &sync.Mutex{}
		}
	}
	return n
}

// run causes each fault at its time, holds it, heals it, and returns when
// every fault is healed. A target's faults take turns (its lock), in case
// a heal took longer than the schedule allowed for.
func (n *nemesis) run(schedule []fault) {
	start := time.Now()
	var wg sync.WaitGroup
	for _, f := range schedule {
		time.Sleep(time.Until(start.Add(f.at)))
		wg.Go(func() {
			lock := n.locks[f.target]
			lock.Lock()
			defer lock.Unlock()
			r := faultRun{kind: f.kind.name, target: f.target, applied: time.Now()}
			n.mu.Lock()
			n.active[f.target] = f.kind
			n.mu.Unlock()
			if r.err = n.control(f.kind.apply(f.target)...); r.err == nil && f.kind.then != nil {
				r.err = f.kind.then(f.target)
			}
			if r.err == nil {
				time.Sleep(f.hold)
			}
			if err := n.control(f.kind.heal(f.target)...); err != nil && r.err == nil {
				r.err = err
			}
			r.healed = time.Now()
			n.mu.Lock()
			delete(n.active, f.target)
			n.runs = append(n.runs, r)
			n.mu.Unlock()
		})
	}
	wg.Wait()
}

// control runs one ./stack.sh command.
func (n *nemesis) control(args ...string) error {
	cmd := exec.Command(n.s.cmd[0], append(n.s.cmd[1:], args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// healAll heals every fault there could be: resumes what is paused, mends
// the links, and starts what is stopped. It is safe to call at any time.
func (n *nemesis) healAll() {
	// Resumed first: starting a paused service would wait for its health.
	for _, verb := range []string{"unpause", "heal", "unskew", "start"} {
		for _, k := range n.kinds {
			for _, target := range k.targets {
				// Healing what is not broken is harmless: unpausing what
				// runs, healing a whole link, starting what runs.
				if heal := k.heal(target); heal[0] == verb {
					n.control(heal...)
				}
			}
		}
	}
}

func (n *nemesis) log() []faultRun {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]faultRun(nil), n.runs...)
}

func (n *nemesis) errors() (errs []error) {
	for _, r := range n.log() {
		if r.err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", r.kind, r.target, r.err))
		}
	}
	return errs
}

// ---------------------------------------------------------------- lag samples

// lagSample is one read of a region's lag report, and of its rows right
// after: the rows of every listing a peer write (acknowledged by then) went
// to that the region had not yet been seen to hold.
type lagSample struct {
	region string
	sent   time.Time // when the report was asked for: it speaks of a later moment
	lag    float64
	heard  int                // the history's first heard operations were read before the rows
	rows   map[int64]Property // read after the report
}

// sampleLag reads each region's lag report and then its rows, every half
// second, until ctx ends. A report the other region answered (NGINX failed
// over) or a database that does not answer makes no sample.
//
// Reading every listing twice a second would load the databases the
// campaign is measuring, so a sample reads only the listings that still
// owe the region a peer write: each acknowledged peer write is pending
// until a sample reads a row at least as high (rows only move up, by the
// conflict rule), and is then forgotten. The checker (ruleLagHonest) holds
// the highest row read of each listing, which is all it needs.
func sampleLag(ctx context.Context, s *stack, dbs map[string]*sql.DB, w *workload) (samples []lagSample) {
	client := &http.Client{Timeout: 2 * time.Second}
	pending := map[string]map[int64]Property{"us": {}, "eu": {}} // per region, the highest peer write it owes per listing
	heard := 0                                                   // how much of the history the sampler has read
	for ctx.Err() == nil {
		for _, region := range []string{"us", "eu"} {
			sent := time.Now()
			var r LagReport
			resp, err := client.Get(s.url + "/" + region + "/replication-lag")
			if err != nil {
				continue
			}
			if err := decodeJSON(resp, &r); err != nil || r.Region != region {
				resp.Body.Close()
				continue
			}
			resp.Body.Close()
			// The writes acknowledged by now, which the report may vouch for.
			var ops []op
			ops, heard = w.since(heard)
			for _, o := range ops {
				if o.Outcome != opOK || o.Row == nil || o.Kind == "GET" {
					continue
				}
				owes := pending[peerOf(o.Row.RegionOrigin)]
				if cur, ok := owes[o.Row.ID]; !ok || compareWrites(*o.Row, cur) > 0 {
					owes[o.Row.ID] = *o.Row
				}
			}
			rows, err := readRows(ctx, dbs[region], slices.Collect(maps.Keys(pending[region])))
			if err != nil {
				continue
			}
			for id, got := range rows {
				if compareWrites(got, pending[region][id]) >= 0 {
					delete(pending[region], id)
				}
			}
			samples = append(samples, lagSample{region: region, sent: sent, lag: r.LagSeconds, heard: heard, rows: rows})
		}
		sleep(ctx, 500*time.Millisecond)
	}
	return samples
}

// readRows reads the listings of ids.
func readRows(ctx context.Context, db *sql.DB, ids []int64) (map[int64]Property, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	rows, err := db.QueryContext(ctx, `SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted
FROM properties WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[int64]Property{}
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			return nil, err
		}
		out[p.ID] = p
	}
	return out, rows.Err()
}

// TestFaultSchedule: a seed gives one schedule, another seed another, and
// no target has two faults at once.
func TestFaultSchedule(t *testing.T) {
	kinds := faultKinds("ha")
	names := func(fs []fault) (out []string) {
		for _, f := range fs {
			out = append(out, fmt.Sprintf("%v %s %s %v", f.at, f.kind.name, f.target, f.hold))
		}
		return out
	}
	a, b := faultSchedule(1, 10*time.Minute, kinds), faultSchedule(1, 10*time.Minute, kinds)
	if d := gocmp.Diff(names(a), names(b)); d != "" {
		t.Errorf("seed 1 gave two schedules (-first +second):\n%s", d)
	}
	if gocmp.Equal(names(a), names(faultSchedule(2, 10*time.Minute, kinds))) {
		t.Error("seeds 1 and 2 gave the same schedule")
	}
	if len(a) < 30 {
		t.Errorf("10 minutes have %d faults, want 30 or more", len(a))
	}
	busyUntil := map[string]time.Duration{}
	for _, f := range a {
		if f.at < busyUntil[f.target] {
			t.Errorf("%s at %v: %s still has a fault until %v", f.kind.name, f.at, f.target, busyUntil[f.target])
		}
		busyUntil[f.target] = f.at + f.hold
		if f.at+f.hold > 10*time.Minute {
			t.Errorf("%s at %v held %v: past the end", f.kind.name, f.at, f.hold)
		}
	}
}
