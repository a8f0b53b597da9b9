//go:build integration && ha

package main

// Tests of the scaled-out topology alone (./stack.sh up ha: two instances
// per region, three brokers). Built only with the ha tag, which .ci/run
// gives them against that stack: under the single topology they are not
// skipped, they are not there.

import (
	"bufio"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestOneInstanceCutOffLeavesTheRelay cuts one instance of US off from
// Kafka while the other is not, and writes in US through NGINX (to both
// instances, round robin) for 30 seconds at 20 writes a second. The relay
// is one per region (an advisory lock in the region's database): the cut-off
// instance must leave it to the other, not hold it through produce
// timeouts. Every write must reach EU; the delays, and each instance's share
// of the events published, are logged (docs/ha.md: the figures
// measured here).
func TestOneInstanceCutOffLeavesTheRelay(t *testing.T) {
	s := newStack(t)
	eu := stackDB(t, "eu")
	s.caughtUp(t, time.Minute)
	before := map[string]float64{}
	for _, svc := range []string{"backend-us", "backend-us-2"} {
		before[svc] = publishedBy(t, svc)
	}
	s.control(t, "partition", "backend-us")
	t.Cleanup(func() { s.control(t, "heal", "backend-us") })

	const (
		rate     = 20
		duration = 30 * time.Second
	)
	type write struct {
		id      int64
		version int64
		acked   time.Time
	}
	var (
		mu     sync.Mutex
		writes []write
		failed int
	)
	ids := []int64{5, 7, 9, 11, 13, 15, 17, 19, 21, 23} // one writer each: no lost races
	var wg sync.WaitGroup
	deadline := time.Now().Add(duration)
	for _, id := range ids {
		wg.Go(func() {
			tick := time.NewTicker(time.Second * time.Duration(len(ids)) / rate)
			defer tick.Stop()
			version := s.current(t, "us", id).Version
			for i := 0; time.Now().Before(deadline); i++ {
				<-tick.C
				status, _, got, err := s.do("PUT", fmt.Sprintf("/us/properties/%d", id), newRequestID("cut-off-instance"),
					fmt.Sprintf(`{"price": %d.25, "version": %d}`, 100000+i, version))
				mu.Lock()
				if err != nil || status != http.StatusOK {
					failed++
					mu.Unlock()
					version = s.current(t, "us", id).Version
					continue
				}
				version = got.Version
				writes = append(writes, write{id, got.Version, time.Now()})
				mu.Unlock()
			}
		})
	}
	// Meanwhile, when each write appeared in EU, read from EU's database
	// every 10 ms.
	seen := map[int64]int64{} // id: the version EU holds
	delays := []time.Duration{}
	checked := 0
	poll := func() {
		rows, err := eu.Query(`SELECT id, version FROM properties WHERE id = ANY($1)`, ids)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var id, v int64
			if err := rows.Scan(&id, &v); err != nil {
				t.Fatal(err)
			}
			seen[id] = v
		}
		rows.Close()
		now := time.Now()
		mu.Lock()
		defer mu.Unlock()
		for ; checked < len(writes); checked++ {
			w := writes[checked]
			if seen[w.id] < w.version {
				break
			}
			delays = append(delays, now.Sub(w.acked))
		}
	}
	for time.Now().Before(deadline) {
		poll()
		time.Sleep(10 * time.Millisecond)
	}
	wg.Wait()
	waitFor(t, 30*time.Second, "every write acknowledged in US to reach EU", func() bool {
		poll()
		mu.Lock()
		defer mu.Unlock()
		return checked == len(writes)
	})
	if len(writes) < rate*int(duration/time.Second)/2 {
		t.Fatalf("only %d writes acknowledged in %v (%d failed): the region did not serve its clients", len(writes), duration, failed)
	}
	published := map[string]float64{}
	total := 0.0
	for _, svc := range []string{"backend-us", "backend-us-2"} {
		published[svc] = publishedBy(t, svc) - before[svc]
		total += published[svc]
	}
	if published["backend-us"] != 0 {
		t.Errorf("the cut-off instance published %v events: the partition did not hold", published["backend-us"])
	}
	slices.Sort(delays)
	// EU is read every 10 ms, and a write is counted once every write
	// acknowledged before it has been seen: a delay may read up to that
	// much long, never short.
	t.Logf("one US instance cut off for %v: %d writes acknowledged (%d failed), all in EU; replication delay p50 %v, p99 %v, max %v; events published: backend-us %v, backend-us-2 %v (%.0f%% by the instance that can reach Kafka)",
		duration, len(writes), failed, delays[len(delays)/2].Round(time.Millisecond), delays[len(delays)*99/100].Round(time.Millisecond),
		delays[len(delays)-1].Round(time.Millisecond), published["backend-us"], published["backend-us-2"], 100*published["backend-us-2"]/total)
}

// publishedBy reads one backend's count of events it published, from its
// own /metrics (not through NGINX, which does not expose it).
func publishedBy(t *testing.T, svc string) float64 {
	t.Helper()
	port := map[string]string{"backend-us": "8001", "backend-eu": "8002", "backend-us-2": "8003", "backend-eu-2": "8004"}[svc]
	resp, err := http.Get("http://127.0.0.1:" + port + "/metrics")
	if err != nil {
		t.Fatalf("%s's metrics: %v", svc, err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	for lines.Scan() {
		if v, ok := strings.CutPrefix(lines.Text(), "listing_replication_published_events_total "); ok {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s's metrics: %q", svc, lines.Text())
			}
			return n
		}
	}
	t.Fatalf("%s's metrics have no listing_replication_published_events_total", svc)
	return 0
}
