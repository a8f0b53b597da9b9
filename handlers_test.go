package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// These tests run the real mux from newServer over a real PostgreSQL. TestMain
// creates a scratch database from init.sql and both seeds on the server named
// by TEST_DATABASE_URL, and drops it afterwards, so a running stack on the
// same server is never touched.

// scratchURL is the connection string of the scratch database, or "" when
// TEST_DATABASE_URL is not set.
var scratchURL string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	admin := os.Getenv("TEST_DATABASE_URL")
	if admin == "" {
		// Every test that needs the database fails and says how to set it.
		return m.Run()
	}
	name := fmt.Sprintf("property_test_%d_%d", os.Getpid(), time.Now().UnixNano())
	url, drop, err := createScratchDB(admin, name)
	if err != nil {
		fmt.Fprintln(os.Stderr, "create scratch database:", err)
		return 1
	}
	defer drop()
	scratchURL = url
	return m.Run()
}

// createScratchDB creates database name on the admin server, loads the
// schema and both seeds, and returns its URL and a function that drops it.
func createScratchDB(adminURL, name string) (string, func(), error) {
	ctx := context.Background()
	admin, err := openDB(config{databaseURL: adminURL, dbMaxConns: 2})
	if err != nil {
		return "", nil, err
	}
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close()
		return "", nil, err
	}
	drop := func() {
		admin.ExecContext(ctx, "DROP DATABASE "+name+" WITH (FORCE)")
		admin.Close()
	}
	url, err := replaceDBName(adminURL, name)
	if err != nil {
		drop()
		return "", nil, err
	}
	db, err := openDB(config{databaseURL: url, dbMaxConns: 1})
	if err != nil {
		drop()
		return "", nil, err
	}
	defer db.Close()
	for _, file := range []string{"init.sql", "us_seed.sql", "eu_seed.sql"} {
		script, err := os.ReadFile(file)
		if err == nil {
			// Without arguments the driver uses the simple protocol, which
			// runs a whole multi-statement script.
			_, err = db.ExecContext(ctx, string(script))
		}
		if err != nil {
			drop()
			return "", nil, fmt.Errorf("load %s: %w", file, err)
		}
	}
	return url, drop, nil
}

// replaceDBName returns a PostgreSQL URL with its database name replaced.
func replaceDBName(rawURL, name string) (string, error) {
	i := strings.Index(rawURL, "://")
	if i < 0 {
		return "", fmt.Errorf("TEST_DATABASE_URL must be a postgres:// URL")
	}
	rest := rawURL[i+3:]
	query := ""
	if q := strings.IndexByte(rest, '?'); q >= 0 {
		rest, query = rest[:q], rest[q:]
	}
	host, _, _ := strings.Cut(rest, "/")
	return rawURL[:i+3] + host + "/" + name + query, nil
}

