package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
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

// TestDeleteProperty runs every answer of DELETE against one listing, in
// order, and then what a tombstone does to GET, PUT and the list: the
// lifecycle's statuses (docs/semantics.md, §4), each checked for what it changed.
func TestDeleteProperty(t *testing.T) {
	db := testDB(t)
	servers := map[string]http.Handler{"us": testServer(t, "us", db), "eu": testServer(t, "eu", db)}
	const id = 80
	path := "/us/properties/80"
	send := func(region, method, path string, header map[string]string, body string) *httptest.ResponseRecorder {
		t.Helper()
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		for k, v := range header {
			req.Header.Set(k, v)
		}
		rec := httptest.NewRecorder()
		servers[region].ServeHTTP(rec, req)
		return rec
	}
	decode := func(rec *httptest.ResponseRecorder) response {
		t.Helper()
		var got response
		if err := strictUnmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("body %q: %v", rec.Body.String(), err)
		}
		return got
	}

	// Refused before anything is read or written: the listing stays as it is.
	seed := seedProperty(id)
	for _, tt := range []struct {
		name       string
		path       string
		header     map[string]string
		body       string
		wantStatus int
		want       response
		wantETag   string
	}{
		{"if_match_missing", path, map[string]string{"X-Request-ID": "del-1"}, "", 428,
			response{Error: `If-Match is required: send the ETag of the state to delete, such as "4-us"`}, ""},
		{"request_id_missing", path, map[string]string{"If-Match": `"1-us"`}, "", 400,
			response{Error: "X-Request-ID header is required"}, ""},
		{"if_match_malformed", path, map[string]string{"X-Request-ID": "del-2", "If-Match": "1-us"}, "", 400,
			response{Error: `If-Match must be * or a list of entity tags such as "4-us"`}, ""},
		{"body", path, map[string]string{"X-Request-ID": "del-3", "If-Match": `"1-us"`}, `{"version": 1}`, 400,
			response{Error: "DELETE takes no body"}, ""},
		{"id_malformed", "/us/properties/08", map[string]string{"X-Request-ID": "del-4", "If-Match": `"1-us"`}, "", 400,
			response{Error: "id must be a positive 64-bit integer"}, ""},
		{"unknown", "/us/properties/77777", map[string]string{"X-Request-ID": "del-5", "If-Match": `"1-us"`}, "", 404,
			response{Error: "property not found"}, ""},
		// The same version written by the other region is another state.
		{"if_match_other_state", path, map[string]string{"X-Request-ID": "del-6", "If-Match": `"1-eu"`}, "", 412,
			response{Error: "version mismatch", CurrentVersion: 1}, `"1-us"`},
		{"if_match_weak", path, map[string]string{"X-Request-ID": "del-7", "If-Match": `W/"1-us"`}, "", 412,
			response{Error: "version mismatch", CurrentVersion: 1}, `"1-us"`},
	} {
		rec := send("us", "DELETE", tt.path, tt.header, tt.body)
		if diff := cmp.Diff(tt.want, decode(rec)); rec.Code != tt.wantStatus || rec.Header().Get("ETag") != tt.wantETag || diff != "" {
			t.Errorf("DELETE %s: %d, ETag %q; want %d, %q (-want +got):\n%s", tt.name, rec.Code, rec.Header().Get("ETag"), tt.wantStatus, tt.wantETag, diff)
		}
		if row := readRow(t, db, id); !cmp.Equal(seed, row.Property) || row.Outbox != 0 || row.Requests != 0 {
			t.Fatalf("DELETE %s changed the listing: %+v", tt.name, row)
		}
	}

	// The delete: a tombstone with the next version, recorded and queued.
	header := map[string]string{"X-Request-ID": "del-ok", "If-Match": `"7-eu", "1-us"`}
	rec := send("us", "DELETE", path, header, "")
	var body map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatal(err)
	}
	if keys := slices.Sorted(maps.Keys(body)); rec.Code != 200 || !slices.Equal(keys, []string{"deleted", "id", "region_origin", "updated_at", "version"}) {
		t.Fatalf("DELETE = %d %s; want 200 and the tombstone's five fields", rec.Code, rec.Body.String())
	}
	stone := decode(rec).Property
	want := Property{ID: id, Deleted: true, Version: 2, RegionOrigin: "us", UpdatedAt: stone.UpdatedAt}
	if diff := cmp.Diff(want, stone); diff != "" || rec.Header().Get("ETag") != `"2-us"` {
		t.Errorf("DELETE: ETag %q, tombstone mismatch (-want +got):\n%s", rec.Header().Get("ETag"), diff)
	}
	stored := seed
	stored.Deleted, stored.Version, stored.UpdatedAt = true, 2, stone.UpdatedAt
	if row := readRow(t, db, id); !cmp.Equal(stored, row.Property) || row.Outbox != 1 || row.Requests != 1 {
		t.Errorf("after DELETE: %+v; want the last values kept as a tombstone, one event, one request id", row)
	}

	// After it: a retry is a 422 with the tombstone; anything else is a 410.
	gone := response{Error: "property deleted", CurrentVersion: 2}
	for _, tt := range []struct {
		name         string
		region       string
		method, path string
		header       map[string]string
		body         string
		wantStatus   int
		want         response
	}{
		{"delete_retried", "eu", "DELETE", "/eu/properties/80", header, "", 422,
			response{Error: "duplicate request", RequestID: "del-ok", OriginalResponse: &want}},
		{"delete_id_reused", "us", "DELETE", "/us/properties/81", header, "", 422,
			response{Error: "request id reused for a different request", RequestID: "del-ok"}},
		{"delete_again", "us", "DELETE", path, map[string]string{"X-Request-ID": "del-8", "If-Match": `"2-us"`}, "", 410, gone},
		{"delete_again_any", "eu", "DELETE", "/eu/properties/80", map[string]string{"X-Request-ID": "del-9", "If-Match": `*`}, "", 410, gone},
		{"get", "us", "GET", path, nil, "", 410, gone},
		{"get_if_none_match", "us", "GET", path, map[string]string{"If-None-Match": `"2-us"`}, "", 410, gone},
		// 410 comes before the version (409) and If-Match (412) checks.
		{"put_current_version", "us", "PUT", path, map[string]string{"X-Request-ID": "del-10"}, `{"price": 1, "version": 2}`, 410, gone},
		{"put_stale_version", "eu", "PUT", "/eu/properties/80", map[string]string{"X-Request-ID": "del-11"}, `{"price": 1, "version": 1}`, 410, gone},
		{"put_if_match", "us", "PUT", path, map[string]string{"X-Request-ID": "del-12", "If-Match": `"1-us"`}, `{"price": 1, "version": 1}`, 410, gone},
	} {
		rec := send(tt.region, tt.method, tt.path, tt.header, tt.body)
		if diff := cmp.Diff(tt.want, decode(rec)); rec.Code != tt.wantStatus || diff != "" {
			t.Errorf("%s: %d, want %d (-want +got):\n%s", tt.name, rec.Code, tt.wantStatus, diff)
		}
		if row := readRow(t, db, id); !cmp.Equal(stored, row.Property) || row.Outbox != 1 || row.Requests != 1 {
			t.Errorf("%s changed the tombstone: %+v", tt.name, row)
		}
	}
	if rec := send("us", "GET", "/us/properties?min_price=1&limit=200", nil, ""); strings.Contains(rec.Body.String(), `"id":80,`) ||
		!strings.Contains(rec.Body.String(), `"id":79,`) {
		t.Errorf("the list's first page shows the deleted listing, or not the live one before it: %s", rec.Body.String())
	}

	// If-Match: * deletes whatever state is current; another region's
	// delete is written by that region.
	rec = send("eu", "DELETE", "/us/properties/81", map[string]string{"X-Request-ID": "del-13", "If-Match": "*"}, "")
	if got := decode(rec); rec.Code != 200 || !got.Deleted || got.Version != 2 || got.RegionOrigin != "eu" || rec.Header().Get("ETag") != `"2-eu"` {
		t.Errorf("DELETE with If-Match * served by eu = %d %+v, ETag %q; want 200, the tombstone 2-eu", rec.Code, got, rec.Header().Get("ETag"))
	}
}
