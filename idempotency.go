package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"

	"github.com/jackc/pgx/v5/pgconn"
)

// Idempotency: a client that did not hear back from a PUT cannot know whether
// it was applied, so it retries with the same X-Request-ID. The server
// remembers every request id that produced a successful update, in the
// processed_requests table, and answers a retry with 422 and the original
// response instead of applying the change twice.
//
// The request id is written by the same statement as the update it belongs
// to (see updateProperty), so the two exist together or not at all: a request
// that failed (404, 409, a crash) leaves its id free for the retry. Request ids
// travel with the replication events, so a retry that fails over to the other
// region is recognised there too, once the original write has replicated.

// maxRequestIDLen bounds X-Request-ID: long enough for any UUID or ULID with a
// prefix, short enough to index and log.
const maxRequestIDLen = 128

// duplicateRequestError reports a request id that was already used. original
// is the row the first request wrote: its response.
type duplicateRequestError struct {
	requestID string
	original  Property
}

// Error names the request id.
func (e *duplicateRequestError) Error() string {
	return fmt.Sprintf("duplicate request %q", e.requestID)
}

// errRequestUnused is duplicateRequest's answer for an id never used.
var errRequestUnused = errors.New("request id not used yet")

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

// parseRequestID returns the one X-Request-ID header of a request.
func parseRequestID(h http.Header) (string, error) {
	ids := h.Values("X-Request-ID")
	switch {
	case len(ids) == 0:
		return "", &validationError{"X-Request-ID header is required"}
	case len(ids) > 1:
		return "", &validationError{"send exactly one X-Request-ID header"}
	case !validRequestID(ids[0]):
		return "", &validationError{fmt.Sprintf("X-Request-ID must be 1 to %d visible ASCII characters", maxRequestIDLen)}
	}
	return ids[0], nil
}

// isRequestIDTaken reports whether err is the unique violation of
// processed_requests' primary key: the request id was claimed first by
// another, committed, update.
func isRequestIDTaken(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "processed_requests_pkey"
}

// lookupRequestSQL reads the row a request id's update wrote.
const lookupRequestSQL = `
SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at
FROM processed_requests
WHERE request_id = $1`

// duplicateRequest returns *duplicateRequestError with the original response
// if requestID was used by a committed update, and errRequestUnused if not.
func duplicateRequest(ctx context.Context, db *sql.DB, requestID string) error {
	original, err := scanProperty(db.QueryRowContext(ctx, lookupRequestSQL, requestID))
	if errors.Is(err, sql.ErrNoRows) {
		return errRequestUnused
	}
	if err != nil {
		return fmt.Errorf("look up request %q: %w", requestID, err)
	}
	return &duplicateRequestError{requestID: requestID, original: original}
}

// recordReplicatedRequestsSQL records request ids that the other region
// consumed, each with the row its update wrote there (the first array is the
// request ids, the others the properties table's columns). A redelivered
// event finds its id recorded already and changes nothing.
const recordReplicatedRequestsSQL = `
INSERT INTO processed_requests
    (request_id, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::numeric[], $4::integer[], $5::integer[], $6::varchar[], $7::bigint[], $8::timestamptz[])
ON CONFLICT (request_id) DO NOTHING`

// recordReplicatedRequests stores the request ids of remote writes inside
// the transaction that applies them, each with the row its write made in the
// other region, so that a retry of one of those requests here is a 422.
func recordReplicatedRequests(ctx context.Context, tx *sql.Tx, requestIDs []string, rows []Property) error {
	var c propertyColumns
	for _, p := range rows {
		c.add(p)
	}
	if _, err := tx.ExecContext(ctx, recordReplicatedRequestsSQL, append([]any{requestIDs}, c.args()...)...); err != nil {
		return fmt.Errorf("record %d replicated request ids: %w", len(requestIDs), err)
	}
	return nil
}