// testDB returns a pool on the scratch database. Without TEST_DATABASE_URL it
// fails the test, saying how to provide one.
func testDB(t *testing.T) *sql.DB {
	t.Helper()
	if scratchURL == "" {
		t.Fatal("TEST_DATABASE_URL is not set: these tests need a PostgreSQL server they may create " +
			"a scratch database on, e.g. TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres " +
			"(./stack.sh test sets it up)")
	}
	db, err := openDB(config{databaseURL: scratchURL, dbMaxConns: 30})
	if err != nil {
		t.Fatalf("openDB(%q): %v", scratchURL, err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// testServer returns the service's handler for region over db. Its request
// log is discarded: the tests assert on responses.
func testServer(t *testing.T, region string, db *sql.DB) http.Handler {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	return newServer(logger, region, db, testReplicator(t, logger, region, db))
}

// testReplicator returns a replicator whose loops never run: its Kafka
// clients point at a closed port and are never used. The handlers only wake
// its relay and read its lag report, which comes from the database.
func testReplicator(t *testing.T, logger *slog.Logger, region string, db *sql.DB) *replicator {
	t.Helper()
	cfg := config{region: region, kafkaBrokers: []string{"127.0.0.1:1"}, kafkaTopic: "unused"}
	rep, err := newReplicator(logger, cfg, db)
	if err != nil {
		t.Fatalf("newReplicator: %v", err)
	}
	t.Cleanup(rep.close)
	return rep
}

// response is every field any response of the API may carry. Tests decode
// into it and compare with cmp.Diff.
type response struct {
	// Property fields.
	ID           int64     `json:"id,omitempty"`
	Price        Money     `json:"price,omitempty"`
	Bedrooms     *int32    `json:"bedrooms,omitempty"`
	Bathrooms    *int32    `json:"bathrooms,omitempty"`
	RegionOrigin string    `json:"region_origin,omitempty"`
	Version      int64     `json:"version,omitempty"`
	UpdatedAt    time.Time `json:"updated_at,omitzero"`

	// Health fields.
	Status string `json:"status,omitempty"`
	Region string `json:"region,omitempty"`

	// Error fields.
	Error            string    `json:"error,omitempty"`
	CurrentVersion   int64     `json:"current_version,omitempty"`
	RequestID        string    `json:"request_id,omitempty"`
	OriginalResponse *Property `json:"original_response,omitempty"`
}

// call sends one request to h and returns the status, the X-Served-By header
// and the decoded body. An empty requestID sends no X-Request-ID header.
func call(t *testing.T, h http.Handler, method, path, requestID, body string) (int, string, response) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if requestID != "" {
		req.Header.Set("X-Request-ID", requestID)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type = %q, want application/json", method, path, ct)
	}
	var got response
	dec := json.NewDecoder(rec.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("%s %s: decoding response %q: %v", method, path, rec.Body.String(), err)
	}
	return rec.Code, rec.Header().Get("X-Served-By"), got
}

// rowState is everything a request could change about one property.
type rowState struct {
	Property Property
	Outbox   int
	Requests int
}

// readRow reads the state of property id directly from the database.
func readRow(t *testing.T, db *sql.DB, id int64) rowState {
	t.Helper()
	ctx := context.Background()
	var s rowState
	var err error
	s.Property, err = getProperty(ctx, db, id)
	if err != nil && err != errNotFound {
		t.Fatalf("getProperty(%d): %v", id, err)
	}
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM outbox JOIN processed_requests USING (request_id) WHERE property_id = $1`, id).Scan(&s.Outbox); err != nil {
		t.Fatalf("count outbox rows of %d: %v", id, err)
	}
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM processed_requests WHERE property_id = $1`, id).Scan(&s.Requests); err != nil {
		t.Fatalf("count processed requests of %d: %v", id, err)
	}
	return s
}

func ptr[T any](v T) *T { return &v }

// newRequestID returns a request id no earlier run has used.
func newRequestID(prefix string) string {
	return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano())
}

// seedProperty is property id as the seeds write it.
func seedProperty(id int64) Property {
	region := "us"
	if id > 500 {
		region = "eu"
	}
	return Property{
		ID:           id,
		Price:        Money(15_000_000 + id*125_000 + (id%4)*25),
		Bedrooms:     ptr(int32(1 + id%5)),
		Bathrooms:    ptr(int32(1 + id%3)),
		RegionOrigin: region,
		Version:      1,
		UpdatedAt:    time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
	}
}

