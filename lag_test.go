package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestReplicationLagReport(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	srv := testServer(t, "eu", db)
	t.Cleanup(func() { db.ExecContext(ctx, `DELETE FROM replication_watermarks`) })

	// lagSeconds returns GET /eu/replication-lag's lag, in whole seconds.
	lagSeconds := func() int {
		t.Helper()
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequest("GET", "/eu/replication-lag", nil))
		var got LagReport
		if err := strictUnmarshal(rec.Body.Bytes(), &got); err != nil || rec.Code != http.StatusOK {
			t.Fatalf("GET /eu/replication-lag = %d %q (%v), want 200 and a report", rec.Code, rec.Body.String(), err)
		}
		if got.Region != "eu" || got.PeerRegion != "us" {
			t.Errorf("GET /eu/replication-lag: region %q, peer %q; want eu, us", got.Region, got.PeerRegion)
		}
		return int(got.LagSeconds)
	}
	// setWatermarks stores watermarks for the first n of 3 partitions, the
	// newest age old and each further partition a second older.
	setWatermarks := func(n int, age time.Duration) {
		t.Helper()
		if _, err := db.ExecContext(ctx, `DELETE FROM replication_watermarks`); err != nil {
			t.Fatal(err)
		}
		for p := range n {
			w := time.Now().Add(-age - time.Duration(p)*time.Second)
			if _, err := db.ExecContext(ctx, saveWatermarkSQL, "us", p, 3, w, maxClockSkew.Milliseconds(), nil); err != nil {
				t.Fatal(err)
			}
		}
	}

	tests := []struct {
		name       string
		partitions int
		age        time.Duration
		want       int
	}{
		{"oldest_partition_counts", 3, 60 * time.Second, 62},
		{"caught_up", 3, 0, 2},
		// A partition never heard from could hide anything: the report falls
		// back to the time since the service started waiting (just now).
		{"partition_missing", 2, time.Hour, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setWatermarks(tt.partitions, tt.age)
			if got := lagSeconds(); got != tt.want {
				t.Errorf("lag with %d of 3 watermarks, newest %v old = %ds, want %ds", tt.partitions, tt.age, got, tt.want)
			}
		})
	}
}

// TestFutureWatermarkIsClamped applies a heartbeat from the year 3000, as a
// skewed or forged peer clock would send: the lag must not freeze at 0 but
// go on growing from now.
func TestFutureWatermarkIsClamped(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	t.Cleanup(func() { db.ExecContext(ctx, `DELETE FROM replication_watermarks`) })
	for p := range 3 {
		future := time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)
		if _, err := db.ExecContext(ctx, saveWatermarkSQL, "us", p, 3, future, maxClockSkew.Milliseconds(), nil); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 5*time.Second, "the lag to grow past half a second after a watermark from the future", func() bool {
		r, err := readLag(ctx, db, "eu", time.Now(), &replicationStats{})
		if err != nil {
			t.Fatal(err)
		}
		return r.LagSeconds > 0.5
	})
}
