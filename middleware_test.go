package main

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestRecoverPanic: a handler that panics gets the client a JSON 500 and the
// log one line with the stack, not a dropped connection.
func TestRecoverPanic(t *testing.T) {
	var log bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&log, nil))
	h := middleware(logger, "us", newRequestMetrics(), http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		panic("boom")
	}))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/us/properties/1", nil))
	if rec.Code != http.StatusInternalServerError || rec.Header().Get("X-Served-By") != "us" {
		t.Errorf("a panicking handler: status %d, X-Served-By %q; want 500 from us", rec.Code, rec.Header().Get("X-Served-By"))
	}
	var got response
	if err := strictUnmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatalf("a panicking handler: body %q: %v", rec.Body.String(), err)
	}
	if diff := cmp.Diff(response{Error: "internal error"}, got); diff != "" {
		t.Errorf("a panicking handler: body mismatch (-want +got):\n%s", diff)
	}
	if n := strings.Count(log.String(), `"msg":"panic"`); n != 1 || !strings.Contains(log.String(), "TestRecoverPanic") {
		t.Errorf("a panicking handler logged %d panic lines, want one with the stack:\n%s", n, log.String())
	}
}
