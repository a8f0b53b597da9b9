//go:build integration

package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"
)

// TestRefusesRetentionShorterThanTopics starts the service with a retention
// shorter than the stack's topic keeps events (seven days): it reads the
// topic's retention.ms from the broker and stops with an error naming
// RETENTION, instead of purging request ids and tombstones that events
// still in Kafka could need.
func TestRefusesRetentionShorterThanTopics(t *testing.T) {
	testDB(t)
	env := map[string]string{"REGION": "us", "PORT": "18932", "DATABASE_URL": scratchURL,
		"KAFKA_BROKER": setting("STACK_KAFKA", "localhost:9092"), "RETENTION": "1h"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := run(ctx, nil, func(k string) string { return env[k] }, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "RETENTION 1h0m0s must be longer than the topic's retention.ms (168h0m0s)") {
		t.Errorf("run with RETENTION=1h = %v, want a refusal naming RETENTION and the topic's seven days", err)
	}
	if ctx.Err() != nil {
		t.Error("run kept running until the test's deadline")
	}
}
