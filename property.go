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

// Error says which version is current.
func (e *versionMismatchError) Error() string {
	return fmt.Sprintf("version mismatch: current version is %d", e.current)
}

// getPropertySQL reads one property; scanProperty reads its columns.
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

// updateProperty applies one client update. It does three things, or
// nothing:
//
//  1. the optimistic update: the row changes only if its version is still the
//     one the client read (UPDATE ... WHERE id = $1 AND version = $2);
//  2. the request id is recorded with the row it wrote (idempotency.go);
//  3. the write is queued in the outbox for replication (replicate.go).
//
// So a request id is consumed only by a successful update, and every committed
// update has exactly one event. The failures, in the contract's order of
// precedence, are *duplicateRequestError, errNotFound and *versionMismatchError;
// any other error comes from the database.
func updateProperty(ctx context.Context, db *sql.DB, region, requestID string, id int64, u propertyUpdate) (Property, error) {
	p, err := scanProperty(db.QueryRowContext(ctx, updatePropertySQL,
		id, u.Version, u.Price, u.Bedrooms, u.Bathrooms, region, requestID))
	switch {
	case err == nil:
		return p, nil
	case errors.Is(err, sql.ErrNoRows):
		return Property{}, explainNoUpdate(ctx, db, requestID, id)
	case isRequestIDTaken(err):
		return Property{}, duplicateRequest(ctx, db, requestID)
	}
	return Property{}, fmt.Errorf("update property %d: %w", id, err)
}

// updatePropertySQL is the whole update in ONE statement. A statement is a
// transaction of its own, so its three parts commit together or not at all,
// and it costs a single round trip to the database.
//
// updated is optimistic locking: the WHERE clause is the version check, and
// the row lock the UPDATE takes makes check and write atomic. A concurrent
// update of the same row waits for this one, then finds the version moved on
// and updates nothing. The write's time is the database's clock.
//
// recorded claims the request id. Its primary key makes a concurrent claim of
// the same id wait for this statement; if this one commits, the other fails
// with a unique violation, which rolls back its whole statement (update
// included) and becomes its 422.
//
// queued puts the write in the outbox for replication.
const updatePropertySQL = `
WITH updated AS (
    UPDATE properties
    SET price         = $3,
        bedrooms      = COALESCE($4, bedrooms),
        bathrooms     = COALESCE($5, bathrooms),
        region_origin = $6,
        version       = version + 1,
        updated_at    = now()
    WHERE id = $1 AND version = $2
    RETURNING id, price, bedrooms, bathrooms, region_origin, version, updated_at
), recorded AS (
    INSERT INTO processed_requests
        (request_id, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at)
    SELECT $7, id, price, bedrooms, bathrooms, region_origin, version, updated_at FROM updated
    RETURNING request_id
), queued AS (
    INSERT INTO outbox (request_id) SELECT request_id FROM recorded
)
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at FROM updated`

// currentVersionSQL tells a missing property from a stale version.
const currentVersionSQL = `SELECT version FROM properties WHERE id = $1`

// explainNoUpdate finds out why updatePropertySQL changed no row, checking the
// reasons in the contract's order: a used request id first, then a missing
// property, then a stale version.
func explainNoUpdate(ctx context.Context, db *sql.DB, requestID string, id int64) error {
	if err := duplicateRequest(ctx, db, requestID); !errors.Is(err, errRequestUnused) {
		return err
	}
	var current int64
	err := db.QueryRowContext(ctx, currentVersionSQL, id).Scan(&current)
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

// isDigits reports whether s is one or more ASCII digits.
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

// Money is what the JSON encoder and database/sql expect of it.
var (
	_ json.Marshaler   = Money(0)
	_ json.Unmarshaler = (*Money)(nil)
	_ driver.Valuer    = Money(0)
	_ sql.Scanner      = (*Money)(nil)
)
