package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// write is a Property that differs from others only where the conflict rule
// looks, plus a price to tell writes apart.
func write(version int64, at time.Duration, region string, price Money) Property {
	return Property{ID: 1, Price: price, RegionOrigin: region, Version: version, UpdatedAt: t0.Add(at)}
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name     string
		local    *Property
		incoming Property
		want     outcome
	}{
		{"no_local_row", nil, write(1, 0, "us", 1), applied},
		{"next_version", ptr(write(1, 0, "us", 1)), write(2, time.Second, "eu", 2), applied},
		{"skipped_versions", ptr(write(1, 0, "us", 1)), write(5, time.Second, "eu", 2), applied},
		{"higher_version_older_clock", ptr(write(1, time.Hour, "us", 1)), write(2, 0, "eu", 2), applied},
		{"same_write_again", ptr(write(3, 0, "eu", 7)), write(3, 0, "eu", 7), duplicate},
		{"older_version", ptr(write(3, 0, "us", 1)), write(2, time.Hour, "eu", 2), stale},
		{"same_version_later_clock_wins", ptr(write(2, 0, "us", 1)), write(2, time.Microsecond, "eu", 2), conflictWon},
		{"same_version_earlier_clock_loses", ptr(write(2, time.Microsecond, "us", 1)), write(2, 0, "eu", 2), conflictLost},
		{"same_version_same_clock_us_beats_eu", ptr(write(2, 0, "eu", 1)), write(2, 0, "us", 2), conflictWon},
		{"same_version_same_clock_eu_loses_to_us", ptr(write(2, 0, "us", 1)), write(2, 0, "eu", 2), conflictLost},
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
			writes = append(writes, write(version, time.Duration(rng.IntN(3))*time.Microsecond, region, Money(i+1)))
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
	got, err := applyEvents(ctx, tx, batch, time.Time{})
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
		got, err := applyEvents(ctx, tx, []event{step.event}, time.Time{})
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
