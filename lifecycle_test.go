//go:build integration

package main

// The listing lifecycle against the running stack: a listing created in one
// region, changed in the other, deleted, and what the tombstone does
// everywhere; a delete racing an update of the same state in the two
// regions, in every order; and old events arriving after a delete.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestLifecycleThroughNGINX walks one listing from POST to DELETE through
// NGINX, in both regions, with every status of the lifecycle (docs/semantics.md, §4) on
// the way.
func TestLifecycleThroughNGINX(t *testing.T) {
	s := newStack(t)
	write := func(method, path string, header http.Header, body string) (int, http.Header, response) {
		t.Helper()
		status, h, got, err := s.doWith(method, path, header, body)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		return status, h, got
	}
	ids := func(requestID, ifMatch string) http.Header {
		h := http.Header{"X-Request-Id": {requestID}}
		if ifMatch != "" {
			h.Set("If-Match", ifMatch)
		}
		return h
	}

	createID := newRequestID("life-create")
	createBody := `{"price": 310000, "bedrooms": 3, "bathrooms": 2}`
	status, h, created := write("POST", "/us/properties", ids(createID, ""), createBody)
	if status != http.StatusCreated || h.Get("Location") != fmt.Sprintf("/us/properties/%d", created.ID) || h.Get("ETag") != `"1-us"` {
		t.Fatalf("POST /us/properties = %d, Location %q, ETag %q (%+v); want 201 at its id, \"1-us\"", status, h.Get("Location"), h.Get("ETag"), created)
	}
	eu := fmt.Sprintf("/eu/properties/%d", created.ID)
	us := fmt.Sprintf("/us/properties/%d", created.ID)
	s.waitReplicated(t, "eu", created.Property, 15*time.Second)

	// Once replicated, the create is known in the other region: a retry there
	// is a 422 with the original, and its tag names the state there too.
	status, _, dup := write("POST", "/eu/properties", ids(createID, ""), createBody)
	if diff := cmp.Diff(response{Error: "duplicate request", RequestID: createID, OriginalResponse: &created.Property}, dup); status != http.StatusUnprocessableEntity || diff != "" {
		t.Errorf("POST retried in eu = %d, want 422 with the original (-want +got):\n%s", status, diff)
	}
	if status, h, err := s.notModified(eu, `"1-us"`); err != nil || status != http.StatusNotModified {
		t.Errorf("GET %s with If-None-Match \"1-us\" = %d (%v, ETag %q), want 304", eu, status, err, h.Get("ETag"))
	}

	status, h, updated := write("PUT", eu, ids(newRequestID("life-update"), `"1-us"`), `{"price": 320000, "version": 1}`)
	if status != http.StatusOK || h.Get("ETag") != `"2-eu"` {
		t.Fatalf("PUT %s = %d, ETag %q (%+v); want 200, \"2-eu\"", eu, status, h.Get("ETag"), updated)
	}
	s.waitReplicated(t, "us", updated.Property, 15*time.Second)

	for _, tt := range []struct {
		name       string
		header     http.Header
		wantStatus int
		wantETag   string
	}{
		{"if_match_missing", ids(newRequestID("life-delete"), ""), http.StatusPreconditionRequired, ""},
		{"if_match_stale", ids(newRequestID("life-delete"), `"1-us"`), http.StatusPreconditionFailed, `"2-eu"`},
	} {
		status, h, got := write("DELETE", us, tt.header, "")
		if status != tt.wantStatus || h.Get("ETag") != tt.wantETag {
			t.Errorf("DELETE %s %s = %d, ETag %q (%+v); want %d, %q", us, tt.name, status, h.Get("ETag"), got, tt.wantStatus, tt.wantETag)
		}
	}
	deleteID := newRequestID("life-delete")
	status, h, stone := write("DELETE", us, ids(deleteID, `"2-eu"`), "")
	want := Property{ID: created.ID, Version: 3, RegionOrigin: "us", UpdatedAt: stone.UpdatedAt, Deleted: true}
	if diff := cmp.Diff(response{Property: want}, stone); status != http.StatusOK || h.Get("ETag") != `"3-us"` || diff != "" {
		t.Fatalf("DELETE %s = %d, ETag %q; want 200, \"3-us\" and the tombstone (-want +got):\n%s", us, status, h.Get("ETag"), diff)
	}

	// Both regions know the delete once it has replicated.
	gone := response{Error: "property deleted", CurrentVersion: 3}
	waitFor(t, 15*time.Second, "eu to answer 410 for the deleted listing", func() bool {
		status, _, _, err := s.do("GET", eu, "", "")
		return err == nil && status == http.StatusGone
	})
	for _, tt := range []struct {
		name, method, path string
		header             http.Header
		body               string
		wantStatus         int
		want               response
	}{
		{"get_us", "GET", us, http.Header{}, "", http.StatusGone, gone},
		{"get_eu", "GET", eu, http.Header{}, "", http.StatusGone, gone},
		{"put_eu", "PUT", eu, ids(newRequestID("life-late"), ""), `{"price": 1, "version": 3}`, http.StatusGone, gone},
		{"delete_again_eu", "DELETE", eu, ids(newRequestID("life-late"), `"3-us"`), "", http.StatusGone, gone},
		{"delete_retried_eu", "DELETE", eu, ids(deleteID, `"2-eu"`), "", http.StatusUnprocessableEntity,
			response{Error: "duplicate request", RequestID: deleteID, OriginalResponse: &want}},
		{"unknown", "DELETE", "/eu/properties/99999999", ids(newRequestID("life-late"), `"1-us"`), "", http.StatusNotFound,
			response{Error: "property not found"}},
	} {
		status, _, got := write(tt.method, tt.path, tt.header, tt.body)
		if diff := cmp.Diff(tt.want, got); status != tt.wantStatus || diff != "" {
			t.Errorf("%s: %d, want %d (-want +got):\n%s", tt.name, status, tt.wantStatus, diff)
		}
	}
	for _, region := range []string{"us", "eu"} {
		cursor := encodeCursor(created.ID - 1)
		resp, err := s.client.Get(fmt.Sprintf("%s/%s/properties?limit=1&cursor=%s", s.url, region, cursor))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var page Page
		err = decodeJSON(resp, &page)
		if err != nil || resp.StatusCode != http.StatusOK || len(page.Items) > 0 && page.Items[0].ID == created.ID {
			t.Errorf("the list in %s from id %d = %d %+v %v; want 200 without the deleted listing", region, created.ID, resp.StatusCode, page, err)
		}
	}
}

