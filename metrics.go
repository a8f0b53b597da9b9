package main

// Metrics: what an operator's Prometheus scrapes from GET /metrics on each
// backend's own port (NGINX never routes it), in Prometheus's text
// exposition format, written here by hand: the service links no client
// library, and the format is a few lines of text per figure.
//
// Three kinds of figure:
//   - requests, counted by route, method and status, and their durations as
//     a histogram by route, recorded by the middleware as each one ends;
//   - the replication's counters and gauges (the lag report, lag.go), read
//     when Prometheus scrapes;
//   - the database pools' use (database/sql's DBStats), read then too.
//
// prometheus/alerts.yml turns them into alerts, and
// prometheus/alerts_test.yml tests each alert with promtool.

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"io"
	"maps"
	"net/http"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// durationBuckets are the request-duration histogram's upper bounds, in
// seconds. At light load a GET takes about half a millisecond and a write a
// few; at saturation their p99s reach 15 to 50 ms (docs/benchmarks.md); a
// request gives up on the database after 3 s (dbTimeout). So the buckets are
// dense from 0.5 ms to 50 ms, then reach past the timeout.
var durationBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// requestKey is one series of listing_http_requests_total.
type requestKey struct {
	route, method string
	status        int
}

// histogram is one series of a histogram: a count per bucket of
// durationBuckets, and one for +Inf, not yet cumulative.
type histogram struct {
	buckets []uint64
	sum     float64
	count   uint64
}

// requestMetrics counts the requests a backend answered. One mutex guards
// it: a request holds it for a map lookup and a few additions, far less
// than anything else a request does.
type requestMetrics struct {
	mu        sync.Mutex
	counts    map[requestKey]uint64
	durations map[string]*histogram // by route
}

func newRequestMetrics() *requestMetrics {
	return &requestMetrics{counts: map[requestKey]uint64{}, durations: map[string]*histogram{}}
}

// observe records one answered request. route is the mux's pattern without
// its method ("/{region}/properties/{id}"), so that the series are the
// service's routes, not every id ever asked for; a request no route matched
// is "unmatched". method is methodLabel's, never the request's own.
func (m *requestMetrics) observe(route, method string, status int, d time.Duration) {
	seconds := d.Seconds()
	bucket, _ := slices.BinarySearch(durationBuckets, seconds)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.counts[requestKey{route, method, status}]++
	h := m.durations[route]
	if h == nil {
		h = &histogram{buckets: make([]uint64, len(durationBuckets)+1)}
		m.durations[route] = h
	}
	h.buckets[bucket]++
	h.sum += seconds
	h.count++
}

// methodLabel is the method label of a request: one of the methods the API
// serves, or OTHER. A label taken from the request as it came would let any
// client add a series for ever with a method it made up.
func methodLabel(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodDelete:
		return method
	}
	return "OTHER"
}

// routeOf is the route label of a request the mux has served.
func routeOf(r *http.Request) string {
	if r.Pattern == "" {
		return "unmatched"
	}
	_, path, _ := strings.Cut(r.Pattern, " ")
	return path
}

// handleMetrics answers a scrape. A figure it cannot read (the database is
// down, so the lag report fails) is left out, and
// listing_replication_report_up says so; everything else is still served.
func handleMetrics(requests *requestMetrics, rep replication, pools map[string]*sql.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), time.Second)
		defer cancel()
		var e exposition
		requests.write(&e)
		writeReplication(ctx, &e, rep)
		writePools(&e, pools)
		writeRuntime(&e)
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, e.String())
	})
}

// write adds the request counters and histograms.
func (m *requestMetrics) write(e *exposition) {
	m.mu.Lock()
	counts := maps.Clone(m.counts)
	durations := map[string]histogram{}
	for route, h := range m.durations {
		durations[route] = histogram{slices.Clone(h.buckets), h.sum, h.count}
	}
	m.mu.Unlock()

	e.family("listing_http_requests_total", "counter", "Requests answered, by route, method and status.")
	keys := slices.SortedFunc(maps.Keys(counts), func(a, b requestKey) int {
		return cmp.Or(strings.Compare(a.route, b.route), strings.Compare(a.method, b.method), cmp.Compare(a.status, b.status))
	})
	for _, k := range keys {
		e.sample("listing_http_requests_total", float64(counts[k]), "route", k.route, "method", k.method, "status", strconv.Itoa(k.status))
	}
	e.family("listing_http_request_duration_seconds", "histogram", "Time from a request's arrival to its answer, by route.")
	for _, route := range slices.Sorted(maps.Keys(durations)) {
		h := durations[route]
		var cumulative uint64
		for i, upper := range durationBuckets {
			cumulative += h.buckets[i]
			e.sample("listing_http_request_duration_seconds_bucket", float64(cumulative), "route", route, "le", formatFloat(upper))
		}
		e.sample("listing_http_request_duration_seconds_bucket", float64(h.count), "route", route, "le", "+Inf")
		e.sample("listing_http_request_duration_seconds_sum", h.sum, "route", route)
		e.sample("listing_http_request_duration_seconds_count", float64(h.count), "route", route)
	}
}