func TestGetProperty(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "eu", db)
	p7, p900 := seedProperty(7), seedProperty(900)
	tests := []struct {
		name       string
		method     string
		path       string
		wantStatus int
		want       response
	}{
		{"us_listing", "GET", "/us/properties/7", 200, propertyResponse(p7)},
		{"eu_listing_through_us_prefix", "GET", "/us/properties/900", 200, propertyResponse(p900)},
		{"eu_prefix", "GET", "/eu/properties/7", 200, propertyResponse(p7)},
		{"unknown_id", "GET", "/eu/properties/99999", 404, response{Error: "property not found"}},
		{"id_zero", "GET", "/eu/properties/0", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_negative", "GET", "/eu/properties/-1", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_not_a_number", "GET", "/eu/properties/abc", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_2_pow_63", "GET", "/eu/properties/9223372036854775808", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_leading_zero", "GET", "/eu/properties/007", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_plus_sign", "GET", "/eu/properties/+7", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_max_int64_unknown", "GET", "/eu/properties/9223372036854775807", 404, response{Error: "property not found"}},
		{"unknown_region", "GET", "/asia/properties/7", 404, response{Error: "unknown region: use /us/ or /eu/"}},
		{"region_case_matters", "GET", "/US/properties/7", 404, response{Error: "unknown region: use /us/ or /eu/"}},
		{"unknown_path", "GET", "/us/listings/7", 404, response{Error: "not found"}},
		{"wrong_method", "POST", "/us/properties/7", 405, response{Error: "method not allowed"}},
		{"delete_not_allowed", "DELETE", "/us/properties/7", 405, response{Error: "method not allowed"}},
		{"unclean_path_redirects", "GET", "/us/./properties/7", 307, response{Error: "moved to /us/properties/7"}},
		{"health_bare", "GET", "/health", 200, response{Status: "ok", Region: "eu"}},
		{"health_us_prefix", "GET", "/us/health", 200, response{Status: "ok", Region: "eu"}},
		{"health_unknown_region", "GET", "/xx/health", 404, response{Error: "unknown region: use /us/ or /eu/"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, servedBy, got := call(t, srv, tt.method, tt.path, "", "")
			if status != tt.wantStatus {
				t.Errorf("%s %s: status = %d, want %d", tt.method, tt.path, status, tt.wantStatus)
			}
			if servedBy != "eu" {
				t.Errorf("%s %s: X-Served-By = %q, want eu", tt.method, tt.path, servedBy)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("%s %s: body mismatch (-want +got):\n%s", tt.method, tt.path, diff)
			}
		})
	}
}

// propertyResponse is p as the API shows it.
func propertyResponse(p Property) response {
	return response{
		ID: p.ID, Price: p.Price, Bedrooms: p.Bedrooms, Bathrooms: p.Bathrooms,
		RegionOrigin: p.RegionOrigin, Version: p.Version, UpdatedAt: p.UpdatedAt,
	}
}

func TestGetPropertyPreservesMoneyExactly(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	req := httptest.NewRequest("GET", "/us/properties/3", nil)
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	// Property 3 is 150000 + 3*1250 + 3*0.25 = 153750.75: the raw JSON must
	// carry exactly that literal, not a float rendering of it.
	if !strings.Contains(rec.Body.String(), `"price":153750.75,`) {
		t.Errorf("GET /us/properties/3 = %s, want price 153750.75", rec.Body.String())
	}
}

