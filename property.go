package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
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
}

// propertyUpdate is a validated PUT body: what a client may change, and the
// version it read. A nil Bedrooms or Bathrooms leaves the stored value as it is.
type propertyUpdate struct {
	Price     Money
	Version   int64
	Bedrooms  *int32
	Bathrooms *int32
}

// Sentinel errors of the property store. handlers.go maps each to a status.
var (
	// errNotFound means no property has the requested id.
	errNotFound = errors.New("property not found")
)

// versionMismatchError is the optimistic-locking failure: the client updated
// from a version that is no longer the current one.
type versionMismatchError struct {
	current int64
}

func (e *versionMismatchError) Error() string {
	return fmt.Sprintf("version mismatch: current version is %d", e.current)
}

const getPropertySQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at
FROM properties
WHERE id = $1`

// getProperty returns the property with the given id, or errNotFound.
func getProperty(ctx context.Context, db *sql.DB, id int64) (Property, error) {
	p, err := scanProperty(db.QueryRowContext(ctx, getPropertySQL, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Property{}, errNotFound
	}
	if err != nil {
		return Property{}, fmt.Errorf("get property %d: %w", id, err)
	}
	return p, nil
}

// updateProperty applies one client update in a single transaction that does
// three things or nothing:
//
//  1. the optimistic update: the row changes only if its version is still the
//     one the client read (UPDATE ... WHERE id = $1 AND version = $2);
//  2. the request id is recorded with the response (idempotency.go);
//  3. the replication event is written to the outbox (replicate.go).
//
// So a request id is consumed only by a successful update, and every committed
// update has exactly one event. The failures, in the contract's order of
// precedence, are *duplicateRequestError, errNotFound and *versionMismatchError;
// any other error comes from the database.
func updateProperty(ctx context.Context, db *sql.DB, region, requestID string, id int64, u propertyUpdate) (Property, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return Property{}, fmt.Errorf("update property %d: %w", id, err)
	}
	defer tx.Rollback()

	// The update goes first because it takes the row lock: concurrent requests
	// for the same property queue behind it, and when it commits, each of them
	// re-reads the row and finds the version moved on.
	p, err := applyUpdate(ctx, tx, region, id, u)
	if errors.Is(err, sql.ErrNoRows) {
		return Property{}, explainNoUpdate(ctx, tx, requestID, id)
	}
	if err != nil {
		return Property{}, fmt.Errorf("update property %d: %w", id, err)
	}
	if err := recordRequest(ctx, tx, requestID, region, p); err != nil {
		return Property{}, fmt.Errorf("update property %d: %w", id, err)
	}
	if err := enqueueEvent(ctx, tx, newEvent(p, requestID)); err != nil {
		return Property{}, fmt.Errorf("update property %d: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return Property{}, fmt.Errorf("update property %d: commit: %w", id, err)
	}
	return p, nil
}

// applyUpdateSQL is optimistic locking in one statement: the WHERE clause is
// the version check, and the row lock the UPDATE takes makes check and write
// atomic. The write's time is the database's clock, so that all writes of a
// region share one clock and updated_at orders them.
const applyUpdateSQL = `
UPDATE properties
SET price         = $3,
    bedrooms      = COALESCE($4, bedrooms),
    bathrooms     = COALESCE($5, bathrooms),
    region_origin = $6,
    version       = version + 1,
    updated_at    = now()
