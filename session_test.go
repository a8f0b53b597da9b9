package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestSessionTokenRoundTrip: a token reads back as written, covers the
// latest time of each region it saw, and stays the same size however many
// writes it covers.
func TestSessionTokenRoundTrip(t *testing.T) {
	var tok sessionToken
	at := time.Date(2026, 12, 3, 12, 0, 0, 123456000, time.UTC)
	for i := range 10000 {
		tok = tok.saw([]string{"us", "eu"}[i%2], at.Add(time.Duration(i)*time.Microsecond))
	}
	tok = tok.saw("us", at) // an older time changes nothing
	want := sessionToken{at.Add(9998 * time.Microsecond).UnixMicro(), at.Add(9999 * time.Microsecond).UnixMicro()}
	if tok != want {
		t.Fatalf("token %v, want %v", tok, want)
	}
	s := tok.String()
	if len(s) >= maxSessionToken {
		t.Errorf("token %q is %d bytes", s, len(s))
	}
	got, err := parseSessionToken(http.Header{sessionHeader: {s}})
	if err != nil || got != tok {
		t.Errorf("parse(%q) = %v, %v; want %v", s, got, err, tok)
	}
	if s := (sessionToken{}).String(); s != "v1" {
		t.Errorf("the empty token is %q, want v1", s)
	}
	if got, err := parseSessionToken(http.Header{}); err != nil || got != (sessionToken{}) {
		t.Errorf("no header: %v, %v; want the empty token", got, err)
	}
}

// TestSessionTokenRefused: a token this service did not give out is a
// 400, and one naming a region it does not know says so.
func TestSessionTokenRefused(t *testing.T) {
	for _, tt := range []struct {
		name  string
		value []string
		want  error
	}{
		{"empty", []string{""}, errSessionMalformed},
		{"no_version", []string{"us=1764763200123456"}, errSessionMalformed},
		{"other_version", []string{"v2;us=1764763200123456"}, errSessionMalformed},
		{"no_equals", []string{"v1;us"}, errSessionMalformed},
		{"not_a_number", []string{"v1;us=soon"}, errSessionMalformed},
		{"negative", []string{"v1;us=-5"}, errSessionMalformed},
		{"zero", []string{"v1;us=0"}, errSessionMalformed},
		{"leading_zero", []string{"v1;us=01764763200123456"}, errSessionMalformed},
		{"plus_sign", []string{"v1;us=+1764763200123456"}, errSessionMalformed},
		{"overflow", []string{"v1;us=99999999999999999999"}, errSessionMalformed},
		{"nineteen_digits", []string{"v1;us=1000000000000000000"}, errSessionMalformed},
		{"twice", []string{"v1;us=1;us=2"}, errSessionMalformed},
		{"out_of_order", []string{"v1;eu=2;us=1"}, errSessionMalformed},
		{"trailing_separator", []string{"v1;us=1;"}, errSessionMalformed},
		{"two_headers", []string{"v1", "v1"}, errSessionMalformed},
		{"too_long", []string{"v1;us=1" + strings.Repeat(" ", maxSessionToken)}, errSessionMalformed},
		{"not_a_region_name", []string{"v1;U$=1"}, errSessionMalformed},
		{"unknown_region", []string{"v1;ap=1764763200123456"}, errSessionRegion},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := parseSessionToken(http.Header{sessionHeader: tt.value}); err != tt.want {
				t.Errorf("parse(%q) = %v, want %v", tt.value, err, tt.want)
			}
		})
	}
}