func TestUpdatePropertyBadInput(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	const id = 11
	path := fmt.Sprintf("/us/properties/%d", id)
	valid := `{"price": 500000.5, "version": 1}`
	bad := func(msg string) response { return response{Error: msg} }
	tests := []struct {
		name       string
		path       string
		requestID  string
		body       string
		wantStatus int
		want       response
	}{
		{"malformed_json", path, "bad-1", `{"price": 5`, 400, bad("body is not valid JSON")},
		{"not_json", path, "bad-2", `price=5`, 400, bad("body must be one JSON object")},
		{"empty_body", path, "bad-3", ``, 400, bad("body must be one JSON object")},
		{"array_body", path, "bad-4", `[{"price": 5, "version": 1}]`, 400, bad("body must be one JSON object")},
		{"null_body", path, "bad-5", `null`, 400, bad("body must be one JSON object")},
		{"trailing_data", path, "bad-6", valid + ` {}`, 400, bad("body must be one JSON object with nothing after it")},
		{"trailing_garbage", path, "bad-7", valid + `x`, 400, bad("body must be one JSON object with nothing after it")},
		{"unknown_field", path, "bad-8", `{"price": 5, "version": 1, "region_origin": "eu"}`, 400, bad(`unknown field "region_origin"`)},
		{"price_string", path, "bad-9", `{"price": "500000", "version": 1}`, 400, bad("price must be a JSON number")},
		{"price_bool", path, "bad-10", `{"price": true, "version": 1}`, 400, bad("price must be a JSON number")},
		{"price_missing", path, "bad-11", `{"version": 1}`, 400, bad("price is required")},
		{"price_null", path, "bad-12", `{"price": null, "version": 1}`, 400, bad("price is required")},
		{"price_zero", path, "bad-13", `{"price": 0, "version": 1}`, 400, bad("price must be greater than 0")},
		{"price_negative", path, "bad-14", `{"price": -5, "version": 1}`, 400, bad("price must be greater than 0")},
		{"price_three_decimals", path, "bad-15", `{"price": 1.005, "version": 1}`, 400, bad("price must have at most two decimal places")},
		{"price_tiny_exponent", path, "bad-16", `{"price": 1e-3, "version": 1}`, 400, bad("price must have at most two decimal places")},
		{"price_10_pow_12", path, "bad-17", `{"price": 1000000000000, "version": 1}`, 400, bad("price must be less than 10000000000")},
		{"price_10_pow_10", path, "bad-18", `{"price": 1e10, "version": 1}`, 400, bad("price must be less than 10000000000")},
		{"price_huge_exponent", path, "bad-19", `{"price": 1e999999999, "version": 1}`, 400, bad("price is out of range")},
		{"version_missing", path, "bad-20", `{"price": 5}`, 400, bad("version is required")},
		{"version_zero", path, "bad-21", `{"price": 5, "version": 0}`, 400, bad("version must be at least 1")},
		{"version_negative", path, "bad-22", `{"price": 5, "version": -3}`, 400, bad("version must be at least 1")},
		{"version_fraction", path, "bad-23", `{"price": 5, "version": 1.5}`, 400, bad("version must be an integer in range")},
		{"version_string", path, "bad-24", `{"price": 5, "version": "1"}`, 400, bad("version must be an integer in range")},
		{"version_2_pow_63", path, "bad-25", `{"price": 5, "version": 9223372036854775808}`, 400, bad("version must be an integer in range")},
		{"bedrooms_negative", path, "bad-26", `{"price": 5, "version": 1, "bedrooms": -1}`, 400, bad("bedrooms must be between 0 and 100")},
		{"bathrooms_absurd", path, "bad-27", `{"price": 5, "version": 1, "bathrooms": 5000}`, 400, bad("bathrooms must be between 0 and 100")},
		{"bedrooms_beyond_int32", path, "bad-28", `{"price": 5, "version": 1, "bedrooms": 99999999999}`, 400, bad("bedrooms must be an integer in range")},
		{"huge_body", path, "bad-29", `{"price": 5, "version": 1, "pad": "` + strings.Repeat("x", 100<<10) + `"}`, 413, bad("request body is larger than 65536 bytes")},
		{"request_id_missing", path, "", valid, 400, bad("X-Request-ID header is required")},
		{"request_id_overlong", path, strings.Repeat("r", 129), valid, 400, bad("X-Request-ID must be 1 to 128 visible ASCII characters")},
		{"request_id_with_space", path, "two words", valid, 400, bad("X-Request-ID must be 1 to 128 visible ASCII characters")},
		{"request_id_non_ascii", path, "caf\u00e9", valid, 400, bad("X-Request-ID must be 1 to 128 visible ASCII characters")},
		{"id_zero", "/us/properties/0", "bad-30", valid, 400, bad("id must be a positive 64-bit integer")},
		{"id_negative", "/us/properties/-1", "bad-31", valid, 400, bad("id must be a positive 64-bit integer")},
		{"id_not_a_number", "/us/properties/abc", "bad-32", valid, 400, bad("id must be a positive 64-bit integer")},
		{"id_2_pow_63", "/us/properties/9223372036854775808", "bad-33", valid, 400, bad("id must be a positive 64-bit integer")},
		{"unknown_region", "/mars/properties/11", "bad-34", valid, 404, bad("unknown region: use /us/ or /eu/")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := readRow(t, db, id)
			status, servedBy, got := call(t, srv, "PUT", tt.path, tt.requestID, tt.body)
			if status != tt.wantStatus {
				t.Errorf("PUT %s %.60q: status = %d, want %d", tt.path, tt.body, status, tt.wantStatus)
			}
			if servedBy != "us" {
				t.Errorf("PUT %s: X-Served-By = %q, want us", tt.path, servedBy)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("PUT %s %.60q: body mismatch (-want +got):\n%s", tt.path, tt.body, diff)
			}
			if diff := cmp.Diff(before, readRow(t, db, id)); diff != "" {
				t.Errorf("PUT %s %.60q changed the row (-before +after):\n%s", tt.path, tt.body, diff)
			}
		})
	}
}

