package main

// Finding listings: GET /{region}/properties answers one page of listings in
// id order, filtered, with a cursor to the next page.
//
// Keyset pagination: the cursor names the last id of the page, and the next
// page is "WHERE id > cursor ORDER BY id LIMIT n", which the primary key's
// index answers by starting where the last page stopped. OFFSET would make
// the database walk past every earlier row again, so the millionth page would
// cost a million rows; and rows added or removed meanwhile would shift an
// offset, not an id.

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
)

// Page sizes.
const (
	defaultPageSize = 50
	maxPageSize     = 200
)

// listQuery is a validated list request: the page size, where the page
// starts (after the id afterID) and the filters, nil where not given.
type listQuery struct {
	limit                     int
	afterID                   int64
	minPrice, maxPrice        *Money
	minBedrooms, minBathrooms *int32
	regionOrigin              *string
}

// Page is the body of GET /{region}/properties. NextCursor is null on the
// last page.
type Page struct {
	Items      []Property `json:"items"`
	NextCursor *string    `json:"next_cursor"`
}

// parseListQuery validates the query string. A parameter that is unknown,
// repeated or invalid is a *validationError that names it.
func parseListQuery(q url.Values) (listQuery, error) {
	lq := listQuery{limit: defaultPageSize}
	for name, values := range q {
		if len(values) > 1 {
			return listQuery{}, &validationError{fmt.Sprintf("%s is given more than once", name)}
		}
		v := values[0]
		var err error
		switch name {
		case "limit":
			lq.limit, err = strconv.Atoi(v)
			if err != nil || lq.limit < 1 || lq.limit > maxPageSize || strconv.Itoa(lq.limit) != v {
				err = fmt.Errorf("limit must be an integer from 1 to %d", maxPageSize)
			}
		case "cursor":
			lq.afterID, err = decodeCursor(v)
		case "min_price", "max_price":
			var m Money
			if m, err = parseMoney(v); err == nil {
				if name == "min_price" {
					lq.minPrice = &m
				} else {
					lq.maxPrice = &m
				}
			} else {
				err = fmt.Errorf("%s must be a price: %w", name, err)
			}
		case "min_bedrooms", "min_bathrooms":
			n, perr := strconv.Atoi(v)
			if perr != nil || n < 0 || n > maxRooms || strconv.Itoa(n) != v {
				err = fmt.Errorf("%s must be an integer from 0 to %d", name, maxRooms)
				break
			}
			rooms := int32(n)
			if name == "min_bedrooms" {
				lq.minBedrooms = &rooms
			} else {
				lq.minBathrooms = &rooms
			}
		case "region_origin":
			if !validRegion(v) {
				err = errors.New("region_origin must be us or eu")
			}
			lq.regionOrigin = &v
		default:
			err = fmt.Errorf("unknown parameter %q (limit, cursor, min_price, max_price, min_bedrooms, min_bathrooms, region_origin)", name)
		}
		if err != nil {
			return listQuery{}, &validationError{err.Error()}
		}
	}
	return lq, nil
}

// encodeCursor and decodeCursor make the last id of a page into the opaque
// cursor of the next, and back. Opaque so that clients pass it on rather
// than build it: how pages are cut may change.
func encodeCursor(lastID int64) string {
	return base64.RawURLEncoding.EncodeToString([]byte("id:" + strconv.FormatInt(lastID, 10)))
}

// decodeCursor is encodeCursor's inverse; anything else is an error.
func decodeCursor(c string) (int64, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err == nil && len(b) > 3 && string(b[:3]) == "id:" {
		if id, err := parseID(string(b[3:])); err == nil {
			return id, nil
		}
	}
	return 0, errors.New("cursor is not one this service gave out")
}

// listPropertiesSQL reads one page, one row more than asked for, to know
// whether another page follows. A filter that is NULL is off.
const listPropertiesSQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted
FROM properties
WHERE id > $1 AND NOT deleted
  AND ($2::numeric IS NULL OR price >= $2)
  AND ($3::numeric IS NULL OR price <= $3)
  AND ($4::integer IS NULL OR bedrooms >= $4)
  AND ($5::integer IS NULL OR bathrooms >= $5)
  AND ($6::varchar IS NULL OR region_origin = $6)
ORDER BY id
LIMIT $7`

// listProperties returns the page lq asks for.
func listProperties(ctx context.Context, db *sql.DB, lq listQuery) (Page, error) {
	rows, err := db.QueryContext(ctx, listPropertiesSQL, lq.afterID, lq.minPrice, lq.maxPrice,
		lq.minBedrooms, lq.minBathrooms, lq.regionOrigin, lq.limit+1)
	if err != nil {
		return Page{}, fmt.Errorf("list properties: %w", err)
	}
	defer rows.Close()
	page := Page{Items: []Property{}}
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			return Page{}, fmt.Errorf("list properties: %w", err)
		}
		page.Items = append(page.Items, p)
	}
	if err := rows.Err(); err != nil {
		return Page{}, fmt.Errorf("list properties: %w", err)
	}
	if len(page.Items) > lq.limit {
		page.Items = page.Items[:lq.limit]
		next := encodeCursor(page.Items[lq.limit-1].ID)
		page.NextCursor = &next
	}
	return page, nil
}
