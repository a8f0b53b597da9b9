package main

// Money: prices as exact decimals. A float64 cannot hold 0.1, and a listing
// price that drifts by a cent on its way through JSON, Go and SQL is a bug
// somebody pays for. So a price is an integer number of cents from the moment
// its JSON number is parsed (digit by digit, never through a float) until
// PostgreSQL stores it as DECIMAL(12,2), and back.

import (
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

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
