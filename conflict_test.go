package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// aWrite is a Property that differs from others only where the conflict rule
// looks, plus a price to tell writes apart.
func aWrite(version int64, at time.Duration, region string, price Money) Property {
	return Property{ID: 1, Price: price, RegionOrigin: region, Version: version, UpdatedAt: t0.Add(at)}
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name     string
		local    *Property
		incoming Property
		want     outcome
	}{
		{"no_local_row", nil, aWrite(1, 0, "us", 1), applied},
		{"next_version", ptr(aWrite(1, 0, "us", 1)), aWrite(2, time.Second, "eu", 2), applied},
		{"skipped_versions", ptr(aWrite(1, 0, "us", 1)), aWrite(5, time.Second, "eu", 2), applied},
		{"higher_version_older_clock", ptr(aWrite(1, time.Hour, "us", 1)), aWrite(2, 0, "eu", 2), applied},
		{"same_write_again", ptr(aWrite(3, 0, "eu", 7)), aWrite(3, 0, "eu", 7), duplicate},
		{"older_version", ptr(aWrite(3, 0, "us", 1)), aWrite(2, time.Hour, "eu", 2), stale},
		{"same_version_later_clock_wins", ptr(aWrite(2, 0, "us", 1)), aWrite(2, time.Microsecond, "eu", 2), conflictWon},
		{"same_version_earlier_clock_loses", ptr(aWrite(2, time.Microsecond, "us", 1)), aWrite(2, 0, "eu", 2), conflictLost},
		{"same_version_same_clock_us_beats_eu", ptr(aWrite(2, 0, "eu", 1)), aWrite(2, 0, "us", 2), conflictWon},
		{"same_version_same_clock_eu_loses_to_us", ptr(aWrite(2, 0, "us", 1)), aWrite(2, 0, "eu", 2), conflictLost},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := resolve(tt.local, tt.incoming); got != tt.want {
				t.Errorf("resolve(%+v, %+v) = %d, want %d", tt.local, tt.incoming, got, tt.want)
			}
		})
	}
}

// TestResolveConverges is the property the conflict rule exists for: every
// order of applying the same writes ends in the same row, the greatest one.
func TestResolveConverges(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 500 {
		// A region writes each version of a row at most once (the version
		// check admits one writer per version, and a row's version never goes
		// back), so (version, region_origin) names a write; draw such writes.
		type key struct {
			version int64
			region  string
		}
		seen := map[key]bool{}
		var writes []Property
		for i := range 2 + rng.IntN(6) {
			region := "us"
			if rng.IntN(2) == 0 {
				region = "eu"
			}
			version := int64(1 + rng.IntN(3))
			if seen[key{version, region}] {
				continue
			}
			seen[key{version, region}] = true
			// Few distinct clock values, so that ties on version and clock
			// are common.
			writes = append(writes, aWrite(version, time.Duration(rng.IntN(3))*time.Microsecond, region, Money(i+1)))
		}
		n := len(writes)
		var want *Property
		for _, order := range [][]int{rng.Perm(n), rng.Perm(n), rng.Perm(n), rng.Perm(n)} {
			var row *Property
			for _, i := range order {
				if resolve(row, writes[i]).replaces() {
					row = ptr(writes[i])
				}
			}
			if want == nil {
				want = row
				continue
			}
			if diff := cmp.Diff(*want, *row); diff != "" {
				// Two writes equal under the rule but with different content
				// would be a real divergence; the rule must never allow it.
				t.Fatalf("trial %d: writes %+v applied in order %v end differently (-first +this):\n%s", trial, writes, order, diff)
			}
		}
		for _, w := range writes {
			if compareWrites(w, *want) > 0 {
				t.Fatalf("trial %d: final row %+v is not the greatest write: %+v is greater", trial, *want, w)
			}
		}
	}
}

