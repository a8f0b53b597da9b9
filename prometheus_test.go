//go:build integration

package main

// The metrics as an operator sees them: through the stack's real Prometheus
// (STACK_PROMETHEUS), which scrapes both backends and evaluates
// prometheus/alerts.yml.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"testing"
	"time"
)

// promQuery runs an instant query and returns each series' value by its
// region label.
func promQuery(t *testing.T, query string) map[string]float64 {
	t.Helper()
	base := setting("STACK_PROMETHEUS", "http://localhost:9090")
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(query))
	if err != nil {
		t.Fatalf("Prometheus at %s: %v (is the stack up with Prometheus?)", base, err)
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.Status != "success" {
		t.Fatalf("query %q: status %q, %v", query, body.Status, err)
	}
	values := map[string]float64{}
	for _, r := range body.Data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			t.Fatalf("query %q: value %v", query, r.Value)
		}
		values[r.Metric["region"]] = v
	}
	return values
}

// promAlerts returns the state of each alert of that name, by region.
func promAlerts(t *testing.T, name string) map[string]string {
	t.Helper()
	resp, err := http.Get(setting("STACK_PROMETHEUS", "http://localhost:9090") + "/api/v1/alerts")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Data struct {
			Alerts []struct {
				Labels map[string]string `json:"labels"`
				State  string            `json:"state"`
			} `json:"alerts"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, a := range body.Data.Alerts {
		if a.Labels["alertname"] == name {
			states[a.Labels["region"]] = a.State
		}
	}
	return states
}

// TestPrometheusSeesAWriteReplicate writes in US and watches EU's applied
// counter move in Prometheus, scraped from EU's backend.
func TestPrometheusSeesAWriteReplicate(t *testing.T) {
	s := newStack(t)
	s.caughtUp(t, 30*time.Second)
	const query = `listing_replication_applied_total{region="eu"}`
	// The counter counts since EU's backend started, and an earlier test may
	// have restarted it: "before" is a value Prometheus has scraped twice
	// in a row (scrapes are 5 s apart), so that it is the running
	// process's, not a sample from before the restart.
	var before float64
	var last float64 = -1
	waitFor(t, 60*time.Second, "Prometheus to hold a steady value of eu's applied counter", func() bool {
		v, ok := promQuery(t, query)["eu"]
		steady := ok && v == last
		last, before = v, v
		if !steady {
			time.Sleep(6 * time.Second)
		}
		return steady
	})
	status, got := s.put(t, "us", 215, newRequestID("prometheus"), 215215_15)
	if status != http.StatusOK {
		t.Fatalf("PUT in us: %d %+v", status, got)
	}
	// Applied in EU first (a partition an earlier test added may take its
	// consumer a rebalance to read), then seen by Prometheus.
	s.waitReplicated(t, "eu", got.Property, 60*time.Second)
	waitFor(t, 30*time.Second, fmt.Sprintf("%s to rise above %v", query, before), func() bool {
		return promQuery(t, query)["eu"] > before
	})
}

// TestPrometheusLagAlertWhenKafkaStops freezes Kafka: both regions' lag
// grows, and Prometheus finds the ReplicationLagHigh rule's expression true
// (the alert pending, or firing once it has held for its minute).
func TestPrometheusLagAlertWhenKafkaStops(t *testing.T) {
	s := newStack(t)
	s.caughtUp(t, 30*time.Second)
	if states := promAlerts(t, "ReplicationLagHigh"); len(states) > 0 {
		t.Fatalf("ReplicationLagHigh is %v before Kafka stopped", states)
	}
	thawKafka := s.freeze(t, "kafka")
	waitFor(t, 90*time.Second, "ReplicationLagHigh to be pending or firing in both regions", func() bool {
		states := promAlerts(t, "ReplicationLagHigh")
		return states["us"] != "" && states["eu"] != ""
	})
	thawKafka()
	s.caughtUp(t, 90*time.Second)
}