func TestUpdateProperty(t *testing.T) {
	db := testDB(t)
	us := testServer(t, "us", db)
	eu := testServer(t, "eu", db)
	const id = 20
	path := "/us/properties/20"
	seed := seedProperty(id)

	// A successful update: version +1, the serving region, the new price.
	start := time.Now()
	status, _, got := call(t, eu, "PUT", path, "update-1", `{"price": 500000.5, "version": 1, "bedrooms": 4}`)
	if status != 200 {
		t.Fatalf("PUT %s version 1: status = %d (%+v), want 200", path, status, got)
	}
	want := propertyResponse(seed)
	want.Price, want.Bedrooms, want.Version, want.RegionOrigin = 50_000_050, ptr(int32(4)), 2, "eu"
	if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(response{}, "UpdatedAt")); diff != "" {
		t.Errorf("PUT %s version 1: body mismatch (-want +got):\n%s", path, diff)
	}
	if got.UpdatedAt.Location() != time.UTC || got.UpdatedAt.Before(start.Add(-time.Minute)) || got.UpdatedAt.After(time.Now().Add(time.Minute)) {
		t.Errorf("PUT %s: updated_at = %v, want now in UTC", path, got.UpdatedAt)
	}
	first := got
	after := readRow(t, db, id)
	if after.Outbox != 1 || after.Requests != 1 {
		t.Errorf("after one update of %d: outbox rows = %d, request ids = %d, want 1 and 1", id, after.Outbox, after.Requests)
	}
	wantProperty := Property{
		ID: first.ID, Price: first.Price, Bedrooms: first.Bedrooms, Bathrooms: first.Bathrooms,
		RegionOrigin: first.RegionOrigin, Version: first.Version, UpdatedAt: first.UpdatedAt,
	}
	if diff := cmp.Diff(wantProperty, after.Property); diff != "" {
		t.Errorf("row after PUT %s differs from the response (-response +row):\n%s", path, diff)
	}

	// Every failure below must leave this state exactly as it is.
	tests := []struct {
		name       string
		path       string
		requestID  string
		body       string
		wantStatus int
		want       response
	}{
		{"duplicate_request", path, "update-1", `{"price": 500000.5, "version": 1, "bedrooms": 4}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		// 422 comes before 404 and 409 in the contract's order.
		{"duplicate_beats_version_mismatch", path, "update-1", `{"price": 1, "version": 7}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		{"duplicate_beats_not_found", "/us/properties/77777", "update-1", `{"price": 1, "version": 1}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		{"duplicate_with_current_version", path, "update-1", `{"price": 1, "version": 2}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		{"stale_version", path, "update-2", `{"price": 600000, "version": 1}`, 409,
			response{Error: "version mismatch", CurrentVersion: 2}},
		{"future_version", path, "update-3", `{"price": 600000, "version": 3}`, 409,
			response{Error: "version mismatch", CurrentVersion: 2}},
		{"not_found_beats_version", "/us/properties/77777", "update-4", `{"price": 600000, "version": 9}`, 404,
			response{Error: "property not found"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, _, got := call(t, us, "PUT", tt.path, tt.requestID, tt.body)
			if status != tt.wantStatus {
				t.Errorf("PUT %s %s %s: status = %d, want %d", tt.path, tt.requestID, tt.body, status, tt.wantStatus)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("PUT %s %s %s: body mismatch (-want +got):\n%s", tt.path, tt.requestID, tt.body, diff)
			}
			if diff := cmp.Diff(after, readRow(t, db, id)); diff != "" {
				t.Errorf("PUT %s %s changed the row (-before +after):\n%s", tt.path, tt.requestID, diff)
			}
		})
	}

	// A failed request leaves its id free: update-2 (a 409 above) now works.
	status, _, got = call(t, us, "PUT", path, "update-2", `{"price": 600000, "version": 2}`)
	if status != 200 || got.Version != 3 || got.RegionOrigin != "us" || got.Bedrooms == nil || *got.Bedrooms != 4 {
		t.Errorf("PUT %s update-2 version 2 = %d %+v, want 200 with version 3, region us, bedrooms kept at 4", path, status, got)
	}
}

// TestConcurrentUpdates races 20 PUTs of one property at the database.
func TestConcurrentUpdates(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	const n = 20
	tests := []struct {
		name      string
		id        int64
		requestID func(i int) string
		want      map[int]int
	}{
		// Optimistic locking: one write wins, the rest were made from a
		// version that no longer exists.
		{"same_version", 30, func(i int) string { return fmt.Sprintf("same-version-%d", i) }, map[int]int{200: 1, 409: n - 1}},
		// Idempotency: one request, sent 20 times at once, is applied once.
		{"same_request_id", 31, func(int) string { return "same-request" }, map[int]int{200: 1, 422: n - 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fmt.Sprintf("/us/properties/%d", tt.id)
			statuses := race(t, n, func(i int) int {
				req := httptest.NewRequest("PUT", path, strings.NewReader(`{"price": 123.45, "version": 1}`))
				req.Header.Set("X-Request-ID", tt.requestID(i))
				rec := httptest.NewRecorder()
				srv.ServeHTTP(rec, req)
				return rec.Code
			})
			if diff := cmp.Diff(tt.want, statuses); diff != "" {
				t.Errorf("%d concurrent PUTs of %s at version 1: statuses mismatch (-want +got):\n%s", n, path, diff)
			}
			row := readRow(t, db, tt.id)
			if row.Property.Version != 2 || row.Outbox != 1 || row.Requests != 1 {
				t.Errorf("after the race: version %d, outbox rows %d, request ids %d; want 2, 1, 1",
					row.Property.Version, row.Outbox, row.Requests)
			}
		})
	}
}

// race runs f(0..n-1) in n goroutines released at the same moment and counts
// the statuses they return.
func race(t *testing.T, n int, f func(i int) int) map[int]int {
	t.Helper()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		statuses = map[int]int{}
		start    = make(chan struct{})
	)
	for i := range n {
		wg.Go(func() {
			<-start
			status := f(i)
			mu.Lock()
			statuses[status]++
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()
	return statuses
}

func TestDatabaseDown(t *testing.T) {
	// A pool on a port where nothing listens stands for a stopped database.
	db, err := openDB(config{databaseURL: "postgres://nobody@127.0.0.1:1/none", dbMaxConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	srv := testServer(t, "us", db)
	tests := []struct {
		name      string
		method    string
		path      string
		requestID string
		body      string
		want      response
	}{
		{"health", "GET", "/health", "", "", response{Status: "unavailable", Region: "us", Error: "database unreachable"}},
		{"region_health", "GET", "/eu/health", "", "", response{Status: "unavailable", Region: "us", Error: "database unreachable"}},
		{"get", "GET", "/us/properties/1", "", "", response{Error: "service unavailable, try again"}},
		{"put", "PUT", "/us/properties/1", "down-1", `{"price": 1, "version": 1}`, response{Error: "service unavailable, try again"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, _, got := call(t, srv, tt.method, tt.path, tt.requestID, tt.body)
			if status != http.StatusServiceUnavailable {
				t.Errorf("%s %s with the database down: status = %d, want 503", tt.method, tt.path, status)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("%s %s with the database down: body mismatch (-want +got):\n%s", tt.method, tt.path, diff)
			}
		})
	}
}

func TestParseMoney(t *testing.T) {
	tests := []struct {
		in      string
		want    Money
		wantErr string
	}{
		{"450000.5", 45_000_050, ""},
		{"450000.50", 45_000_050, ""},
		{"0.01", 1, ""},
		{"1", 100, ""},
		{"1e3", 100_000, ""},
		{"1.5E+2", 15_000, ""},
		{"12345e-2", 12_345, ""},
		{"1.230", 123, ""},
		{"9999999999.99", 999_999_999_999, ""},
		{"0.001", 0, "price must have at most two decimal places"},
		{"1.005", 0, "price must have at most two decimal places"},
		{"0", 0, "price must be greater than 0"},
		{"0.00", 0, "price must be greater than 0"},
		{"-1", 0, "price must be greater than 0"},
		{"0e999999", 0, "price is out of range"},
		{"10000000000", 0, "price must be less than 10000000000"},
		{"1e12", 0, "price must be less than 10000000000"},
		{"99999999999999999999999", 0, "price must be less than 10000000000"},
		{"1e-200", 0, "price is out of range"},
	}
	for _, tt := range tests {
		got, err := parseMoney(tt.in)
		gotErr := ""
		if err != nil {
			gotErr = err.Error()
		}
		if got != tt.want || gotErr != tt.wantErr {
			t.Errorf("parseMoney(%q) = %d, %q; want %d, %q", tt.in, got, gotErr, tt.want, tt.wantErr)
		}
	}
}

func TestMoneyJSON(t *testing.T) {
	tests := []struct {
		m    Money
		want string
	}{
		{45_000_050, "450000.5"},
		{45_000_000, "450000"},
		{1, "0.01"},
		{10, "0.1"},
		{999_999_999_999, "9999999999.99"},
	}
	for _, tt := range tests {
		got, err := json.Marshal(tt.m)
		if err != nil || string(got) != tt.want {
			t.Errorf("json.Marshal(Money(%d)) = %s, %v; want %s", tt.m, got, err, tt.want)
		}
		var back Money
		if err := json.Unmarshal(got, &back); err != nil || back != tt.m {
			t.Errorf("json.Unmarshal(%s) = %d, %v; want %d", got, back, err, tt.m)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	base := map[string]string{"REGION": "us", "DATABASE_URL": "postgres://u:p@db:5432/property_db", "KAFKA_BROKER": "kafka:29092"}
	with := func(kv ...string) func(string) string {
		env := map[string]string{}
		for k, v := range base {
			env[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			env[kv[i]] = kv[i+1]
		}
		return func(k string) string { return env[k] }
	}
	tests := []struct {
		name    string
		getenv  func(string) string
		want    config
		wantErr string
	}{
		{"defaults", with(), config{region: "us", port: 8000, databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates"}, ""},
		{"kafka_brokers", with("KAFKA_BROKER", "k1:9092, k2:9092", "KAFKA_TOPIC", "updates.v2"), config{region: "us", port: 8000,
			databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16, kafkaBrokers: []string{"k1:9092", "k2:9092"}, kafkaTopic: "updates.v2"}, ""},
		{"kafka_broker_missing", with("KAFKA_BROKER", ""), config{},
			"KAFKA_BROKER is not set (host:port of a Kafka broker, comma-separated for several)"},
		{"kafka_broker_no_port", with("KAFKA_BROKER", "kafka"), config{}, `KAFKA_BROKER must be host:port[,host:port...], got "kafka"`},
		{"kafka_topic_invalid", with("KAFKA_TOPIC", "bad topic"), config{}, `KAFKA_TOPIC must be 1 to 200 of a-z A-Z 0-9 . _ -, got "bad topic"`},
		{"debug_addr_invalid", with("DEBUG_ADDR", "6060"), config{}, `DEBUG_ADDR must be host:port, got "6060"`},
		{"region_missing", with("REGION", ""), config{}, `REGION must be us or eu, got ""`},
		{"region_unknown", with("REGION", "asia"), config{}, `REGION must be us or eu, got "asia"`},
		{"port_not_a_number", with("PORT", "http"), config{}, `PORT must be an integer from 1 to 65535, got "http"`},
		{"port_out_of_range", with("PORT", "70000"), config{}, `PORT must be an integer from 1 to 65535, got "70000"`},
		{"database_url_invalid", with("DATABASE_URL", "postgres://%zz"), config{}, "DATABASE_URL is not a valid PostgreSQL connection string"},
		{"db_parts", with("DATABASE_URL", "", "DB_HOST", "db-eu", "DB_USER", "app", "DB_PASSWORD", "p@ss word", "DB_NAME", "property_db"),
			config{region: "us", port: 8000, databaseURL: "postgres://app:p%40ss%20word@db-eu:5432/property_db", dbMaxConns: 16,
				kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates"}, ""},
		{"db_parts_missing_password", with("DATABASE_URL", "", "DB_HOST", "db-eu", "DB_USER", "app", "DB_NAME", "property_db"), config{},
			"DB_PASSWORD is not set (set DATABASE_URL, or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME)"},
		{"db_port_invalid", with("DATABASE_URL", "", "DB_HOST", "h", "DB_USER", "u", "DB_PASSWORD", "p", "DB_NAME", "n", "DB_PORT", "x"), config{},
			`DB_PORT must be an integer from 1 to 65535, got "x"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.getenv)
			gotErr := ""
			if err != nil {
				gotErr = err.Error()
			}
			if gotErr != tt.wantErr {
				t.Fatalf("loadConfig() error = %q, want %q", gotErr, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(config{})); diff != "" {
				t.Errorf("loadConfig() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRunStartsAndStops(t *testing.T) {
	testDB(t) // fails early, with the explanation, when there is no database
	ctx, cancel := context.WithCancel(context.Background())
	// Kafka on a closed port: the service must start, serve and stop while
	// Kafka is down.
	env := map[string]string{"REGION": "eu", "PORT": "18931", "DATABASE_URL": scratchURL, "KAFKA_BROKER": "127.0.0.1:1"}
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, &out) }()
	t.Cleanup(cancel)

	// The health-check mode of the same binary must see the instance healthy.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := run(context.Background(), []string{"healthcheck"}, func(k string) string { return env[k] }, io.Discard)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("run healthcheck against the started service: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Reads and writes work while Kafka is down; the write waits in the
	// outbox.
	base := "http://127.0.0.1:18931/eu/properties/50"
	resp, err := http.Get(base)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s with Kafka down: %v %v, want 200", base, resp, err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("PUT", base, strings.NewReader(`{"price": 1234.5, "version": 1}`))
	req.Header.Set("X-Request-ID", newRequestID("kafka-down"))
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT %s with Kafka down: %v %v, want 200", base, resp, err)
	}
	resp.Body.Close()
	db := testDB(t)
	if row := readRow(t, db, 50); row.Outbox != 1 || row.Property.Version != 2 {
		t.Errorf("after a PUT with Kafka down: version %d, outbox rows %d; want 2 and 1 waiting", row.Property.Version, row.Outbox)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run() after cancel = %v, want nil", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run() did not return within 15s of cancel")
	}
	if !strings.Contains(out.String(), `"msg":"stopped"`) {
		t.Errorf("run() log does not show an orderly stop:\n%s", out.String())
	}
}
