package main

// Idempotency: a client that did not hear back from a PUT, POST or DELETE
// cannot know whether it was applied, so it retries with the same
// X-Request-ID. The server remembers every request id that produced a
// successful write, in the processed_requests table, for RETENTION
// (retention.go), and answers a retry with 422 and the original response
// instead of applying the change twice.
//
// The request id is written by the same statement as the write it belongs
// to (see recordAndQueueSQL), so the two exist together or not at all: a request
// that failed (404, 409, a crash) leaves its id free for the retry. Request ids
// travel with the replication events, so a retry that fails over to the other
// region is recognised there too, once the original write has replicated.
//
// Two things make this hold beyond the easy case:
//
//   - A request id names one request. With it the server keeps a fingerprint
//     of what the request asked for; the same id with another method, path or
//     body is not a retry but a mistake, and gets a 422 of its own without
//     the original response, so the client cannot believe its new body was
//     applied.
//   - A retry can reach the other region before the first write does (NGINX
//     replays a PUT whose first attempt timed out after it committed). Then
//     both regions write under one request id. Neither can know in time, so
//     both writes stand until the events cross; then the conflict rule keeps
//     the greater of the two rows (conflict.go), and each region keeps the
//     greater of the two request records too, so that both give the same
//     original response. The pair is counted as a replay, not a conflict:
//     nobody else's write was lost.

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/jackc/pgx/v5/pgconn"
)

// maxRequestIDLen bounds X-Request-ID: long enough for any UUID or ULID with a
// prefix, short enough to index and log.
const maxRequestIDLen = 128

// duplicateRequestError reports a request id that was already used by this
// same request. original is the row the first request wrote: its response.
type duplicateRequestError struct {
	requestID string
	original  Property
}

// Error names the request id.
func (e *duplicateRequestError) Error() string {
	return fmt.Sprintf("duplicate request %q", e.requestID)
}

// requestReusedError reports a request id that was already used by another
// request: another method, path or body.
type requestReusedError struct {
	requestID string
}

// Error names the request id.
func (e *requestReusedError) Error() string {
	return fmt.Sprintf("request id %q reused for a different request", e.requestID)
}

// errRequestUnused is duplicateRequest's answer for an id never used.
var errRequestUnused = errors.New("request id not used yet")

// validRequestID reports whether id is 1–128 visible ASCII characters, the
// definition of a request id (docs/semantics.md, §3).
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

// requestFingerprint names what a request asks for: its method, its resource
// without the region prefix (either region serves it, and a failover replays
// it under the other prefix), and its decoded body re-encoded, so that white
// space and key order do not matter. It is a SHA-256, in hex.
func requestFingerprint(method, resource string, body any) string {
	canonical, err := json.Marshal(body)
	if err != nil {
		// The bodies are plain structs that always encode; a failure here is
		// a bug, and a fingerprint that matches nothing is the safe answer.
		canonical = []byte(err.Error())
	}
	sum := sha256.Sum256(fmt.Appendf(nil, "%s %s %s", method, resource, canonical))
	return hex.EncodeToString(sum[:])
}

// validFingerprint reports whether f looks like requestFingerprint's answer.
func validFingerprint(f string) bool {
	_, err := hex.DecodeString(f)
	return len(f) == 2*sha256.Size && err == nil
}

// isRequestIDTaken reports whether err is the unique violation of
// processed_requests' primary key: the request id was claimed first by
// another, committed, update.
func isRequestIDTaken(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == "processed_requests_pkey"
}

// lookupRequestSQL reads the row a request id's update wrote, and the
// request's fingerprint.
const lookupRequestSQL = `
SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, fingerprint
FROM processed_requests
WHERE request_id = $1`

// duplicateRequest tells what a request id's earlier use means for a request
// with the given fingerprint: *duplicateRequestError with the original
// response if the same request was applied, *requestReusedError if another
// request used the id, and errRequestUnused if none did.
func duplicateRequest(ctx context.Context, db *sql.DB, requestID, fingerprint string) error {
	var stored string
	original, err := scanProperty(db.QueryRowContext(ctx, lookupRequestSQL, requestID), &stored)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return errRequestUnused
	case err != nil:
		return fmt.Errorf("look up request %q: %w", requestID, err)
	case stored != fingerprint:
		return &requestReusedError{requestID: requestID}
	}
	return &duplicateRequestError{requestID: requestID, original: original}
}
