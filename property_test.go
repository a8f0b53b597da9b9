package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
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

// TestPutBehindLockGivesUpInTheDatabase holds a row's lock from another
// transaction. A PUT of that row must give up in the database (its lock
// timeout, requestLimits), having changed nothing, and not run into its own
// deadline: past that, the client has its 503 and NGINX replays the PUT in
// the other region, while the statement here could still commit.
func TestPutBehindLockGivesUpInTheDatabase(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	var log bytes.Buffer
	srv := newServer(slog.New(slog.NewJSONHandler(&log, nil)), "us", db, func() {}, nil, func() string { return "" })
	const id = 60
	before := readRow(t, db, id)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT 1 FROM properties WHERE id = $1 FOR UPDATE`, id); err != nil {
		t.Fatal(err)
	}
	status, _, got := call(t, srv, "PUT", "/us/properties/60", newRequestID("locked"), `{"price": 1, "version": 1}`)
	tx.Rollback()
	if diff := cmp.Diff(response{Error: "service unavailable, try again"}, got); status != http.StatusServiceUnavailable || diff != "" {
		t.Errorf("PUT of a locked row = %d, want 503 (-want +got):\n%s", status, diff)
	}
	if !strings.Contains(log.String(), "SQLSTATE 55P03") {
		t.Errorf("PUT of a locked row: the log does not show the database's lock timeout (SQLSTATE 55P03), so the request ran into its own deadline:\n%s", log.String())
	}
	if diff := cmp.Diff(before, readRow(t, db, id)); diff != "" {
		t.Errorf("PUT of a locked row changed it (-before +after):\n%s", diff)
	}
}
