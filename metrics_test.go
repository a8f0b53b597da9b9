package main

import (
	"io"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMetrics runs requests through the service and reads /metrics: each
// request is counted under its route, method and status, and timed in the
// route's histogram; the replication and pool figures are there. (The
// exposition's syntax is checked by promtool in ./stack.sh test.)
func TestMetrics(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	for _, path := range []string{"/us/properties/7", "/eu/properties/8", "/us/properties/99999", "/nowhere"} {
		srv.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", path, nil))
	}
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics = %d %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	for _, want := range []string{
		`listing_http_requests_total{route="/{region}/properties/{id}",method="GET",status="200"} 2`,
		`listing_http_requests_total{route="/{region}/properties/{id}",method="GET",status="404"} 1`,
		`listing_http_requests_total{route="unmatched",method="GET",status="404"} 1`,
		`listing_http_request_duration_seconds_bucket{route="/{region}/properties/{id}",le="+Inf"} 3`,
		`listing_http_request_duration_seconds_count{route="/{region}/properties/{id}"} 3`,
		`listing_replication_report_up 1`,
		`listing_replication_stopped 0`,
		`listing_rejoining 0`,
		"# TYPE listing_outbox_backlog gauge",
		`listing_replication_applied_total 0`,
		`listing_replication_produce_errors_total 0`,
		"# TYPE listing_db_pool_connections_in_use gauge",
		"# TYPE listing_http_request_duration_seconds histogram",
		"# TYPE listing_replication_dead_letters_total counter",
		"# TYPE go_goroutines gauge",
	} {
		if !slices.Contains(strings.Split(string(body), "\n"), want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
	if !regexp.MustCompile(`(?m)^listing_db_pool_connections_in_use\{pool="request"\} \d+$`).Match(body) {
		t.Errorf("/metrics lacks the request pool's use:\n%s", body)
	}
	// The buckets are cumulative and end at the count.
	last := 0
	for _, m := range regexp.MustCompile(`(?m)^listing_http_request_duration_seconds_bucket\{route="/\{region\}/properties/\{id\}",le="[^"]+"\} (\d+)$`).FindAllStringSubmatch(string(body), -1) {
		n, _ := strconv.Atoi(m[1])
		if n < last {
			t.Errorf("bucket counts go down: %d after %d", n, last)
		}
		last = n
	}
	if last != 3 {
		t.Errorf("the last bucket holds %d, want 3", last)
	}
}

// TestMadeUpMethodsAddNoSeries sends requests with methods nobody serves,
// one of them 6,000 letters long: each is counted under method="OTHER", so
// a client cannot add a series (and bytes to every scrape) by inventing
// methods.
func TestMadeUpMethodsAddNoSeries(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	methods := []string{"BREW", "PROPFIND", "get", strings.Repeat("X", 6000)}
	for _, m := range methods {
		srv.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(m, "/us/properties/7", nil))
	}
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, m := range methods {
		if strings.Contains(body, `method="`+m+`"`) {
			t.Errorf("/metrics has a series for the method %.20q", m)
		}
	}
	want := `listing_http_requests_total{route="unmatched",method="OTHER",status="405"} 4`
	if !slices.Contains(strings.Split(body, "\n"), want) {
		t.Errorf("/metrics lacks %q:\n%s", want, body)
	}
}

// TestRequestMetricsBuckets puts durations on the edges of the buckets:
// a bucket counts what is less than or equal to its bound.
func TestRequestMetricsBuckets(t *testing.T) {
	m := newRequestMetrics()
	for _, d := range []time.Duration{500 * time.Microsecond, 501 * time.Microsecond, 10 * time.Second} {
		m.observe("/r", "GET", 200, d)
	}
	var e exposition
	m.write(&e)
	for _, want := range []string{
		`listing_http_request_duration_seconds_bucket{route="/r",le="0.0005"} 1` + "\n",
		`listing_http_request_duration_seconds_bucket{route="/r",le="0.001"} 2` + "\n",
		`listing_http_request_duration_seconds_bucket{route="/r",le="5"} 2` + "\n",
		`listing_http_request_duration_seconds_bucket{route="/r",le="+Inf"} 3` + "\n",
	} {
		if !strings.Contains(e.String(), want) {
			t.Errorf("exposition lacks %q:\n%s", want, e.String())
		}
	}
}
