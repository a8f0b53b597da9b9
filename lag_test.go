package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
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
	// newest age old and each further partition a second older, as a peer
	// whose clock is skew ahead of ours stamps them, with an echo whose
	// seen − sent is offset, read at echoed (nil offset: no echo).
	setWatermarks := func(n int, age, skew time.Duration, offset *time.Duration, echoed time.Time) {
		t.Helper()
		if _, err := db.ExecContext(ctx, `DELETE FROM replication_watermarks`); err != nil {
			t.Fatal(err)
		}
		for p := range n {
			w := time.Now().Add(skew - age - time.Duration(p)*time.Second)
			var bound, seen *time.Time
			if offset != nil {
				b := w.Add(*offset)
				bound, seen = &b, &echoed
			}
			if _, err := db.ExecContext(ctx, saveWatermarkSQL, "us", p, 3, w, maxClockSkew.Milliseconds(), nil, bound, seen); err != nil {
				t.Fatal(err)
			}
		}
	}
	echo := func(d time.Duration) *time.Duration { return &d }

	tests := []struct {
		name       string
		partitions int
		age, skew  time.Duration
		offset     *time.Duration
		echoed     time.Time // when the echo was read; zero for now
		want       int
	}{
		// With an echo (clocks in step, a 50 ms trip), the oldest
		// partition's watermark is the lag.
		{"oldest_partition_counts", 3, 60 * time.Second, 0, echo(-50 * time.Millisecond), time.Time{}, 62},
		{"caught_up", 3, 0, 0, echo(-50 * time.Millisecond), time.Time{}, 2},
		// Without one, the lag allows for the clocks' disagreement.
		{"no_echo_allows_for_the_clocks", 3, 60 * time.Second, 0, nil, time.Time{}, 63},
		// A peer clock 0.9 s fast: its watermarks look 0.9 s younger than
		// they are, and the echo puts them back (read with the clocks
		// alone, the lag would be 11 s: understated).
		{"peer_clock_fast", 3, 10 * time.Second, 900 * time.Millisecond, echo(-950 * time.Millisecond), time.Time{}, 12},
		// An echo read before this database started (here: in 2000) may
		// be of a clock set since: not used.
		{"echo_from_before_the_start", 3, 60 * time.Second, 0, echo(-50 * time.Millisecond), time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), 63},
		// A partition never heard from could hide anything: the report falls
		// back to the time since the service started waiting (just now).
		{"partition_missing", 2, time.Hour, 0, nil, time.Time{}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			echoed := tt.echoed
			if echoed.IsZero() {
				echoed = time.Now()
			}
			setWatermarks(tt.partitions, tt.age, tt.skew, tt.offset, echoed)
			if got := lagSeconds(); got != tt.want {
				t.Errorf("lag with %d of 3 watermarks, newest %v old, peer clock %v ahead = %ds, want %ds", tt.partitions, tt.age, tt.skew, got, tt.want)
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
		if _, err := db.ExecContext(ctx, saveWatermarkSQL, "us", p, 3, future, maxClockSkew.Milliseconds(), nil, nil, nil); err != nil {
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

// TestLagReportIsSharedByConcurrentReaders: 32 clients asking for the lag
// report as fast as they can for half a second cause at most one read per
// reportInterval (the read, 20 ms here, stands for the database's), and
// a report served from an earlier read has its age added to the lag, so
// that it never reads lower than the read it came from.
func TestLagReportIsSharedByConcurrentReaders(t *testing.T) {
	var reads atomic.Int64
	s := &sharedReport{read: func(_ context.Context, last time.Duration) (LagReport, error) {
		// What the last read said, aged: the first read has none.
		if last < time.Second {
			t.Errorf("a read was told the last report said %v, want at least its 1 s", last)
		}
		reads.Add(1)
		time.Sleep(20 * time.Millisecond)
		return LagReport{LagSeconds: 1}, nil
	}}
	const run = 500 * time.Millisecond
	deadline := time.Now().Add(run)
	var wg sync.WaitGroup
	var served atomic.Int64
	for range 32 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				rep, err := s.get(context.Background())
				if err != nil || rep.LagSeconds < 1 {
					t.Errorf("get() = %v, %v; want a lag of at least the read's 1 s", rep.LagSeconds, err)
					return
				}
				served.Add(1)
			}
		})
	}
	wg.Wait()
	// One read per interval, plus the first, plus one the deadline cut.
	if most := int64(run/reportInterval) + 2; reads.Load() > most {
		t.Errorf("%d reports served with %d reads, want at most %d", served.Load(), reads.Load(), most)
	}
	if served.Load() < 100 {
		t.Errorf("only %d reports served in %v", served.Load(), run)
	}
}
