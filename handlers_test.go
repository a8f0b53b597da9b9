package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/jackc/pgx/v5/pgconn"
)

// These tests run the real mux from newServer over a real PostgreSQL. TestMain
// creates a scratch database from init.sql and both seeds on the server named
// by TEST_DATABASE_URL, and drops it afterwards, so a running stack on the
// same server is never touched.

// testServer returns the service's handler for region over db. Its request
// log is discarded: the tests assert on responses.
func testServer(t *testing.T, region string, db *sql.DB) http.Handler {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	return newServer(logger, region, db, idle(db, region), map[string]*sql.DB{"request": db})
}

// idleReplication is the replication of a test server: no relay or consumer
// runs, so a write's wake-up goes nowhere, and the lag report comes from
// the database and counters that stay at zero.
type idleReplication struct {
	db      *sql.DB
	region  string
	started time.Time
}

func idle(db *sql.DB, region string) idleReplication {
	return idleReplication{db, region, time.Now()}
}

func (r idleReplication) notify()                {}
func (r idleReplication) stoppedReason() string  { return "" }
func (r idleReplication) produceErrors() int64   { return 0 }
func (r idleReplication) published() int64       { return 0 }
func (r idleReplication) purgeStats() purgeStats { return purgeStats{} }
func (r idleReplication) rejoinStatus() rejoinStatus {
	return rejoinStatus{State: stateServing}
}
func (r idleReplication) topicName() string { return "property-updates" }
func (r idleReplication) peerWatermark() *peerWatermark {
	return &peerWatermark{db: r.db, region: peerOf(r.region)}
}
func (r idleReplication) snapshot() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		encode(w, http.StatusServiceUnavailable, errorBody{Error: "no replication in this test"})
	})
}
func (r idleReplication) lagReport(ctx context.Context) (LagReport, error) {
	return readLag(ctx, r.db, r.region, r.started, &replicationStats{})
}

// unreachableDB returns a pool on a port where nothing listens: a stopped
// database, for the tests that must never reach one. A request that tried
// would be answered 503.
func unreachableDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := openDB("postgres://nobody@127.0.0.1:1/none", 1, sessionLimits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// response is every field any response of the API may carry. Tests decode
// into it and compare with cmp.Diff.
type response struct {
	// A property's fields, at the top level of the JSON.
	Property

	// Health fields.
	Status             string `json:"status,omitempty"`
	Region             string `json:"region,omitempty"`
	ReplicationStopped string `json:"replication_stopped,omitempty"`

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
	// The row as stored, a tombstone too.
	s.Property, err = scanProperty(db.QueryRowContext(ctx, getPropertySQL, id))
	if err != nil && err != sql.ErrNoRows {
		t.Fatalf("read property %d: %v", id, err)
	}
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM outbox WHERE property_id = $1`, id).Scan(&s.Outbox); err != nil {
		t.Fatalf("count outbox rows of %d: %v", id, err)
	}
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM processed_requests WHERE property_id = $1`, id).Scan(&s.Requests); err != nil {
		t.Fatalf("count processed requests of %d: %v", id, err)
	}
	return s
}

