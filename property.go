package main

// Property: the listing itself, the rules its values obey in either region,
// and how one region reads it and updates it under optimistic locking.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Property is one listing, as the API returns it and as replication events
// carry it between regions.
type Property struct {
	ID    int64 `json:"id"`
	Price Money `json:"price"`
	// Bedrooms and Bathrooms are nullable in the seed's schema, so they are
	// pointers: a listing without the figure shows null, not 0.
	Bedrooms  *int32 `json:"bedrooms"`
	Bathrooms *int32 `json:"bathrooms"`
	// RegionOrigin is the region that wrote this version of the row.
	RegionOrigin string `json:"region_origin"`
	// Version counts the writes of the row; optimistic locking compares it.
	Version int64 `json:"version"`
	// UpdatedAt is the database's clock at the write, in UTC, to the microsecond.
	UpdatedAt time.Time `json:"updated_at"`
	// Deleted marks a tombstone: the write that deleted the listing. The
	// other fields keep the last live state's values. Clients never see a
	// tombstone in this shape (they see view's tombstone, handlers.go);
	// events carry it so.
	Deleted bool `json:"deleted,omitempty"`
}

// The two regions. Every write names the region that made it, and each
// region's backend knows the other one as its peer.
const (
	regionUS = "us"
	regionEU = "eu"
)

// validRegion reports whether r names one of the two regions.
func validRegion(r string) bool {
	return r == regionUS || r == regionEU
}

// peerOf returns the other region.
func peerOf(region string) string {
	if region == regionUS {
		return regionEU
	}
	return regionUS
}

// maxRooms is the most bedrooms or bathrooms a listing may have; more is a
// typo, not a house.
const maxRooms = 100

// validationError is a value the rules refuse, with a message for whoever
// sent it: a client gets it as a 400, a bad event takes it to the dead-letter
// queue.
type validationError struct {
	msg string
}

// Error is the message for the client.
func (e *validationError) Error() string { return e.msg }

// checkValues checks the values a write stores, whether a client sent them
// or the other region's event carries them: a price in DECIMAL(12,2) above
// zero, and room counts, when given, from 0 to maxRooms. It returns a
// *validationError naming the first value that breaks a rule.
func checkValues(price Money, bedrooms, bathrooms *int32) error {
	if price <= 0 || price > maxMoney {
		return &validationError{"price must be greater than 0 and less than 10000000000"}
	}
	for _, r := range []struct {
		name  string
		rooms *int32
	}{{"bedrooms", bedrooms}, {"bathrooms", bathrooms}} {
		if r.rooms != nil && (*r.rooms < 0 || *r.rooms > maxRooms) {
			return &validationError{fmt.Sprintf("%s must be between 0 and %d", r.name, maxRooms)}
		}
	}
	return nil
}

// propertyUpdate is a validated PUT: what a client may change, and the
// version it read. A nil Bedrooms or Bathrooms leaves the stored value as it
// is. IfMatch, when not nil, lists the states (tagValue) the update may
// apply to (the request's If-Match; etag.go).
type propertyUpdate struct {
	Price     Money
	Version   int64
	Bedrooms  *int32
	Bathrooms *int32
	IfMatch   []string
}

// Sentinel errors of the property store. handlers.go maps each to a status.
var (
	// errNotFound means no property has the requested id.
	errNotFound = errors.New("property not found")
)

// deletedError is a property that was deleted: its tombstone's version is
// the current one.
type deletedError struct {
	current int64
}

// Error names the tombstone's version.
func (e *deletedError) Error() string {
	return fmt.Sprintf("property deleted at version %d", e.current)
}

// versionMismatchError is the optimistic-locking failure: the client updated
// from a version that is no longer the current one.
type versionMismatchError struct {
	current int64
}

// Error says which version is current.
func (e *versionMismatchError) Error() string {
	return fmt.Sprintf("version mismatch: current version is %d", e.current)
}

