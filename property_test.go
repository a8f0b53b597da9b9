package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
)

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

// TestCreateProperty adds listings in both regions: ids from the region's
// own half of the numbers, version 1, 201 with Location and ETag; a repeated
// POST is a 422 and creates nothing; bad input creates nothing.
func TestCreateProperty(t *testing.T) {
	db := testDB(t)
	servers := map[string]http.Handler{"us": testServer(t, "us", db), "eu": testServer(t, "eu", db)}
	count := func() (n int) {
		t.Helper()
		if err := db.QueryRow(`SELECT count(*) FROM properties`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	post := func(region, prefix, requestID, body string) (*httptest.ResponseRecorder, response) {
		t.Helper()
		req := httptest.NewRequest("POST", "/"+prefix+"/properties", strings.NewReader(body))
		if requestID != "" {
			req.Header.Set("X-Request-ID", requestID)
		}
		rec := httptest.NewRecorder()
		servers[region].ServeHTTP(rec, req)
		var got response
		if err := strictUnmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("POST /%s/properties: body %q: %v", prefix, rec.Body.String(), err)
		}
		return rec, got
	}

	created := map[string]response{}
	for _, tt := range []struct{ region, prefix string }{{"us", "us"}, {"eu", "us"}} {
		requestID := newRequestID("create-" + tt.region)
		before := count()
		rec, got := post(tt.region, tt.prefix, requestID, `{"price": 250000.5, "bedrooms": 2}`)
		parity := map[string]int64{"us": 1, "eu": 0}[tt.region]
		if rec.Code != http.StatusCreated || got.ID < 1001 || got.ID%2 != parity {
			t.Fatalf("POST in %s = %d, id %d; want 201 and an id from 1001 up of the region's parity", tt.region, rec.Code, got.ID)
		}
		want := Property{ID: got.ID, Price: 25_000_050, Bedrooms: ptr(int32(2)), Bathrooms: ptr(int32(0)), RegionOrigin: tt.region, Version: 1, UpdatedAt: got.UpdatedAt}
		if diff := cmp.Diff(want, got.Property); diff != "" {
			t.Errorf("POST in %s: body mismatch (-want +got):\n%s", tt.region, diff)
		}
		if loc := fmt.Sprintf("/%s/properties/%d", tt.prefix, got.ID); rec.Header().Get("Location") != loc || rec.Header().Get("ETag") != etag(want) {
			t.Errorf("POST in %s: Location %q, ETag %q; want %q, %q", tt.region, rec.Header().Get("Location"), rec.Header().Get("ETag"), loc, etag(want))
		}
		if row := readRow(t, db, got.ID); !cmp.Equal(want, row.Property) || row.Outbox != 1 || row.Requests != 1 || count() != before+1 {
			t.Errorf("after POST in %s: row %+v, outbox %d, request ids %d; want the answer, 1, 1 and one more listing", tt.region, row.Property, row.Outbox, row.Requests)
		}
		// The same request again creates nothing.
		rec, again := post(tt.region, tt.prefix, requestID, `{"bedrooms": 2, "price": 250000.50}`)
		if diff := cmp.Diff(response{Error: "duplicate request", RequestID: requestID, OriginalResponse: &want}, again); rec.Code != 422 || diff != "" {
			t.Errorf("POST in %s repeated = %d, want 422 with the original (-want +got):\n%s", tt.region, rec.Code, diff)
		}
		rec, reused := post(tt.region, tt.prefix, requestID, `{"price": 1}`)
		if diff := cmp.Diff(response{Error: "request id reused for a different request", RequestID: requestID}, reused); rec.Code != 422 || diff != "" {
			t.Errorf("POST in %s with the id and another body = %d, want 422 (-want +got):\n%s", tt.region, rec.Code, diff)
		}
		if count() != before+1 {
			t.Errorf("a repeated POST in %s created a listing", tt.region)
		}
		created[tt.region] = got
	}

	before := count()
	for _, tt := range []struct {
		name, requestID, body string
		want                  response
	}{
		{"price_missing", "create-bad-1", `{"bedrooms": 2}`, response{Error: "price is required"}},
		{"rooms_negative", "create-bad-2", `{"price": 5, "bathrooms": -1}`, response{Error: "bathrooms must be between 0 and 100"}},
		{"unknown_field", "create-bad-3", `{"price": 5, "id": 7}`, response{Error: `unknown field "id"`}},
		{"request_id_missing", "", `{"price": 5}`, response{Error: "X-Request-ID header is required"}},
	} {
		rec, got := post("us", "us", tt.requestID, tt.body)
		if diff := cmp.Diff(tt.want, got); rec.Code != http.StatusBadRequest || diff != "" {
			t.Errorf("POST %s: %d, want 400 (-want +got):\n%s", tt.name, rec.Code, diff)
		}
	}
	if count() != before {
		t.Errorf("bad POSTs created %d listings", count()-before)
	}
}