// writeReplication adds the lag report's figures.
func writeReplication(ctx context.Context, e *exposition, r replication) {
	ps := r.purgeStats()
	e.family("listing_retention_purged_total", "counter", "Expired request ids, tombstones and conflict records deleted, by what they were.")
	e.sample("listing_retention_purged_total", float64(ps.RequestIDs), "what", "request_ids")
	e.sample("listing_retention_purged_total", float64(ps.Tombstones), "what", "tombstones")
	e.sample("listing_retention_purged_total", float64(ps.Conflicts), "what", "conflicts")
	if !ps.OldestRequestID.IsZero() {
		e.family("listing_retention_oldest_request_id_seconds", "gauge", "Age of the oldest request id kept, as of the last purge: at most the retention plus the purge interval.")
		e.sample("listing_retention_oldest_request_id_seconds", time.Since(ps.OldestRequestID).Seconds())
	}
	paused := 0.0
	if ps.Paused != "" {
		paused = 1
	}
	e.family("listing_purge_paused", "gauge", "1 if the purge is paused because RETENTION is not longer than the topic may keep an event (the log says why), else 0.")
	e.sample("listing_purge_paused", paused)
	e.family("listing_replication_produce_errors_total", "counter", "Relay rounds that failed to publish their events (Kafka unreachable, or the outbox unreadable); the events wait in the outbox.")
	e.sample("listing_replication_produce_errors_total", float64(r.produceErrors()))
	e.family("listing_replication_published_events_total", "counter", "Events this instance's relay published to Kafka (with several instances per region, the one holding the relay's lock publishes).")
	e.sample("listing_replication_published_events_total", float64(r.published()))
	rejoining := 0.0
	if r.rejoinStatus().State != stateServing {
		rejoining = 1
	}
	e.family("listing_rejoining", "gauge", "1 while this instance does not serve: its database is being checked against the peer region, or the region rejoins from it (rejoin.go); else 0.")
	e.sample("listing_rejoining", rejoining)
	rep, err := r.lagReport(ctx)
	e.family("listing_replication_report_up", "gauge", "1 if the replication figures below could be read (the database answered), else 0.")
	if err != nil {
		e.sample("listing_replication_report_up", 0)
		return
	}
	e.sample("listing_replication_report_up", 1)
	stopped := 0.0
	if rep.ReplicationStopped != "" {
		stopped = 1
	}
	for _, f := range []struct {
		name, kind, help string
		value            float64
	}{
		{"listing_replication_lag_seconds", "gauge", "Age of the oldest write of the peer region that may not be applied here yet.", rep.LagSeconds},
		{"listing_replication_records_behind", "gauge", "Records of the topic this region's consumer has yet to read.", float64(rep.RecordsBehind)},
		{"listing_outbox_backlog", "gauge", "Local writes waiting in the outbox to be published to Kafka.", float64(rep.OutboxBacklog)},
		{"listing_outbox_oldest_age_seconds", "gauge", "How long the oldest event in the outbox has waited; 0 when it is empty.", rep.OldestOutboxSeconds},
		{"listing_replication_stopped", "gauge", "1 while replication is stopped because the broker lost events this region needs, until the region has rejoined; else 0.", stopped},
		{"listing_replication_applied_total", "counter", "Writes of the peer region applied here.", float64(rep.Applied)},
		{"listing_replication_conflicts_total", "counter", "Concurrent writes of one version in both regions, resolved by the conflict rule (one lost).", float64(rep.Conflicts)},
		{"listing_replication_lost_writes_total", "counter", "Acknowledged writes found lost (replaced by a write not built on them) and recorded at /{region}/conflicts.", float64(rep.LostWrites)},
		{"listing_replication_replays_total", "counter", "One request written in both regions, resolved by the conflict rule (nothing lost).", float64(rep.Replays)},
		{"listing_replication_stale_events_total", "counter", "Events older than the row here, ignored.", float64(rep.StaleEvents)},
		{"listing_replication_dead_letters_total", "counter", "Records sent to the dead-letter topic.", float64(rep.DeadLettered)},
		{"listing_replication_expired_events_total", "counter", "Events older than RETENTION for a listing with no row here: not applied, sent to the dead-letter topic.", float64(rep.ExpiredEvents)},
	} {
		e.family(f.name, f.kind, f.help)
		e.sample(f.name, f.value)
	}
}

