package main

import (
	"bytes"
	"context"
	"database/sql"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestPoolsDoNotStarveEachOther takes every connection of one of the pools
// run opens, and the other must still reach the database at once.
func TestPoolsDoNotStarveEachOther(t *testing.T) {
	testDB(t) // fails early, with the explanation, when there is no database
	requests, replication, err := openPools(scratchURL, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { requests.Close(); replication.Close() })
	for _, tt := range []struct {
		name        string
		busy, other *sql.DB
		size        int
	}{
		{"requests_busy", requests, replication, 2},
		{"replication_busy", replication, requests, replicationConns},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			for i := range tt.size {
				conn, err := tt.busy.Conn(ctx)
				if err != nil {
					t.Fatalf("taking connection %d of %d: %v", i+1, tt.size, err)
				}
				t.Cleanup(func() { conn.Close() })
			}
			if err := tt.other.PingContext(ctx); err != nil {
				t.Errorf("with all %d connections of one pool taken, the other pool: %v", tt.size, err)
			}
		})
	}
}

// TestSessionLimits reads the lock and statement timeouts from connections
// of the pools run opens: each must be set, and below the deadline of what
// runs on it, so that the database gives up first.
func TestSessionLimits(t *testing.T) {
	testDB(t) // fails early, with the explanation, when there is no database
	requests, replication, err := openPools(scratchURL, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { requests.Close(); replication.Close() })
	tests := []struct {
		name     string
		db       *sql.DB
		deadline time.Duration // of the work on this pool
	}{
		{"requests", requests, dbTimeout},
		{"replication", replication, min(relayRoundTimeout, applyAttemptTimeout)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, setting := range []string{"lock_timeout", "statement_timeout"} {
				var value string
				if err := tt.db.QueryRow("SHOW " + setting).Scan(&value); err != nil {
					t.Fatal(err)
				}
				d, err := time.ParseDuration(value)
				if err != nil || d <= 0 || d >= tt.deadline {
					t.Errorf("%s pool: %s = %q, want more than 0 and less than %v", tt.name, setting, value, tt.deadline)
				}
			}
		})
	}
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
	srv := newServer(slog.New(slog.NewJSONHandler(&log, nil)), "us", db, idle(db, "us"), nil)
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

func TestDatabaseDown(t *testing.T) {
	srv := testServer(t, "us", unreachableDB(t))
	tests := []struct {
		name      string
		method    string
		path      string
		requestID string
		body      string
		want      response
	}{
		{"health", "GET", "/health", "", "", response{Status: "unavailable", Region: "us", Error: "database unreachable"}},
		{"region_health", "GET", "/eu/health", "", "", response{Status: "unavailable", Region: "us", Error: "database unreachable"}},
		{"get", "GET", "/us/properties/1", "", "", response{Error: "service unavailable, try again"}},
		{"put", "PUT", "/us/properties/1", "down-1", `{"price": 1, "version": 1}`, response{Error: "service unavailable, try again"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, _, got := call(t, srv, tt.method, tt.path, tt.requestID, tt.body)
			if status != http.StatusServiceUnavailable {
				t.Errorf("%s %s with the database down: status = %d, want 503", tt.method, tt.path, status)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("%s %s with the database down: body mismatch (-want +got):\n%s", tt.method, tt.path, diff)
			}
		})
	}
}
