package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// TestConditionalRequests runs GET with If-None-Match and PUT with If-Match
// against one listing, in order: every case but the last leaves it as it is.
func TestConditionalRequests(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "us", db)
	const id = 70
	path := "/us/properties/70"
	seed := seedProperty(id) // version 1, written by us: "1-us"
	mismatch := &response{Error: "version mismatch", CurrentVersion: 1}
	tests := []struct {
		name       string
		method     string
		header     map[string]string
		body       string
		wantStatus int
		wantETag   string
		want       *response // nil: no body
	}{
		{"get_has_etag", "GET", nil, "", 200, `"1-us"`, &response{Property: seed}},
		{"get_if_none_match_current", "GET", map[string]string{"If-None-Match": `"1-us"`}, "", 304, `"1-us"`, nil},
		{"get_if_none_match_weak", "GET", map[string]string{"If-None-Match": `W/"1-us"`}, "", 304, `"1-us"`, nil},
		{"get_if_none_match_list", "GET", map[string]string{"If-None-Match": `"7-eu", "1-us"`}, "", 304, `"1-us"`, nil},
		{"get_if_none_match_any", "GET", map[string]string{"If-None-Match": `*`}, "", 304, `"1-us"`, nil},
		// The same version written by the other region is another state.
		{"get_if_none_match_other_region", "GET", map[string]string{"If-None-Match": `"1-eu"`}, "", 200, `"1-us"`, &response{Property: seed}},
		{"put_if_match_other_region", "PUT", map[string]string{"If-Match": `"1-eu"`}, `{"price": 1, "version": 1}`, 412, `"1-us"`, mismatch},
		{"put_if_match_weak", "PUT", map[string]string{"If-Match": `W/"1-us"`}, `{"price": 1, "version": 1}`, 412, `"1-us"`, mismatch},
		{"put_if_match_malformed", "PUT", map[string]string{"If-Match": `1-us`}, `{"price": 1, "version": 1}`, 400, "",
			&response{Error: `If-Match must be * or a list of entity tags such as "4-us"`}},
		// If-Match is on top of the body's version, which stays a 409.
		{"put_if_match_stale_version", "PUT", map[string]string{"If-Match": `"1-us"`}, `{"price": 1, "version": 5}`, 409, "",
			&response{Error: "version mismatch", CurrentVersion: 1}},
		{"put_if_match_current", "PUT", map[string]string{"If-Match": `"3-eu", "1-us"`}, `{"price": 1, "version": 1}`, 200, `"2-us"`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := readRow(t, db, id)
			req := httptest.NewRequest(tt.method, path, strings.NewReader(tt.body))
			req.Header.Set("X-Request-ID", newRequestID("etag"))
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			rec := httptest.NewRecorder()
			srv.ServeHTTP(rec, req)
			if rec.Code != tt.wantStatus || rec.Header().Get("ETag") != tt.wantETag {
				t.Errorf("%s %s %v: status %d, ETag %q; want %d, %q", tt.method, path, tt.header, rec.Code, rec.Header().Get("ETag"), tt.wantStatus, tt.wantETag)
			}
			switch {
			case tt.wantStatus == http.StatusNotModified && rec.Body.Len() > 0:
				t.Errorf("%s %s %v: 304 with a body %q", tt.method, path, tt.header, rec.Body.String())
			case tt.want != nil:
				var got response
				if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
					t.Fatalf("%s %s: body %q: %v", tt.method, path, rec.Body.String(), err)
				}
				if diff := cmp.Diff(*tt.want, got); diff != "" {
					t.Errorf("%s %s %v: body mismatch (-want +got):\n%s", tt.method, path, tt.header, diff)
				}
			}
			if after := readRow(t, db, id); tt.wantStatus != http.StatusOK || tt.method == "GET" {
				if diff := cmp.Diff(before, after); diff != "" {
					t.Errorf("%s %s %v changed the listing (-before +after):\n%s", tt.method, path, tt.header, diff)
				}
			}
		})
	}
}

// FuzzParseTagCondition: any If-Match or If-None-Match header is either
// refused with a *validationError or parsed into tags without quotes.
func FuzzParseTagCondition(f *testing.F) {
	for _, s := range []string{`"1-us"`, `W/"1-us"`, `*`, `"7-eu", "1-us"`, `1-us`, `"`, `""`, `W/`, `"a"b"`, `, ,`, ``} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, ok, err := parseTagCondition(http.Header{"If-Match": {s}}, "If-Match")
		if !ok {
			t.Fatalf("%q: the header was not seen", s)
		}
		if err != nil {
			if _, isValidation := err.(*validationError); !isValidation {
				t.Fatalf("%q: %T %v, want a *validationError", s, err, err)
			}
			return
		}
		for _, tag := range append(c.strong, c.weak...) {
			if strings.Contains(tag, `"`) {
				t.Fatalf("%q: tag %q keeps a quote", s, tag)
			}
		}
	})
}

// TestParseTagCondition: entity-tag lists as RFC 9110 writes them.
func TestParseTagCondition(t *testing.T) {
	bad := &validationError{`If-Match must be * or a list of entity tags such as "4-us"`}
	for _, tt := range []struct {
		header  string
		want    tagCondition
		wantErr error
	}{
		{`"4-us"`, tagCondition{strong: []string{"4-us"}}, nil},
		{`*`, tagCondition{any: true}, nil},
		{` "a" ,W/"b",, "c"`, tagCondition{strong: []string{"a", "c"}, weak: []string{"b"}}, nil},
		{`"D,02Wo"`, tagCondition{strong: []string{"D,02Wo"}}, nil}, // a comma inside the quotes
		{`""`, tagCondition{strong: []string{""}}, nil},
		{`4-us`, tagCondition{}, bad},
		{`"a b"`, tagCondition{}, bad},
		{`"a" "b"`, tagCondition{}, bad},
		{`"a", *`, tagCondition{}, bad},
		{`"a`, tagCondition{}, bad},
		{`w/"a"`, tagCondition{}, bad},
	} {
		got, ok, err := parseTagCondition(http.Header{"If-Match": {tt.header}}, "If-Match")
		if !ok || !cmp.Equal(tt.wantErr, err, cmp.AllowUnexported(validationError{})) ||
			!cmp.Equal(tt.want, got, cmp.AllowUnexported(tagCondition{}), cmpopts.EquateEmpty()) {
			t.Errorf("If-Match: %s = %+v, %v; want %+v, %v", tt.header, got, err, tt.want, tt.wantErr)
		}
	}
}
