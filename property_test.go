package main

import (
	"fmt"
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