// TestSessionTokenOnEveryAnswer: every successful answer about listings
// carries a token, which covers what the answer showed of the serving
// region's own writes and every time the request's token brought; a
// token this service did not give out is a 400 on every route and changes
// nothing; and a token whose peer writes have not arrived is the
// session's 503, after the wait, and changes nothing either.
func TestSessionTokenOnEveryAnswer(t *testing.T) {
	db := testDB(t)
	h := testServer(t, "us", db)
	send := func(method, path, token, body string, header ...string) (int, http.Header, response) {
		t.Helper()
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		if token != "" {
			req.Header.Set(sessionHeader, token)
		}
		req.Header.Set("X-Request-ID", newRequestID("session"))
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var got response
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil && rec.Code != http.StatusNotModified {
			t.Fatalf("%s %s: %v: %q", method, path, err, rec.Body.String())
		}
		return rec.Code, rec.Header(), got
	}
	covers := func(what string, hdr http.Header, region string, at time.Time) sessionToken {
		t.Helper()
		tok, err := parseSessionToken(http.Header{sessionHeader: hdr.Values(sessionHeader)})
		if err != nil || len(hdr.Values(sessionHeader)) != 1 {
			t.Fatalf("%s: token %q: %v", what, hdr.Values(sessionHeader), err)
		}
		if want := (sessionToken{}).saw(region, at); tok[0] < want[0] || tok[1] < want[1] {
			t.Errorf("%s: token %q does not cover %s's write at %v", what, tok, region, at)
		}
		return tok
	}

	status, hdr, created := send("POST", "/us/properties", "", `{"price": 100}`)
	if status != http.StatusCreated {
		t.Fatalf("POST = %d %+v", status, created)
	}
	covers("POST", hdr, "us", created.UpdatedAt)
	path := fmt.Sprintf("/us/properties/%d", created.ID)
	status, hdr, got := send("GET", path, "", "")
	if status != http.StatusOK {
		t.Fatalf("GET = %d", status)
	}
	covers("GET", hdr, "us", created.UpdatedAt)
	status, hdr, _ = send("GET", path, "", "", "If-None-Match", etag(got.Property))
	if status != http.StatusNotModified {
		t.Fatalf("GET If-None-Match = %d", status)
	}
	covers("GET 304", hdr, "us", created.UpdatedAt)
	putID := newRequestID("session-put")
	status, hdr, updated := send("PUT", path, "", `{"price": 101, "version": 1}`, "X-Request-ID", putID)
	if status != http.StatusOK {
		t.Fatalf("PUT = %d %+v", status, updated)
	}
	covers("PUT", hdr, "us", updated.UpdatedAt)
	// The same request again: its 422 covers the write it was.
	status, hdr, dup := send("PUT", path, "", `{"price": 101, "version": 1}`, "X-Request-ID", putID)
	if status != http.StatusUnprocessableEntity || dup.OriginalResponse == nil {
		t.Fatalf("the PUT again = %d %+v", status, dup)
	}
	covers("the PUT's 422", hdr, "us", updated.UpdatedAt)
	before := time.Now()
	status, hdr, _ = send("GET", "/us/properties?limit=1", "", "")
	if status != http.StatusOK {
		t.Fatalf("list = %d", status)
	}
	// The page's clock is the database's: on this machine, within a
	// second of the test's.
	covers("list", hdr, "us", before.Add(-time.Second))

	// A time the request brought is carried on, however far ahead.
	far := time.Now().Add(time.Hour)
	status, hdr, _ = send("GET", path, sessionToken{}.saw("us", far).String(), "")
	if tok := covers("GET with a later token", hdr, "us", far); status != http.StatusOK || tok[0] != far.UnixMicro() {
		t.Errorf("GET with a later token = %d, token %v; want 200 carrying %v", status, tok, far)
	}

	for _, bad := range []string{"v1;us=soon", "v1;ap=1"} {
		for _, r := range []struct{ method, path, body string }{
			{"GET", path, ""}, {"GET", "/us/properties", ""}, {"POST", "/us/properties", `{"price": 5}`},
			{"PUT", path, `{"price": 5, "version": 2}`}, {"DELETE", path, ""},
		} {
			status, hdr, got := send(r.method, r.path, bad, r.body, "If-Match", "*")
			if status != http.StatusBadRequest || !strings.HasPrefix(got.Error, "X-Session-Token") || hdr.Get(sessionHeader) != "" {
				t.Errorf("%s %s with token %q = %d %+v, want a 400 naming X-Session-Token", r.method, r.path, bad, status, got)
			}
		}
	}
	// This database has no watermark of EU: a token with an EU write waits,
	// then is refused, and nothing is written.
	start := time.Now()
	status, hdr, got = send("PUT", path, sessionToken{}.saw("eu", time.Now()).String(), `{"price": 5, "version": 2}`)
	if status != http.StatusServiceUnavailable || got.Error != errSessionBehind.Error() || hdr.Get("Retry-After") != "1" {
		t.Errorf("PUT with an EU write not arrived = %d %+v", status, got)
	}
	if waited := time.Since(start); waited < sessionWait {
		t.Errorf("the 503 came after %v, before the session's wait of %v", waited, sessionWait)
	}
	if status, _, got := send("GET", path, "", ""); status != http.StatusOK || got.Version != updated.Version || got.Price != updated.Price {
		t.Errorf("after the refusals: %d %+v, want %+v", status, got, updated.Property)
	}
}

// TestPeerWatermarkWakesEveryWaiter: requests that wait for the watermark
// share its reader, each returns once it moves past its time, and one
// whose time it does not reach is the session's 503 after the wait.
func TestPeerWatermarkWakesEveryWaiter(t *testing.T) {
	db := testDB(t)
	const peer = "zz" // a region no other test writes watermarks of
	base := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	set := func(w time.Time) {
		t.Helper()
		if _, err := db.Exec(`
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark) VALUES ($1, 0, 1, $2)
ON CONFLICT (peer_region, partition) DO UPDATE SET watermark = EXCLUDED.watermark`, peer, w); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { db.Exec(`DELETE FROM replication_watermarks WHERE peer_region = $1`, peer) })
	set(base)
	p := &peerWatermark{db: db, region: peer}
	if waited, err := p.await(context.Background(), base.Add(-time.Millisecond).UnixMicro()); err != nil || waited == 0 {
		t.Fatalf("a time below the watermark, first asked: waited %v, %v; want a read and no error", waited, err)
	}
	if waited, err := p.await(context.Background(), base.Add(-time.Millisecond).UnixMicro()); err != nil || waited != 0 {
		t.Fatalf("a time below the watermark, asked again: waited %v, %v; want no read", waited, err)
	}
	errs := make(chan error, 50)
	for range cap(errs) {
		go func() {
			_, err := p.await(context.Background(), base.Add(time.Millisecond).UnixMicro())
			errs <- err
		}()
	}
	never := make(chan error, 1)
	go func() {
		_, err := p.await(context.Background(), base.Add(time.Hour).UnixMicro())
		never <- err
	}()
	time.Sleep(100 * time.Millisecond)
	set(base.Add(2 * time.Millisecond))
	for range cap(errs) {
		if err := <-errs; err != nil {
			t.Errorf("a waiter the watermark passed: %v", err)
		}
	}
	if err := <-never; err != errSessionBehind {
		t.Errorf("a waiter the watermark never reached: %v, want errSessionBehind", err)
	}
}
