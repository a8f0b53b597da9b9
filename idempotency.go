package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
)

// Idempotency: a client that did not hear back from a PUT cannot know whether
// it was applied, so it retries with the same X-Request-ID. The server
// remembers every request id that produced a successful update, in the
// processed_requests table, and answers a retry with 422 and the original
// response instead of applying the change twice.
//
// The request id is written in the same transaction as the update it belongs
// to (see updateProperty), so the two exist together or not at all: a request
// that failed (404, 409, a crash) leaves its id free for the retry. Request ids
// travel with the replication events, so a retry that fails over to the other
// region is recognised there too, once the original write has replicated.

// maxRequestIDLen bounds X-Request-ID: long enough for any UUID or ULID with a
// prefix, short enough to index and log.
const maxRequestIDLen = 128

// duplicateRequestError reports a request id that was already used. original
// is the response of the first request.
type duplicateRequestError struct {
	requestID string
	original  json.RawMessage
}

func (e *duplicateRequestError) Error() string {
	return fmt.Sprintf("duplicate request %q", e.requestID)
}

// validRequestID reports whether id is 1–128 visible ASCII characters, the
// contract's definition of a request id.
func validRequestID(id string) bool {
	if len(id) == 0 || len(id) > maxRequestIDLen {
		return false
	}
	for _, c := range []byte(id) {
		if c < '!' || c > '~' {
			return false
		}
	}
	return true
}

// recordRequestSQL claims a request id. The primary key makes a concurrent
// claim of the same id wait for the first transaction: if that one commits,
// this insert does nothing; if it rolls back, this one succeeds.
const recordRequestSQL = `
INSERT INTO processed_requests (request_id, property_id, region, response)
VALUES ($1, $2, $3, $4)
ON CONFLICT (request_id) DO NOTHING`

// recordRequest stores requestID with p, the response of the update it made,
// inside the update's transaction. It fails with *duplicateRequestError if the
// id was already used, in which case the caller must roll back.
func recordRequest(ctx context.Context, tx *sql.Tx, requestID, region string, p Property) error {
	response, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("record request %q: %w", requestID, err)
	}
	res, err := tx.ExecContext(ctx, recordRequestSQL, requestID, p.ID, region, response)
	if err != nil {
		return fmt.Errorf("record request %q: %w", requestID, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("record request %q: %w", requestID, err)
	}
	if n == 1 {
		return nil
	}
	if err := checkRequestUnused(ctx, tx, requestID); err != nil {
		return err
	}
	return fmt.Errorf("record request %q: neither inserted nor found", requestID)
}

const lookupRequestSQL = `SELECT response FROM processed_requests WHERE request_id = $1`

// checkRequestUnused returns *duplicateRequestError if requestID was already
// used by a committed update, and nil if it is free.
func checkRequestUnused(ctx context.Context, tx *sql.Tx, requestID string) error {
	var original json.RawMessage
	err := tx.QueryRowContext(ctx, lookupRequestSQL, requestID).Scan(&original)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up request %q: %w", requestID, err)
	}
	return &duplicateRequestError{requestID: requestID, original: original}
}