// TestApplyEventsBatch applies one batch holding several writes of the same
// rows, in an order that makes the rule work within the batch.
func TestApplyEventsBatch(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	at := func(d time.Duration) time.Time { return time.Date(2026, 2, 2, 0, 0, 0, 0, time.UTC).Add(d) }
	ev := func(id, version int64, t time.Time, region string, requestID string) event {
		return event{Property: Property{ID: id, Price: Money(version * 100), RegionOrigin: region, Version: version, UpdatedAt: t}, RequestID: requestID}
	}
	batch := []event{
		ev(42, 3, at(0), "eu", "batch-1"),
		ev(41, 2, at(time.Second), "eu", "batch-2"),
		ev(41, 2, at(0), "us", "batch-3"), // same version, earlier: loses to batch-2
		ev(41, 3, at(2*time.Second), "us", "batch-4"),
		ev(42, 2, at(time.Hour), "us", "batch-5"),     // older version than batch-1
		ev(41, 3, at(2*time.Second), "us", "batch-4"), // the same event twice
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := applyEvents(ctx, tx, batch, time.Time{})
	if err != nil {
		tx.Rollback()
		t.Fatalf("applyEvents: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]outcome{applied, applied, conflictLost, applied, stale, duplicate}, got); diff != "" {
		t.Errorf("applyEvents outcomes (-want +got):\n%s", diff)
	}
	for _, want := range []Property{batch[3].Property, batch[0].Property} {
		row := readRow(t, db, want.ID)
		// Bedrooms and bathrooms are null in the events: a replicated row is
		// the whole row, nulls included.
		if diff := cmp.Diff(want, row.Property); diff != "" {
			t.Errorf("property %d after the batch (-want +got):\n%s", want.ID, diff)
		}
		if row.Outbox != 0 {
			t.Errorf("property %d: %d outbox rows, want 0", want.ID, row.Outbox)
		}
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM processed_requests WHERE request_id LIKE 'batch-%'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 5 {
		t.Errorf("request ids recorded from the batch = %d, want 5 (each once, losers included)", n)
	}
}

// TestApplyEvent applies remote writes to a real database: the row follows
// the conflict rule, the request id is recorded whoever wins, and no outbox
// row is written (a replicated write is not replicated back).
func TestApplyEvent(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	const id = 40
	seed := seedProperty(id)
	at := func(d time.Duration) time.Time { return time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC).Add(d) }
	// ev is the event of a PUT of price from version-1 made in region,
	// with the fingerprint that PUT's request had there.
	ev := func(version int64, t time.Time, region string, price Money, requestID string) event {
		return event{
			Property:    Property{ID: id, Price: price, Bedrooms: ptr(int32(3)), Bathrooms: ptr(int32(2)), RegionOrigin: region, Version: version, UpdatedAt: t},
			RequestID:   requestID,
			fingerprint: requestFingerprint("PUT", fmt.Sprintf("/properties/%d", id), updateRequest{Price: &price, Version: ptr(wholeInt64(version - 1))}),
		}
	}
	steps := []struct {
		name         string
		event        event
		want         outcome
		wantRow      Property
		wantRequests int // request ids recorded for the property so far
	}{
		{"next_version", ev(2, at(0), "eu", 100_00, "apply-1"), applied, ev(2, at(0), "eu", 100_00, "").Property, 1},
		{"redelivery", ev(2, at(0), "eu", 100_00, "apply-1"), duplicate, ev(2, at(0), "eu", 100_00, "").Property, 1},
		{"concurrent_later_wins", ev(2, at(time.Second), "us", 200_00, "apply-2"), conflictWon, ev(2, at(time.Second), "us", 200_00, "").Property, 2},
		{"concurrent_earlier_loses", ev(2, at(time.Millisecond), "eu", 300_00, "apply-3"), conflictLost, ev(2, at(time.Second), "us", 200_00, "").Property, 3},
		{"newer", ev(4, at(2*time.Second), "eu", 400_00, "apply-4"), applied, ev(4, at(2*time.Second), "eu", 400_00, "").Property, 4},
		{"stale", ev(3, at(3*time.Second), "us", 500_00, "apply-5"), stale, ev(4, at(2*time.Second), "eu", 400_00, "").Property, 5},
	}
	before := readRow(t, db, id)
	if diff := cmp.Diff(seed, before.Property); diff != "" {
		t.Fatalf("property %d before the test (-seed +got):\n%s", id, diff)
	}
	for _, step := range steps {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := applyEvents(ctx, tx, []event{step.event}, time.Time{})
		if err != nil {
			tx.Rollback()
			t.Fatalf("%s: applyEvents(%+v): %v", step.name, step.event, err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]outcome{step.want}, got); diff != "" {
			t.Errorf("%s: applyEvents(%+v) outcomes (-want +got):\n%s", step.name, step.event, diff)
		}
		row := readRow(t, db, id)
		if diff := cmp.Diff(step.wantRow, row.Property); diff != "" {
			t.Errorf("%s: row after applyEvent (-want +got):\n%s", step.name, diff)
		}
		if row.Outbox != 0 || row.Requests != step.wantRequests {
			t.Errorf("%s: outbox rows %d, request ids %d; want 0 and %d", step.name, row.Outbox, row.Requests, step.wantRequests)
		}
	}

	// A request id consumed in the other region is a 422 here, even though
	// its write lost the conflict: with the original response for a retry of
	// the same request, without it for another request under that id.
	srv := testServer(t, "us", db)
	path := fmt.Sprintf("/us/properties/%d", id)
	status, _, got := call(t, srv, "PUT", path, "apply-3", `{"price": 300, "version": 1}`)
	if status != http.StatusUnprocessableEntity || got.Error != "duplicate request" || got.OriginalResponse == nil || got.OriginalResponse.Price != 300_00 {
		t.Errorf("PUT %s retrying replicated request apply-3 = %d %+v, want 422 with the original response (price 300)", path, status, got)
	}
	status, _, got = call(t, srv, "PUT", path, "apply-3", `{"price": 1, "version": 4}`)
	if diff := cmp.Diff(response{Error: "request id reused for a different request", RequestID: "apply-3"}, got); status != http.StatusUnprocessableEntity || diff != "" {
		t.Errorf("PUT %s with replicated request id apply-3 and another body = %d, want 422 (-want +got):\n%s", path, status, diff)
	}
}

// TestLostWriteIsRecorded: an acknowledged write replaced by a write not
// built on it is recorded, naming its request, whichever way the loss shows.
// In EU: EU writes A (1 to 2) and C (2 to 3, on A); US's B (1 to 2),
// acknowledged there, arrives after C. It is merely old by the rule (C has
// the higher version), yet nothing built on it survives: lost. In US: B is
// the local row when A arrives, and A, the greater of the two, replaces it
// without being built on it: lost again, seen from the other side; C then
// follows A and loses nothing. Before the events said what a write was built
// on, only the equal versions of the second case were even counted, and B
// vanished from EU without a trace.
func TestLostWriteIsRecorded(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	us, eu := testServer(t, "us", db), testServer(t, "eu", db)
	apply := func(e event) ([]outcome, []lostWrite) {
		t.Helper()
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		outcomes, lost, err := applyEvents(ctx, tx, []event{e}, time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		return outcomes, lost
	}
	put := func(h http.Handler, region string, id, version int64, requestID string) Property {
		t.Helper()
		status, _, got := call(t, h, "PUT", fmt.Sprintf("/%s/properties/%d", region, id), requestID, fmt.Sprintf(`{"price": %d, "version": %d}`, 1000+version, version))
		if status != http.StatusOK {
			t.Fatalf("PUT %s %d: %d %+v", region, id, status, got)
		}
		return got.Property
	}
	// otherRegion is the event of a write the other region made of id.
	otherRegion := func(p Property, requestID, parent string) event {
		return event{Property: p, RequestID: requestID, Parent: parent, fingerprint: strings.Repeat("0", 64)}
	}

	// EU's side, on listing 461.
	put(eu, "eu", 461, 1, "lost-a")
	c := put(eu, "eu", 461, 2, "lost-c")
	b := seedProperty(461)
	b.Version, b.RegionOrigin, b.UpdatedAt, b.Price = 2, "us", c.UpdatedAt.Add(time.Second), 777_00
	outcomes, lost := apply(otherRegion(b, "lost-b", "1-us"))
	if outcomes[0] != stale || len(lost) != 1 || lost[0].lost.requestID != "lost-b" || lost[0].won.requestID != "lost-c" {
		t.Fatalf("B arriving in EU after C: %v, lost %+v; want stale, B lost to C", outcomes, lost)
	}
	if _, again := apply(otherRegion(b, "lost-b", "1-us")); len(again) != 0 {
		t.Errorf("B delivered again: lost %+v, want nothing new", again)
	}

	// US's side, on listing 462.
	bUS := put(us, "us", 462, 1, "lost-b-us")
	a := seedProperty(462)
	a.Version, a.RegionOrigin, a.UpdatedAt, a.Price = 2, "eu", bUS.UpdatedAt.Add(time.Second), 888_00
	outcomes, lost = apply(otherRegion(a, "lost-a-us", "1-us"))
	if outcomes[0] != conflictWon || len(lost) != 1 || lost[0].lost.requestID != "lost-b-us" {
		t.Fatalf("A arriving in US over B: %v, lost %+v; want conflict won, B lost", outcomes, lost)
	}
	cUS := a
	cUS.Version, cUS.UpdatedAt = 3, a.UpdatedAt.Add(time.Second)
	if outcomes, lost = apply(otherRegion(cUS, "lost-c-us", "2-eu")); outcomes[0] != applied || len(lost) != 0 {
		t.Errorf("C arriving in US on A: %v, lost %+v; want applied, nothing lost", outcomes, lost)
	}

	// Both served, newest first, a page at a time.
	var page ConflictPage
	status := getJSON(t, eu, "/eu/conflicts?limit=1", &page)
	if status != http.StatusOK || len(page.Items) != 1 || page.NextCursor == nil {
		t.Fatalf("GET /eu/conflicts?limit=1: %d %+v, want one record and a cursor", status, page)
	}
	newest := page.Items[0]
	if newest.PropertyID != 462 || *newest.Lost.RequestID != "lost-b-us" || *newest.Won.RequestID != "lost-a-us" || newest.FoundIn != "us" ||
		newest.Lost.Version != 2 || newest.Lost.RegionOrigin != "us" || *newest.Lost.Parent != "1-us" {
		t.Errorf("the newest record: %+v, want B lost to A on 462, found in us", newest)
	}
	status = getJSON(t, eu, "/eu/conflicts?limit=1&cursor="+*page.NextCursor, &page)
	if status != http.StatusOK || len(page.Items) != 1 {
		t.Fatalf("the second page: %d %+v", status, page)
	}
	if r := page.Items[0]; r.PropertyID != 461 || *r.Lost.RequestID != "lost-b" || *r.Won.RequestID != "lost-c" || r.FoundIn != "eu" || r.Won.Version != 3 {
		t.Errorf("the older record: %+v, want B lost to C on 461, found in eu", r)
	}
	for _, bad := range []string{"?limit=0", "?limit=201", "?cursor=nope", "?region_origin=us", "?limit=1&limit=2"} {
		if status := getJSON(t, eu, "/eu/conflicts"+bad, &struct{}{}); status != http.StatusBadRequest {
			t.Errorf("GET /eu/conflicts%s: %d, want 400", bad, status)
		}
	}
}

// getJSON GETs path from h and decodes the answer's body into v.
func getJSON(t *testing.T, h http.Handler, path string, v any) int {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	if err := json.Unmarshal(rec.Body.Bytes(), v); err != nil {
		t.Fatalf("GET %s: %d, body %q: %v", path, rec.Code, rec.Body.String(), err)
	}
	return rec.Code
}
