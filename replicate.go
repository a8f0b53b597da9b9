package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"
)

// event is what travels through Kafka for one committed update: the whole new
// row plus the request id that produced it. Sending the full row rather than
// the change makes applying it idempotent and order-independent.
type event struct {
	ID           int64     `json:"id"`
	Price        Money     `json:"price"`
	Bedrooms     *int32    `json:"bedrooms"`
	Bathrooms    *int32    `json:"bathrooms"`
	RegionOrigin string    `json:"region_origin"`
	Version      int64     `json:"version"`
	UpdatedAt    time.Time `json:"updated_at"`
	RequestID    string    `json:"request_id"`
}

// newEvent returns the replication event for p, written by requestID.
func newEvent(p Property, requestID string) event {
	return event{
		ID:           p.ID,
		Price:        p.Price,
		Bedrooms:     p.Bedrooms,
		Bathrooms:    p.Bathrooms,
		RegionOrigin: p.RegionOrigin,
		Version:      p.Version,
		UpdatedAt:    p.UpdatedAt,
		RequestID:    requestID,
	}
}

const enqueueEventSQL = `INSERT INTO outbox (property_id, payload) VALUES ($1, $2)`

// enqueueEvent writes e to the outbox inside the caller's transaction, so the
// event exists exactly when the change it describes has committed.
func enqueueEvent(ctx context.Context, tx *sql.Tx, e event) error {
	payload, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("enqueue event for property %d: %w", e.ID, err)
	}
	if _, err := tx.ExecContext(ctx, enqueueEventSQL, e.ID, payload); err != nil {
		return fmt.Errorf("enqueue event for property %d: %w", e.ID, err)
	}
	return nil
}