// notModified sends a GET with If-None-Match through NGINX and returns the
// status and headers: a 304 has no body to decode.
func (s *stack) notModified(path, tag string) (int, http.Header, error) {
	req, err := http.NewRequest("GET", s.url+path, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("If-None-Match", tag)
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode == http.StatusNotModified && len(body) > 0 {
		err = fmt.Errorf("a 304 with a body: %q", body)
	}
	return resp.StatusCode, resp.Header, err
}

// TestDeleteRacesUpdate deletes a listing in one region and updates the same
// state of it in the other, while the regions cannot hear of each other
// (Kafka is stopped), in every order: the delete first or the update first,
// US first or EU first, both at once, and a delete in both. Once they have
// exchanged their events, both regions hold the same outcome: the greater of
// the two writes under the conflict rule, which at one version is the later
// one. The delete wins when it came last, the update when it did.
func TestDeleteRacesUpdate(t *testing.T) {
	s := newStack(t)
	usDB, euDB := stackDB(t, "us"), stackDB(t, "eu")
	type step struct{ region, method string }
	races := []struct {
		name     string
		steps    []step
		parallel bool
	}{
		{"delete_us_then_update_eu", []step{{"us", "DELETE"}, {"eu", "PUT"}}, false},
		{"update_eu_then_delete_us", []step{{"eu", "PUT"}, {"us", "DELETE"}}, false},
		{"delete_eu_then_update_us", []step{{"eu", "DELETE"}, {"us", "PUT"}}, false},
		{"update_us_then_delete_eu", []step{{"us", "PUT"}, {"eu", "DELETE"}}, false},
		{"at_once_delete_us_update_eu", []step{{"us", "DELETE"}, {"eu", "PUT"}}, true},
		{"at_once_delete_eu_update_us", []step{{"eu", "DELETE"}, {"us", "PUT"}}, true},
		{"delete_in_both", []step{{"us", "DELETE"}, {"eu", "DELETE"}}, false},
	}

	// A fresh listing per race, known to both regions.
	start := make([]Property, len(races))
	for i := range races {
		status, _, got := s.mustDo(t, "POST", "/us/properties", newRequestID("race-create"), fmt.Sprintf(`{"price": %d, "bedrooms": 2}`, 400000+i))
		if status != http.StatusCreated {
			t.Fatalf("POST: %d %+v", status, got)
		}
		start[i] = got.Property
	}
	s.caughtUp(t, 30*time.Second)

	thawKafka := s.freeze(t, "kafka")
	written := make([][]Property, len(races))
	for i, race := range races {
		p := start[i]
		written[i] = make([]Property, len(race.steps))
		do := func(j int, st step) {
			path := fmt.Sprintf("/%s/properties/%d", st.region, p.ID)
			header := http.Header{"X-Request-Id": {newRequestID("race-" + st.method)}, "If-Match": {etag(p)}}
			body := fmt.Sprintf(`{"price": %d, "version": %d}`, 500000+j, p.Version)
			if st.method == "DELETE" {
				body = ""
			}
			status, h, got, err := s.doWith(st.method, path, header, body)
			if err != nil || status != http.StatusOK || h.Get("X-Served-By") != st.region {
				t.Errorf("%s: %s %s = %d from %s (%+v, %v); want 200 from %s", race.name, st.method, path, status, h.Get("X-Served-By"), got, err, st.region)
				return
			}
			w := got.Property
			if w.Deleted {
				// The tombstone keeps the values of the state it deleted.
				w.Price, w.Bedrooms, w.Bathrooms = p.Price, p.Bedrooms, p.Bathrooms
			}
			written[i][j] = w
		}
		if race.parallel {
			var wg sync.WaitGroup
			for j, st := range race.steps {
				wg.Go(func() { do(j, st) })
			}
			wg.Wait()
		} else {
			for j, st := range race.steps {
				do(j, st)
				time.Sleep(2 * time.Millisecond) // later by the clock, too
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	thawKafka()
	s.caughtUp(t, 90*time.Second)
	final := waitIdentical(t, usDB, euDB, 30*time.Second)
	byID := map[int64]Property{}
	for _, p := range final {
		byID[p.ID] = p
	}

	for i, race := range races {
		a, b := written[i][0], written[i][1]
		want := a
		if compareWrites(b, a) > 0 {
			want = b
		}
		if !race.parallel && !cmp.Equal(want, b) {
			t.Errorf("%s: the first write %+v is greater than the later %+v", race.name, a, b)
		}
		if diff := cmp.Diff(want, byID[a.ID]); diff != "" {
			t.Errorf("%s: both regions hold another row than the greater write (-want +got):\n%s", race.name, diff)
		}
		for _, region := range []string{"us", "eu"} {
			status, _, got, err := s.do("GET", fmt.Sprintf("/%s/properties/%d", region, a.ID), "", "")
			wantStatus := map[bool]int{false: http.StatusOK, true: http.StatusGone}[want.Deleted]
			if err != nil || status != wantStatus {
				t.Errorf("%s: GET in %s = %d (%+v, %v), want %d", race.name, region, status, got, err, wantStatus)
			}
		}
		outcome := "the update stands"
		if want.Deleted {
			outcome = "deleted, by " + want.RegionOrigin
		}
		t.Logf("%s: %s", race.name, outcome)
	}
}

// TestTombstoneOutlivesOldEvents delivers a deleted listing's old events
// again, from both regions, as a redelivery or a late duplicate would: the
// listing stays deleted in both.
func TestTombstoneOutlivesOldEvents(t *testing.T) {
	s := newStack(t)
	usDB, euDB := stackDB(t, "us"), stackDB(t, "eu")

	// Version 1 written by US, 2 by EU, then deleted in US at version 3.
	status, _, created := s.mustDo(t, "POST", "/us/properties", newRequestID("old-create"), `{"price": 123456.78}`)
	if status != http.StatusCreated {
		t.Fatalf("POST: %d %+v", status, created)
	}
	s.waitReplicated(t, "eu", created.Property, 15*time.Second)
	status, updated := s.put(t, "eu", created.ID, newRequestID("old-update"), 234567_89)
	if status != http.StatusOK {
		t.Fatalf("PUT: %d %+v", status, updated)
	}
	s.waitReplicated(t, "us", updated.Property, 15*time.Second)
	status, _, stone, err := s.doWith("DELETE", fmt.Sprintf("/us/properties/%d", created.ID),
		http.Header{"X-Request-Id": {newRequestID("old-delete")}, "If-Match": {etag(updated.Property)}}, "")
	if err != nil || status != http.StatusOK {
		t.Fatalf("DELETE: %d %+v %v", status, stone, err)
	}
	s.caughtUp(t, 30*time.Second)
	before := waitIdentical(t, usDB, euDB, 30*time.Second)

	// The old events, as their regions' relays sent them.
	kafka := kafkaAdmin(t)
	topic := setting("KAFKA_TOPIC", "property-updates")
	for _, old := range []response{created, updated} {
		e := event{Property: old.Property, RequestID: newRequestID("old-again"),
			fingerprint: requestFingerprint("PUT", fmt.Sprintf("/properties/%d", old.ID), nil)}
		rec, err := eventRecord(topic, e)
		if err != nil {
			t.Fatal(err)
		}
		if err := kafka.ProduceSync(context.Background(), rec).FirstErr(); err != nil {
			t.Fatalf("produce the old event of version %d: %v", old.Version, err)
		}
	}
	s.caughtUp(t, 30*time.Second)
	after := waitIdentical(t, usDB, euDB, 30*time.Second)
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("old events changed the listings (-before +after):\n%s", diff)
	}
	for _, region := range []string{"us", "eu"} {
		if status, _, got, err := s.do("GET", fmt.Sprintf("/%s/properties/%d", region, created.ID), "", ""); err != nil || status != http.StatusGone {
			t.Errorf("GET in %s after the old events = %d (%+v, %v), want 410", region, status, got, err)
		}
	}
}
