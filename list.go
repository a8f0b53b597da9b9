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
//
// A page also reads a bounded number of rows, whatever the filters: at most
// scanWindow ids after the cursor. A filter that matches almost nothing
// would otherwise walk the whole table to fill a page (a million rows for
// an empty answer, as often as a client may ask). When the window ends
// before the page is full, the page is short, or empty, and its cursor is
// the last id the window read: the next page goes on from there. So a
// short page with a cursor is not the end; only a null cursor is.

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strconv"
	"time"
)

// Page sizes, and the most rows one page reads (scanWindow): five of the
// largest pages.
const (
	defaultPageSize = 50
	maxPageSize     = 200
	scanWindow      = 1000
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
// last page; a page may be short, or empty, and still have one (above).
type Page struct {
	Items      []Property `json:"items"`
	NextCursor *string    `json:"next_cursor"`
	// readAt is the database's clock after the page's snapshot was taken:
	// the page shows no write that began after it (session.go).
	readAt time.Time
}

// parseListQuery validates the query string. A parameter that is unknown,
// repeated or invalid is a *validationError that names it; of several, the
// first by name, so that one query always gets the same answer.
func parseListQuery(q url.Values) (listQuery, error) {
	lq := listQuery{limit: defaultPageSize}
	for _, name := range slices.Sorted(maps.Keys(q)) {
		values := q[name]
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

// listPropertiesSQL reads one page: the live rows that pass the filters (a
// filter that is NULL is off) among the first $8 (scanWindow) ids after $1,
// at most $7 of them (one more than the page, to know whether another
// follows), and the window's last row whatever it holds, marked by n = $8,
// so that a page the window cut short knows where to go on from. The
// window is a LIMIT below the filters and row_number() streams, so a page
// the filters fill early stops reading there. A filter on a NULL column
// (bedrooms unknown) does not match. Each row carries the clock as the
// statement ran, after its snapshot was taken (Page.readAt).
const listPropertiesSQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, matches, n, clock_timestamp()
FROM (
    SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted,
           coalesce(NOT deleted
             AND ($2::numeric IS NULL OR price >= $2)
             AND ($3::numeric IS NULL OR price <= $3)
             AND ($4::integer IS NULL OR bedrooms >= $4)
             AND ($5::integer IS NULL OR bathrooms >= $5)
             AND ($6::varchar IS NULL OR region_origin = $6), false) AS matches,
           row_number() OVER (ORDER BY id) AS n
    FROM properties
    WHERE id > $1
    ORDER BY id
    LIMIT $8
) AS scanned
WHERE matches OR n = $8
ORDER BY id
LIMIT $7`

// listProperties returns the page lq asks for, having read at most window
// rows.
func listProperties(ctx context.Context, db *sql.DB, lq listQuery, window int) (Page, error) {
	rows, err := db.QueryContext(ctx, listPropertiesSQL, lq.afterID, lq.minPrice, lq.maxPrice,
		lq.minBedrooms, lq.minBathrooms, lq.regionOrigin, lq.limit+1, window)
	if err != nil {
		return Page{}, fmt.Errorf("list properties: %w", err)
	}
	defer rows.Close()
	page := Page{Items: []Property{}}
	var windowEnd int64 // the window's last id, when the window was full
	for rows.Next() {
		var (
			matches bool
			n       int
		)
		p, err := scanProperty(rows, &matches, &n, &page.readAt)
		if err != nil {
			return Page{}, fmt.Errorf("list properties: %w", err)
		}
		if matches {
			page.Items = append(page.Items, p)
		}
		if n == window {
			windowEnd = p.ID
		}
	}
	if err := rows.Err(); err != nil {
		return Page{}, fmt.Errorf("list properties: %w", err)
	}
	if page.readAt.IsZero() {
		// Nothing after the cursor: the clock comes on its own.
		if err := db.QueryRowContext(ctx, `SELECT clock_timestamp()`).Scan(&page.readAt); err != nil {
			return Page{}, fmt.Errorf("list properties: %w", err)
		}
	}
	var next string
	switch {
	case len(page.Items) > lq.limit:
		page.Items = page.Items[:lq.limit]
		next = encodeCursor(page.Items[lq.limit-1].ID)
	case windowEnd != 0:
		next = encodeCursor(windowEnd)
	default:
		return page, nil // the last page
	}
	page.NextCursor = &next
	return page, nil
}