// TestGetProperty is the read path and the routing around it. The cases
// that need no listing run against an unreachable database, so they pass
// without PostgreSQL, and prove that the answer never depended on it.
func TestGetProperty(t *testing.T) {
	routing := testServer(t, "eu", unreachableDB(t))
	p7, p900 := seedProperty(7), seedProperty(900)
	tests := []struct {
		name       string
		needsDB    bool
		method     string
		path       string
		wantStatus int
		want       response
	}{
		{"us_listing", true, "GET", "/us/properties/7", 200, response{Property: p7}},
		{"eu_listing_through_us_prefix", true, "GET", "/us/properties/900", 200, response{Property: p900}},
		{"eu_prefix", true, "GET", "/eu/properties/7", 200, response{Property: p7}},
		{"unknown_id", true, "GET", "/eu/properties/99999", 404, response{Error: "property not found"}},
		{"id_zero", false, "GET", "/eu/properties/0", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_negative", false, "GET", "/eu/properties/-1", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_not_a_number", false, "GET", "/eu/properties/abc", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_2_pow_63", false, "GET", "/eu/properties/9223372036854775808", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_leading_zero", false, "GET", "/eu/properties/007", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_plus_sign", false, "GET", "/eu/properties/+7", 400, response{Error: "id must be a positive 64-bit integer"}},
		{"id_max_int64_unknown", true, "GET", "/eu/properties/9223372036854775807", 404, response{Error: "property not found"}},
		{"unknown_region", false, "GET", "/asia/properties/7", 404, response{Error: "unknown region: use /us/ or /eu/"}},
		{"region_case_matters", false, "GET", "/US/properties/7", 404, response{Error: "unknown region: use /us/ or /eu/"}},
		{"unknown_path", false, "GET", "/us/listings/7", 404, response{Error: "not found"}},
		{"wrong_method", false, "POST", "/us/properties/7", 405, response{Error: "method not allowed"}},
		{"patch_not_allowed", false, "PATCH", "/us/properties/7", 405, response{Error: "method not allowed"}},
		{"unclean_path_redirects", false, "GET", "/us/./properties/7", 307, response{Error: "moved to /us/properties/7"}},
		{"health_bare", true, "GET", "/health", 200, response{Status: "ok", Region: "eu"}},
		{"health_us_prefix", true, "GET", "/us/health", 200, response{Status: "ok", Region: "eu"}},
		{"health_unknown_region", false, "GET", "/xx/health", 404, response{Error: "unknown region: use /us/ or /eu/"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := routing
			if tt.needsDB {
				srv = testServer(t, "eu", testDB(t))
			}
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

// TestUpdatePropertyBadInput sends a PUT that breaks each rule once. The
// server's database is unreachable: a request that got as far as the
// database would be answered 503, so every 4xx below also proves the bad
// request changed nothing, and the table runs without PostgreSQL.
func TestUpdatePropertyBadInput(t *testing.T) {
	srv := testServer(t, "us", unreachableDB(t))
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
		{"field_name_case", path, "bad-35", `{"PRICE": 5, "vErSiOn": 9}`, 400, bad(`unknown field "PRICE"`)},
		{"repeated_key", path, "bad-36", `{"price": 5, "version": 3, "version": 7}`, 400, bad(`repeated field "version"`)},
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
	want := response{Property: seed}
	want.Price, want.Bedrooms, want.Version, want.RegionOrigin = 50_000_050, ptr(int32(4)), 2, "eu"
	if diff := cmp.Diff(want, got, cmpopts.IgnoreFields(Property{}, "UpdatedAt")); diff != "" {
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
	wantProperty := first.Property
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
		// The region prefix only picks a region: a failover replays the same
		// request under the other one.
		{"duplicate_through_other_prefix", "/eu/properties/20", "update-1", `{"price": 500000.5, "version": 1, "bedrooms": 4}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		{"duplicate_written_otherwise", path, "update-1", `{"bedrooms": 4, "version": 1, "price": 500000.50}`, 422,
			response{Error: "duplicate request", RequestID: "update-1", OriginalResponse: &wantProperty}},
		// The same id with another request: no original response, so that
		// the client cannot believe its new body was applied. 422 still comes
		// before 404 and 409 in the order of docs/semantics.md, §3.
		{"reused_for_other_body", path, "update-1", `{"price": 500001, "version": 1, "bedrooms": 4}`, 422,
			response{Error: "request id reused for a different request", RequestID: "update-1"}},
		{"reused_beats_version_mismatch", path, "update-1", `{"price": 1, "version": 7}`, 422,
			response{Error: "request id reused for a different request", RequestID: "update-1"}},
		{"reused_beats_not_found", "/us/properties/77777", "update-1", `{"price": 500000.5, "version": 1, "bedrooms": 4}`, 422,
			response{Error: "request id reused for a different request", RequestID: "update-1"}},
		{"reused_with_current_version", path, "update-1", `{"price": 1, "version": 2}`, 422,
			response{Error: "request id reused for a different request", RequestID: "update-1"}},
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

// TestEncodeError is the one error mapper's table: every error a handler can
// meet, and the status and body the client gets. No internals reach the
// client: a 5xx says only what the client can do about it.
func TestEncodeError(t *testing.T) {
	original := seedProperty(5)
	tests := []struct {
		name       string
		err        error
		wantStatus int
		want       response
	}{
		{"validation", &validationError{"price is required"}, 400, response{Error: "price is required"}},
		{"body_too_large", &http.MaxBytesError{Limit: maxBodyBytes}, 413, response{Error: "request body is larger than 65536 bytes"}},
		{"duplicate_request", &duplicateRequestError{requestID: "r-1", original: original}, 422,
			response{Error: "duplicate request", RequestID: "r-1", OriginalResponse: &original}},
		{"unknown_region", errUnknownRegion, 404, response{Error: "unknown region: use /us/ or /eu/"}},
		{"not_found", fmt.Errorf("get property 9: %w", errNotFound), 404, response{Error: "property not found"}},
		{"version_mismatch", &versionMismatchError{current: 4}, 409, response{Error: "version mismatch", CurrentVersion: 4}},
		{"deleted", fmt.Errorf("get property 9: %w", &deletedError{current: 3}), 410, response{Error: "property deleted", CurrentVersion: 3}},
		{"if_match_required", errIfMatchRequired, 428,
			response{Error: `If-Match is required: send the ETag of the state to delete, such as "4-us"`}},
		{"database_unreachable", fmt.Errorf("update property 9: %w", context.DeadlineExceeded), 503,
			response{Error: "service unavailable, try again"}},
		{"database_shutting_down", &pgconn.PgError{Code: "57P01", Message: "terminating connection"}, 503,
			response{Error: "service unavailable, try again"}},
		{"lock_timeout", &pgconn.PgError{Code: "55P03", Message: "canceling statement due to lock timeout"}, 503,
			response{Error: "service unavailable, try again"}},
		{"statement_timeout", &pgconn.PgError{Code: "57014", Message: "canceling statement due to statement timeout"}, 503,
			response{Error: "service unavailable, try again"}},
		{"request_reused", &requestReusedError{requestID: "r-2"}, 422,
			response{Error: "request id reused for a different request", RequestID: "r-2"}},
		{"database_refused_a_value", &pgconn.PgError{Code: "23514", Message: "secret detail of the schema"}, 500,
			response{Error: "internal error"}},
		{"bug", errors.New("secret detail of the code"), 500, response{Error: "internal error"}},
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			encodeError(rec, httptest.NewRequest("GET", "/us/properties/9", nil), logger, tt.err)
			if rec.Code != tt.wantStatus {
				t.Errorf("encodeError(%v): status = %d, want %d", tt.err, rec.Code, tt.wantStatus)
			}
			var got response
			if err := strictUnmarshal(rec.Body.Bytes(), &got); err != nil {
				t.Fatalf("encodeError(%v): body %q: %v", tt.err, rec.Body.String(), err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("encodeError(%v): body mismatch (-want +got):\n%s", tt.err, diff)
			}
		})
	}
}

// TestBodyOverLimitIsReadable sends a body far over the limit straight to
// the service, slowly and whole before reading, as a simple client does,
// and must read the 413, not a connection reset.
func TestBodyOverLimitIsReadable(t *testing.T) {
	srv := httptest.NewServer(testServer(t, "us", unreachableDB(t)))
	t.Cleanup(srv.Close)
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const size, chunk = 512 << 10, 8 << 10
	fmt.Fprintf(conn, "PUT /us/properties/1 HTTP/1.1\r\nHost: test\r\nX-Request-ID: big-1\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", size)
	// Slower than the server's wait between answering and closing (half a
	// second): a server that closed with the body unread would reset the
	// connection while it is still being sent.
	for sent := 0; sent < size; sent += chunk {
		if _, err := conn.Write(bytes.Repeat([]byte("x"), chunk)); err != nil {
			t.Fatalf("sending byte %d of a %d-byte body: %v", sent, size, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the answer to a %d-byte body: %v", size, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var got response
	if err := strictUnmarshal(raw, &got); err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("a %d-byte body: %s %q (%v), want 413 and a JSON error", size, resp.Status, raw, err)
	}
	if diff := cmp.Diff(response{Error: "request body is larger than 65536 bytes"}, got); diff != "" {
		t.Errorf("a %d-byte body: body mismatch (-want +got):\n%s", size, diff)
	}
}

// FuzzParseID: an id is accepted only in its one canonical form, and
// positive.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"1", "7", "007", "+7", "-1", "0", "9223372036854775807", "9223372036854775808", "1e3", " 1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseID(s)
		if err == nil && (id < 1 || strconv.FormatInt(id, 10) != s) {
			t.Fatalf("parseID(%q) = %d: not the canonical form of a positive id", s, id)
		}
	})
}

// FuzzParseRequestID: a request id is accepted only if it is 1–128 visible
// ASCII characters.
func FuzzParseRequestID(f *testing.F) {
	for _, s := range []string{"7f1c0c2e-0001", "a", "", " ", "a b", "é", strings.Repeat("x", 128), strings.Repeat("x", 129), "\x7f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseRequestID(http.Header{"X-Request-Id": {s}})
		if err != nil {
			return
		}
		if id != s || len(id) < 1 || len(id) > maxRequestIDLen || strings.IndexFunc(id, func(r rune) bool { return r < '!' || r > '~' }) >= 0 {
			t.Fatalf("parseRequestID accepted %q", s)
		}
	})
}

// TestStandIn: a PUT or DELETE under the other region's prefix is one NGINX
// failed over, whose first attempt may have committed in the other region
// and not arrived here yet. Refused on this region's copy, it is judged
// again once the copy includes every write the other region began before
// the request arrived; if it cannot get there in time, a 503. The server
// here is EU's; the other region's writes reach its database the way the
// consumer applies them (applyEvents), with the watermark its heartbeats
// leave.
func TestStandIn(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	eu := testServer(t, "eu", db)
	// The heartbeats applied from the other region: their watermark (a time
	// of the other region's clock) and their echo of this region's own (a
	// time of this one's).
	setMarks := func(watermark, seen time.Time) {
		t.Helper()
		if _, err := db.ExecContext(ctx, `DELETE FROM replication_watermarks`); err != nil {
			t.Fatal(err)
		}
		if _, err := db.ExecContext(ctx, `INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, seen) VALUES ('us', 0, 1, $1, $2)`, watermark, seen); err != nil {
			t.Fatal(err)
		}
	}
	setWatermark := func(w time.Time) { setMarks(w, w) }
	t.Cleanup(func() { db.ExecContext(ctx, `DELETE FROM replication_watermarks`) })
	timed := func(method, path, requestID, body string) (int, response, time.Duration) {
		t.Helper()
		start := time.Now()
		status, _, got := call(t, eu, method, path, requestID, body)
		return status, got, time.Since(start)
	}
	const id = 47
	stale := `{"price": 470000, "version": 7}`
	mismatch := response{Error: "version mismatch", CurrentVersion: 1}
	cannotTell := response{Error: "this region cannot tell yet whether the listing's own region applied this request: retry with the same X-Request-ID"}

	// Under its own prefix, a region answers on its copy at once.
	setWatermark(time.Now().Add(-time.Hour))
	if status, got, _ := timed("PUT", "/eu/properties/47", "stand-in-1", stale); status != 409 || !cmp.Equal(mismatch, got) {
		t.Errorf("PUT under /eu/ with a stale version: %d %+v, want 409 %+v", status, got, mismatch)
	}
	// Standing in, with the other region's writes an hour behind: it waits
	// for them, and then cannot tell.
	for _, tt := range []struct{ method, path, body string }{
		{"PUT", "/us/properties/47", stale},
		{"PUT", "/us/properties/77777", stale},
	} {
		status, got, took := timed(tt.method, tt.path, "stand-in-2", tt.body)
		if status != 503 || !cmp.Equal(cannotTell, got) || took < standInWait {
			t.Errorf("%s %s standing in, an hour behind: %d %+v after %v; want 503 %+v after %v", tt.method, tt.path, status, got, took, cannotTell, standInWait)
		}
	}
	req := httptest.NewRequest("DELETE", "/us/properties/77777", nil)
	req.Header.Set("X-Request-ID", "stand-in-3")
	req.Header.Set("If-Match", "*")
	rec := httptest.NewRecorder()
	eu.ServeHTTP(rec, req)
	if rec.Code != 503 || rec.Header().Get("Retry-After") != "1" {
		t.Errorf("DELETE of a listing unknown here, standing in: %d, Retry-After %q; want 503, 1", rec.Code, rec.Header().Get("Retry-After"))
	}
	// Caught up with the moment the request arrived: the refusal stands.
	setWatermark(time.Now().Add(time.Minute))
	if status, got, took := timed("PUT", "/us/properties/47", "stand-in-4", stale); status != 409 || !cmp.Equal(mismatch, got) || took >= standInWait {
		t.Errorf("PUT standing in, caught up: %d %+v after %v; want 409 %+v at once", status, got, took, mismatch)
	}
	// The other region's clock 0.9 s fast: its watermark is past the
	// moment the request arrived, but no heartbeat sent since has echoed
	// it. The region cannot tell, whatever the other's clock says.
	setMarks(time.Now().Add(900*time.Millisecond), time.Now().Add(-time.Hour))
	if status, got, _ := timed("PUT", "/us/properties/47", "stand-in-5", stale); status != 503 || !cmp.Equal(cannotTell, got) {
		t.Errorf("PUT standing in, the other clock fast and no echo: %d %+v; want 503 %+v", status, got, cannotTell)
	}
	// The other region's clock 0.9 s slow: its watermark is behind the
	// moment the request arrived, but a heartbeat sent since has echoed
	// it. The refusal stands, at once.
	setMarks(time.Now().Add(-900*time.Millisecond), time.Now().Add(time.Minute))
	if status, got, took := timed("PUT", "/us/properties/47", "stand-in-6", stale); status != 409 || !cmp.Equal(mismatch, got) || took >= standInWait {
		t.Errorf("PUT standing in, the other clock slow and echoed: %d %+v after %v; want 409 %+v at once", status, got, took, mismatch)
	}
	if row := readRow(t, db, id); !cmp.Equal(seedProperty(id), row.Property) || row.Outbox != 0 || row.Requests != 0 {
		t.Fatalf("the refusals changed the listing: %+v", row)
	}

	// The case it is for. The other region took two writes, the second the
	// first attempt of request "first-attempt" (version 2 to 3), and then
	// NGINX failed over the same request to this region, whose copy is at
	// version 1: a 409 here would say it did not happen. The writes arrive
	// while the stand-in waits, and the request is a 422 with the original.
	setWatermark(time.Now().Add(-time.Hour))
	body := `{"price": 470003, "version": 2}`
	var update updateRequest
	if err := json.Unmarshal([]byte(body), &update); err != nil {
		t.Fatal(err)
	}
	seed := seedProperty(id)
	second, third := seed, seed
	second.Version, second.Price, second.RegionOrigin, second.UpdatedAt = 2, 47000200, "us", time.Now().UTC().Truncate(time.Microsecond)
	third.Version, third.Price, third.RegionOrigin, third.UpdatedAt = 3, 47000300, "us", second.UpdatedAt.Add(time.Millisecond)
	arrive := make(chan error, 1)
	go func() {
		time.Sleep(standInWait / 4)
		tx, err := db.BeginTx(ctx, nil)
		if err == nil {
			_, _, err = applyEvents(ctx, tx, []event{
				{Property: second, RequestID: "stand-in-other"},
				{Property: third, RequestID: "first-attempt", fingerprint: requestFingerprint("PUT", "/properties/47", update)},
			}, time.Time{})
		}
		if err == nil {
			err = tx.Commit()
		}
		if err == nil {
			setWatermark(time.Now())
		}
		arrive <- err
	}()
	status, got, took := timed("PUT", "/us/properties/47", "first-attempt", body)
	if err := <-arrive; err != nil {
		t.Fatal(err)
	}
	want := response{Error: "duplicate request", RequestID: "first-attempt", OriginalResponse: &third}
	if status != 422 || !cmp.Equal(want, got) || took >= standInWait {
		t.Errorf("PUT standing in while its first attempt arrives: %d after %v (-want +got):\n%s", status, took, cmp.Diff(want, got))
	}
}

// TestCreateFingerprintIgnoresDefaults: a POST that omits the rooms and one
// that gives them as 0 create the same listing, so under one request id
// the second is the first's duplicate (422 with the original), not a
// request id reused for another body.
func TestCreateFingerprintIgnoresDefaults(t *testing.T) {
	srv := testServer(t, "us", testDB(t))
	requestID := newRequestID("create-defaults")
	status, _, first := call(t, srv, "POST", "/us/properties", requestID, `{"price": 1}`)
	if status != http.StatusCreated {
		t.Fatalf("POST = %d %+v", status, first)
	}
	status, _, again := call(t, srv, "POST", "/us/properties", requestID, `{"price": 1.00, "bedrooms": 0, "bathrooms": 0}`)
	if status != http.StatusUnprocessableEntity || again.OriginalResponse == nil || again.OriginalResponse.ID != first.ID {
		t.Errorf("the same listing asked for with the defaults written out = %d %+v, want 422 naming listing %d", status, again, first.ID)
	}
}

// TestRefusalNeverNamesTheStateSent: a write refused for a state that the
// read explaining the refusal finds current (a replicated write landed in
// between) is tried again, never answered with a 409 naming the version
// the client sent; a listing that changes under every try is a 503.
func TestRefusalNeverNamesTheStateSent(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	current, err := getProperty(ctx, db, 9)
	if err != nil {
		t.Fatal(err)
	}
	v := current.Version
	if err := explainNoWrite(ctx, db, newRequestID("arrived"), "f", 9, nil, &v); !errors.Is(err, errStateArrived) {
		t.Errorf("explaining a refused update of version %d at version %d = %v, want errStateArrived", v, v, err)
	}
	tag := []string{tagValue(current.Version, current.RegionOrigin)}
	if err := explainNoWrite(ctx, db, newRequestID("arrived"), "f", 9, tag, nil); !errors.Is(err, errStateArrived) {
		t.Errorf("explaining a refused delete of the current state = %v, want errStateArrived", err)
	}
	tries := 0
	p, err := writeUntilExplained(func() (Property, error) {
		if tries++; tries < writeAttempts {
			return Property{}, errStateArrived
		}
		return current, nil
	})
	if err != nil || p.ID != current.ID {
		t.Errorf("a write whose state arrived, then succeeded = %v, %v", p, err)
	}
	if _, err := writeUntilExplained(func() (Property, error) { return Property{}, errStateArrived }); !errors.Is(err, errKeptChanging) {
		t.Errorf("a write whose state kept arriving = %v, want errKeptChanging", err)
	}
}