WHERE id = $1 AND version = $2
RETURNING id, price, bedrooms, bathrooms, region_origin, version, updated_at`

// applyUpdate runs applyUpdateSQL and returns the new row, or sql.ErrNoRows
// when no row has that id and version.
func applyUpdate(ctx context.Context, tx *sql.Tx, region string, id int64, u propertyUpdate) (Property, error) {
	return scanProperty(tx.QueryRowContext(ctx, applyUpdateSQL,
		id, u.Version, u.Price, u.Bedrooms, u.Bathrooms, region))
}

const currentVersionSQL = `SELECT version FROM properties WHERE id = $1`

// explainNoUpdate finds out why applyUpdateSQL changed no row, checking the
// reasons in the contract's order: a used request id first, then a missing
// property, then a stale version.
func explainNoUpdate(ctx context.Context, tx *sql.Tx, requestID string, id int64) error {
	if err := checkRequestUnused(ctx, tx, requestID); err != nil {
		return err
	}
	var current int64
	err := tx.QueryRowContext(ctx, currentVersionSQL, id).Scan(&current)
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	if err != nil {
		return fmt.Errorf("update property %d: %w", id, err)
	}
	return &versionMismatchError{current: current}
}

// rowScanner is what *sql.Row and *sql.Rows have in common.
type rowScanner interface {
	Scan(dest ...any) error
}

// scanProperty reads the columns of getPropertySQL, in that order.
func scanProperty(row rowScanner) (Property, error) {
	var p Property
	var bedrooms, bathrooms sql.NullInt32
	err := row.Scan(&p.ID, &p.Price, &bedrooms, &bathrooms, &p.RegionOrigin, &p.Version, &p.UpdatedAt)
	if err != nil {
		return Property{}, err
	}
	if bedrooms.Valid {
		p.Bedrooms = &bedrooms.Int32
	}
	if bathrooms.Valid {
		p.Bathrooms = &bathrooms.Int32
	}
	p.UpdatedAt = p.UpdatedAt.UTC()
	return p, nil
}

// Money is an amount in cents. Prices are exact decimals end to end: the
// client's JSON number is parsed digit by digit, the database stores
// DECIMAL(12,2), and no binary floating point is involved anywhere.
type Money int64

// maxMoney is the largest amount DECIMAL(12,2) holds: 9,999,999,999.99.
const maxMoney Money = 999_999_999_999

// parseMoney parses a decimal number, as JSON or PostgreSQL writes it
// ("450000.5", "1e3", "-2", "450000.50"), exactly. It fails with a
// *validationError when the number has more than two decimal places, is not
// positive or does not fit DECIMAL(12,2).
func parseMoney(s string) (Money, error) {
	mantissa, exp := s, 0
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		e, err := strconv.Atoi(s[i+1:])
		if err != nil || e > 100 || e < -100 {
			// Either a giant or a speck; neither is a price, and refusing here
			// keeps the digit arithmetic below small.
			return 0, &validationError{"price is out of range"}
		}
		mantissa, exp = s[:i], e
	}
	negative := strings.HasPrefix(mantissa, "-")
	intPart, frac, _ := strings.Cut(strings.TrimPrefix(mantissa, "-"), ".")
	if !isDigits(intPart) || (frac != "" && !isDigits(frac)) {
		return 0, &validationError{"price must be a decimal number"}
	}
	// The value is digits × 10^shift cents.
	digits := strings.TrimLeft(intPart+frac, "0")
	shift := exp - len(frac) + 2
	if shift < 0 {
		cut := max(len(digits)+shift, 0)
		if strings.Trim(digits[cut:], "0") != "" {
			return 0, &validationError{"price must have at most two decimal places"}
		}
		digits = digits[:cut]
	} else if digits != "" {
		digits += strings.Repeat("0", shift)
	}
	if digits == "" || negative {
		return 0, &validationError{"price must be greater than 0"}
	}
	if len(digits) > len(strconv.FormatInt(int64(maxMoney), 10)) {
		return 0, &validationError{"price must be less than 10000000000"}
	}
	cents, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || Money(cents) > maxMoney {
		return 0, &validationError{"price must be less than 10000000000"}
	}
	return Money(cents), nil
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// String formats m as a decimal with two places, "450000.50", the form
// PostgreSQL parses into DECIMAL(12,2).
func (m Money) String() string {
	return fmt.Sprintf("%d.%02d", m/100, m%100)
}

// MarshalJSON writes m as a JSON number without trailing zeros: 450000.5.
func (m Money) MarshalJSON() ([]byte, error) {
	s := strings.TrimRight(m.String(), "0")
	return []byte(strings.TrimSuffix(s, ".")), nil
}

// UnmarshalJSON accepts only a JSON number, never a string, and parses it
// exactly with parseMoney.
func (m *Money) UnmarshalJSON(b []byte) error {
	if len(b) == 0 || (b[0] != '-' && (b[0] < '0' || b[0] > '9')) {
		return &validationError{"price must be a JSON number"}
	}
	v, err := parseMoney(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// Value hands m to the database as decimal text, so the driver never
// converts it through a float.
func (m Money) Value() (driver.Value, error) {
	return m.String(), nil
}

// Scan reads a DECIMAL(12,2) column, which the driver delivers as text.
func (m *Money) Scan(src any) error {
	var s string
	switch v := src.(type) {
	case string:
		s = v
	case []byte:
		s = string(v)
	default:
		return fmt.Errorf("scan money: unexpected %T", src)
	}
	v, err := parseMoney(s)
	if err != nil {
		return fmt.Errorf("scan money %q: %w", s, err)
	}
	*m = v
	return nil
}

var (
	_ json.Marshaler   = Money(0)
	_ json.Unmarshaler = (*Money)(nil)
	_ driver.Valuer    = Money(0)
	_ sql.Scanner      = (*Money)(nil)
)