// writePools adds each database pool's use.
func writePools(e *exposition, pools map[string]*sql.DB) {
	names := slices.Sorted(maps.Keys(pools))
	stats := map[string]sql.DBStats{}
	for _, name := range names {
		stats[name] = pools[name].Stats()
	}
	for _, f := range []struct {
		name, kind, help string
		value            func(sql.DBStats) float64
	}{
		{"listing_db_pool_max_connections", "gauge", "Most connections the pool may open.", func(s sql.DBStats) float64 { return float64(s.MaxOpenConnections) }},
		{"listing_db_pool_connections", "gauge", "Connections open, in use or idle.", func(s sql.DBStats) float64 { return float64(s.OpenConnections) }},
		{"listing_db_pool_connections_in_use", "gauge", "Connections in use.", func(s sql.DBStats) float64 { return float64(s.InUse) }},
		{"listing_db_pool_waits_total", "counter", "Times a caller waited for a free connection.", func(s sql.DBStats) float64 { return float64(s.WaitCount) }},
		{"listing_db_pool_wait_seconds_total", "counter", "Time callers spent waiting for a free connection.", func(s sql.DBStats) float64 { return s.WaitDuration.Seconds() }},
	} {
		e.family(f.name, f.kind, f.help)
		for _, name := range names {
			e.sample(f.name, f.value(stats[name]), "pool", name)
		}
	}
}

// runtimeSamples are the Go runtime's figures /metrics shows, read with
// runtime/metrics, which does not stop the world as ReadMemStats does.
var runtimeSamples = []struct {
	name, kind, help, key string
}{
	{"go_goroutines", "gauge", "Goroutines that exist now.", "/sched/goroutines:goroutines"},
	{"go_memstats_heap_alloc_bytes", "gauge", "Bytes of heap objects, reachable or not yet collected.", "/memory/classes/heap/objects:bytes"},
	{"go_gc_heap_live_bytes", "gauge", "Bytes of heap objects the last garbage collection found reachable.", "/gc/heap/live:bytes"},
	{"go_memstats_sys_bytes", "gauge", "Bytes of memory the Go runtime holds from the system.", "/memory/classes/total:bytes"},
	{"go_gc_cycles_total", "counter", "Garbage collections completed.", "/gc/cycles/total:gc-cycles"},
}

// writeRuntime adds the Go runtime's figures: a leak shows as goroutines or
// a live heap that grow without end (./stack.sh soak watches them; the heap
// allocated, garbage included, rises and falls with every collection).
func writeRuntime(e *exposition) {
	samples := make([]metrics.Sample, len(runtimeSamples))
	for i, r := range runtimeSamples {
		samples[i].Name = r.key
	}
	metrics.Read(samples)
	for i, r := range runtimeSamples {
		e.family(r.name, r.kind, r.help)
		e.sample(r.name, float64(samples[i].Value.Uint64()))
	}
}

// exposition builds a text exposition: families, each with its HELP and
// TYPE lines, then its samples.
type exposition struct {
	strings.Builder
}

// family starts a metric family.
func (e *exposition) family(name, kind, help string) {
	fmt.Fprintf(e, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
}

// sample adds one sample with label pairs (name, value, name, value, ...).
func (e *exposition) sample(name string, value float64, labels ...string) {
	e.WriteString(name)
	for i := 0; i+1 < len(labels); i += 2 {
		sep := ","
		if i == 0 {
			sep = "{"
		}
		e.WriteString(sep + labels[i] + `="` + labelEscaper.Replace(labels[i+1]) + `"`)
	}
	if len(labels) > 0 {
		e.WriteString("}")
	}
	e.WriteString(" " + formatFloat(value) + "\n")
}

// labelEscaper escapes a label value as the format requires.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// formatFloat writes a value the shortest way that reads back exactly.
func formatFloat(v float64) string {
	return strconv.FormatFloat(v, 'g', -1, 64)
}
