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

// recordReplicatedRequestsSQL records the request ids that the other region
// consumed, each with its fingerprint and the row its update wrote there (the
// first two arrays are the ids and fingerprints, the others the properties
// table's columns). A redelivered event finds its record there already and
// changes nothing. A request written in both regions finds the record of its
// twin, and the greater of the two under the conflict rule stays, in both
// regions alike: (version, updated_at, region_origin), the region compared
// bytewise as compareWrites does.
const recordReplicatedRequestsSQL = `
INSERT INTO processed_requests
    (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent)
SELECT request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, nullif(parent, '')
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::numeric[], $5::integer[], $6::integer[], $7::varchar[], $8::bigint[], $9::timestamptz[], $10::boolean[], $11::text[])
     AS r(request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent)
ON CONFLICT (request_id) DO UPDATE
SET fingerprint   = EXCLUDED.fingerprint,
    property_id   = EXCLUDED.property_id,
    price         = EXCLUDED.price,
    bedrooms      = EXCLUDED.bedrooms,
    bathrooms     = EXCLUDED.bathrooms,
    region_origin = EXCLUDED.region_origin,
    version       = EXCLUDED.version,
    updated_at    = EXCLUDED.updated_at,
    deleted       = EXCLUDED.deleted,
    parent        = EXCLUDED.parent
WHERE (EXCLUDED.version, EXCLUDED.updated_at, EXCLUDED.region_origin COLLATE "C")
    > (processed_requests.version, processed_requests.updated_at, processed_requests.region_origin COLLATE "C")`

// recordReplicatedRequests stores the request records of remote writes inside
// the transaction that applies them, so that a retry of one of those
// requests here is a 422. An INSERT may touch a row once only, so of several
// events with one request id (a redelivery within the batch) only the
// greatest is sent.
func recordReplicatedRequests(ctx context.Context, tx *sql.Tx, events []event) error {
	greatest := map[string]event{}
	for _, e := range events {
		if g, ok := greatest[e.RequestID]; !ok || compareWrites(e.Property, g.Property) > 0 {
			greatest[e.RequestID] = e
		}
	}
	var fingerprints []string
	var c propertyColumns
	for _, e := range greatest {
		fingerprints = append(fingerprints, e.fingerprint)
		c.addWrite(e.Property, e.RequestID, e.Parent)
	}
	args := []any{c.requestIDs, fingerprints, c.ids, c.prices, c.bedrooms, c.bathrooms, c.regions, c.versions, c.updatedAt, c.deleted, c.parents}
	if _, err := tx.ExecContext(ctx, recordReplicatedRequestsSQL, args...); err != nil {
		return fmt.Errorf("record %d replicated request ids: %w", len(c.requestIDs), err)
	}
	return nil
}

// twinsSQL reads this region's records of the request ids of a batch.
const twinsSQL = `
SELECT request_id, property_id, version, fingerprint
FROM processed_requests
WHERE request_id = ANY($1)`

// twins returns the request ids of the events that this region also wrote:
// the same request (id and fingerprint) applied to the same version of the
// same property here. Such a pair is one request replayed in both regions,
// not two concurrent writers. It also returns every request id of the
// events this region already holds a record of, whatever write it made.
func twins(ctx context.Context, tx *sql.Tx, events []event) (replayed, known map[string]bool, err error) {
	ids := make([]string, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.RequestID)
	}
	rows, err := tx.QueryContext(ctx, twinsSQL, ids)
	if err != nil {
		return nil, nil, fmt.Errorf("read request records: %w", err)
	}
	defer rows.Close()
	type record struct {
		propertyID, version int64
		fingerprint         string
	}
	local := map[string]record{}
	for rows.Next() {
		var id string
		var r record
		if err := rows.Scan(&id, &r.propertyID, &r.version, &r.fingerprint); err != nil {
			return nil, nil, fmt.Errorf("read request records: %w", err)
		}
		local[id] = r
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("read request records: %w", err)
	}
	replayed, known = map[string]bool{}, map[string]bool{}
	for _, e := range events {
		r, ok := local[e.RequestID]
		known[e.RequestID] = ok
		if ok && r.fingerprint == e.fingerprint && r.propertyID == e.ID && r.version == e.Version {
			replayed[e.RequestID] = true
		}
	}
	return replayed, known, nil
}