// getPropertySQL reads one property, in the columns scanProperty reads.
const getPropertySQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted
FROM properties
WHERE id = $1`

// getProperty returns the property with the given id, errNotFound if there
// is none, or a *deletedError if it was deleted.
func getProperty(ctx context.Context, db *sql.DB, id int64) (Property, error) {
	p, err := scanProperty(db.QueryRowContext(ctx, getPropertySQL, id))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return Property{}, errNotFound
	case err != nil:
		return Property{}, fmt.Errorf("get property %d: %w", id, err)
	case p.Deleted:
		return Property{}, &deletedError{current: p.Version}
	}
	return p, nil
}

// Every write of a client, an update, a create or a delete, is ONE
// statement of three parts. A statement is a transaction of its own, so the
// parts commit together or not at all, and the write costs a single round
// trip to the database:
//
//  1. written: the change itself, which returns the row as written. Its
//     time is the database's clock.
//  2. recorded claims the request id ($1), with the request's fingerprint
//     ($2) and the row the write made: the original response of a retry
//     (idempotency.go). The primary key makes a concurrent claim of the same
//     id wait for this statement; if this one commits, the other fails with
//     a unique violation, which rolls back its whole statement (its change
//     included) and becomes its 422.
//  3. queued puts the write's event in the outbox for replication
//     (relay.go): the row as written, with the request id and fingerprint.
//
// So a request id is consumed only by a successful write, and every
// committed write has exactly one event. recordAndQueueSQL is parts 2 and 3,
// the same for every write; each write statement is its written part
// followed by it.
const recordAndQueueSQL = `
, recorded AS (
    INSERT INTO processed_requests
        (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent)
    SELECT $1, $2, id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent FROM written
    RETURNING request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted
), queued AS (
    INSERT INTO outbox
        (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent)
    SELECT recorded.*, written.parent FROM recorded, written
)
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted FROM written`

// execWrite runs one of the write statements, whose first two arguments are the
// request id and the fingerprint, and returns the row it wrote. No row
// (sql.ErrNoRows) means the write's condition did not hold; a request id
// already used is a *duplicateRequestError or *requestReusedError.
func execWrite(ctx context.Context, db *sql.DB, query, requestID, fingerprint string, args ...any) (Property, error) {
	p, err := scanProperty(db.QueryRowContext(ctx, query, append([]any{requestID, fingerprint}, args...)...))
	if isRequestIDTaken(err) {
		return Property{}, duplicateRequest(ctx, db, requestID, fingerprint)
	}
	return p, err
}

// updateProperty applies one client update: the row changes only if it is
// live and its version is still the one the client read (optimistic
// locking), and with an If-Match only if its state is one the header names.
// fingerprint names the request (requestFingerprint). The failures, in the
// order of docs/semantics.md, §3, are *duplicateRequestError or
// *requestReusedError, errNotFound, *deletedError, and
// *preconditionFailedError or *versionMismatchError; any other error comes
// from the database.
func updateProperty(ctx context.Context, db *sql.DB, region, requestID, fingerprint string, id int64, u propertyUpdate) (Property, error) {
	return writeUntilExplained(func() (Property, error) {
		p, err := execWrite(ctx, db, updatePropertySQL, requestID, fingerprint,
			id, u.Version, u.Price, u.Bedrooms, u.Bathrooms, region, u.IfMatch)
		if errors.Is(err, sql.ErrNoRows) {
			return Property{}, explainNoWrite(ctx, db, requestID, fingerprint, id, u.IfMatch, &u.Version)
		}
		if err != nil {
			return Property{}, fmt.Errorf("update property %d: %w", id, err)
		}
		return p, nil
	})
}

// errStateArrived is explainNoWrite's finding that the state a write
// named became the current one between the write and the read that
// explains it: a replicated write landed in between. A refusal then would
// name as current the very state the client sent (a 409 with
// current_version equal to its version); the write is tried again instead.
var errStateArrived = errors.New("the state the write named arrived meanwhile")

// errKeptChanging is a write whose named state arrived after each of
// writeAttempts tries (writeUntilExplained): the listing is changing
// faster than it can be written. Nothing was written; a 503.
var errKeptChanging = errors.New("the listing kept changing under the write")

// writeAttempts is how often a write is tried while errStateArrived.
const writeAttempts = 3

// writeUntilExplained runs write until it succeeds or fails for a reason
// that holds (not errStateArrived), at most writeAttempts times.
func writeUntilExplained(write func() (Property, error)) (Property, error) {
	for range writeAttempts {
		p, err := write()
		if !errors.Is(err, errStateArrived) {
			return p, err
		}
	}
	return Property{}, errKeptChanging
}

// updatePropertySQL is the update (see recordAndQueueSQL for the rest).
// The WHERE clause is the version check, and the row lock the UPDATE takes
// makes check and write atomic: a concurrent update of the same row waits for
// this one, then finds the version moved on and updates nothing. With an
// If-Match ($9), the state's tag must be one it names, too (etag.go).
const updatePropertySQL = `
WITH written AS (
    UPDATE properties
    SET price         = $5,
        bedrooms      = COALESCE($6, bedrooms),
        bathrooms     = COALESCE($7, bathrooms),
        region_origin = $8,
        version       = version + 1,
        updated_at    = now(),
        request_id    = $1,
        parent        = version::text || '-' || region_origin
    WHERE id = $3 AND version = $4 AND NOT deleted
      AND ($9::text[] IS NULL OR version::text || '-' || region_origin = ANY ($9))
    RETURNING id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent
)` + recordAndQueueSQL

// newProperty is a validated POST body: a new listing's values.
type newProperty struct {
	Price               Money
	Bedrooms, Bathrooms int32
}

// createProperty adds a listing with an id from region's own sequence (odd
// ids for US, even for EU, see init.sql), version 1, written by region. It
// replicates like an update; its failures are *duplicateRequestError or
// *requestReusedError for a request id already used. fingerprint names the
// request (requestFingerprint).
func createProperty(ctx context.Context, db *sql.DB, region, requestID, fingerprint string, n newProperty) (Property, error) {
	p, err := execWrite(ctx, db, createPropertySQL, requestID, fingerprint, n.Price, n.Bedrooms, n.Bathrooms, region)
	if err != nil {
		return Property{}, fmt.Errorf("create property: %w", err)
	}
	return p, nil
}

// createPropertySQL inserts a new listing (see recordAndQueueSQL for the
// rest). A request id already taken fails the statement, which rolls the
// insert back: its id is skipped, as the sequence does not go back.
const createPropertySQL = `
WITH written AS (
    INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at, request_id)
    VALUES (nextval(('property_ids_' || $6::varchar)::regclass), $3, $4, $5, $6::varchar, 1, now(), $1)
    RETURNING id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent
)` + recordAndQueueSQL

// deleteProperty deletes a listing whose state is one that ifMatch names
// (nil: any state, If-Match: *), leaving a tombstone: the next version,
// written by region, marked deleted. It returns the tombstone. The failures,
// in the order of docs/semantics.md, §3, are *duplicateRequestError or
// *requestReusedError, errNotFound, *deletedError and
// *preconditionFailedError.
func deleteProperty(ctx context.Context, db *sql.DB, region, requestID, fingerprint string, id int64, ifMatch []string) (Property, error) {
	return writeUntilExplained(func() (Property, error) {
		p, err := execWrite(ctx, db, deletePropertySQL, requestID, fingerprint, id, region, ifMatch)
		if errors.Is(err, sql.ErrNoRows) {
			return Property{}, explainNoWrite(ctx, db, requestID, fingerprint, id, ifMatch, nil)
		}
		if err != nil {
			return Property{}, fmt.Errorf("delete property %d: %w", id, err)
		}
		return p, nil
	})
}

// deletePropertySQL turns a live listing into its tombstone (see
// recordAndQueueSQL for the rest). It is an update in all but name, so it
// takes the same row lock, and a concurrent update or delete of the same
// state waits for it and then finds the state gone.
const deletePropertySQL = `
WITH written AS (
    UPDATE properties
    SET deleted       = true,
        region_origin = $4,
        version       = version + 1,
        updated_at    = now(),
        request_id    = $1,
        parent        = version::text || '-' || region_origin
    WHERE id = $3 AND NOT deleted
      AND ($5::text[] IS NULL OR version::text || '-' || region_origin = ANY ($5))
    RETURNING id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, parent
)` + recordAndQueueSQL

// explainNoWrite finds out why a write statement changed no row, checking
// the reasons in the order of docs/semantics.md, §3: a used request id first, then a
// missing or deleted property, then a state the If-Match does not name,
// then, for an update (version not nil), a stale version. A state that
// now passes every check arrived after the write: errStateArrived.
func explainNoWrite(ctx context.Context, db *sql.DB, requestID, fingerprint string, id int64, ifMatch []string, version *int64) error {
	if err := duplicateRequest(ctx, db, requestID, fingerprint); !errors.Is(err, errRequestUnused) {
		return err
	}
	current, err := getProperty(ctx, db, id)
	if err != nil {
		return err
	}
	if ifMatch != nil && !slices.Contains(ifMatch, tagValue(current.Version, current.RegionOrigin)) {
		return &preconditionFailedError{current: current}
	}
	if version == nil || current.Version == *version {
		return errStateArrived
	}
	return &versionMismatchError{current: current.Version}
}

// rowScanner is what *sql.Row and *sql.Rows have in common.
type rowScanner interface {
	Scan(dest ...any) error
}

// scanProperty reads a property from the columns id, price, bedrooms,
// bathrooms, region_origin, version, updated_at and deleted, in that order (every
// query that returns properties selects them so), then any further columns
// into extra. It normalizes updated_at to UTC.
func scanProperty(row rowScanner, extra ...any) (Property, error) {
	var p Property
	var bedrooms, bathrooms sql.NullInt32
	dest := append([]any{&p.ID, &p.Price, &bedrooms, &bathrooms, &p.RegionOrigin, &p.Version, &p.UpdatedAt, &p.Deleted}, extra...)
	if err := row.Scan(dest...); err != nil {
		return Property{}, err
	}
	p.Bedrooms, p.Bathrooms = nullable(bedrooms), nullable(bathrooms)
	p.UpdatedAt = p.UpdatedAt.UTC()
	return p, nil
}

// nullable turns a nullable column into a pointer: nil for NULL.
func nullable(n sql.NullInt32) *int32 {
	if !n.Valid {
		return nil
	}
	return &n.Int32
}

// propertyColumns holds properties column by column, the shape PostgreSQL's
// unnest reads: one statement then writes a whole batch of rows.
type propertyColumns struct {
	ids, versions       []int64
	prices, regions     []string
	bedrooms, bathrooms []*int32
	updatedAt           []time.Time
	deleted             []bool
	// The request that wrote each row and the state it was built on
	// (properties.request_id and parent); "" for NULL.
	requestIDs, parents []string
}

// add appends p as one more row.
func (c *propertyColumns) add(p Property) { c.addWrite(p, "", "") }

// addWrite appends p as one more row, written by requestID on the state
// parent.
func (c *propertyColumns) addWrite(p Property, requestID, parent string) {
	c.ids = append(c.ids, p.ID)
	c.prices = append(c.prices, p.Price.String())
	c.bedrooms = append(c.bedrooms, p.Bedrooms)
	c.bathrooms = append(c.bathrooms, p.Bathrooms)
	c.regions = append(c.regions, p.RegionOrigin)
	c.versions = append(c.versions, p.Version)
	c.updatedAt = append(c.updatedAt, p.UpdatedAt)
	c.deleted = append(c.deleted, p.Deleted)
	c.requestIDs = append(c.requestIDs, requestID)
	c.parents = append(c.parents, parent)
}

// args are the columns in the order of the properties table.
func (c *propertyColumns) args() []any {
	return []any{c.ids, c.prices, c.bedrooms, c.bathrooms, c.regions, c.versions, c.updatedAt, c.deleted, c.requestIDs, c.parents}
}
