package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestListProperties walks every page of a filtered list and compares what
// it saw with the same filter asked of the database directly.
func TestListProperties(t *testing.T) {
	db := testDB(t)
	srv := testServer(t, "eu", db)
	get := func(query string) (int, Page) {
		t.Helper()
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequest("GET", "/eu/properties?"+query, nil))
		var page Page
		if err := strictUnmarshal(rec.Body.Bytes(), &page); err != nil && rec.Code == http.StatusOK {
			t.Fatalf("GET /eu/properties?%s: body %q: %v", query, rec.Body.String(), err)
		}
		return rec.Code, page
	}

	status, first := get("")
	if status != http.StatusOK || len(first.Items) != defaultPageSize || first.Items[0].ID != 1 || first.NextCursor == nil {
		t.Fatalf("GET /eu/properties = %d, %d items from id %v, cursor %v; want 200, %d from id 1 and a cursor",
			status, len(first.Items), first.Items, first.NextCursor, defaultPageSize)
	}

	filter := url.Values{"min_bedrooms": {"4"}, "region_origin": {"eu"}, "min_price": {"1000000.25"}, "limit": {"7"}}
	var seen []int64
	for pages := 0; ; pages++ {
		status, page := get(filter.Encode())
		if status != http.StatusOK || pages > 1000 {
			t.Fatalf("GET /eu/properties?%s = %d after %d pages", filter.Encode(), status, pages)
		}
		for _, p := range page.Items {
			seen = append(seen, p.ID)
		}
		if page.NextCursor == nil {
			break
		}
		filter.Set("cursor", *page.NextCursor)
	}
	want := queryIDs(t, db, `SELECT id FROM properties WHERE bedrooms >= 4 AND region_origin = 'eu' AND price >= 1000000.25 ORDER BY id`)
	if len(want) < 8 {
		t.Fatalf("the filter matches %d listings; the test needs more than one page of 7", len(want))
	}
	if diff := cmp.Diff(want, seen); diff != "" {
		t.Errorf("the pages of the filtered list (-database +pages):\n%s", diff)
	}
}

// TestListPropertiesReadsABoundedWindow: a filter that matches nothing
// reads at most the window's rows (asked of PostgreSQL's own plan, with
// EXPLAIN ANALYZE) and answers an empty page with a cursor; walking such
// pages with a window of 10 finds what the database finds, and an
// unfiltered page reads no more rows than it shows.
func TestListPropertiesReadsABoundedWindow(t *testing.T) {
	db := testDB(t)
	ctx := context.Background()
	nothing := Money(999999999999)
	lq := listQuery{limit: 50, minPrice: &nothing}
	page, err := listProperties(ctx, db, lq, scanWindow)
	if err != nil || len(page.Items) != 0 || page.NextCursor == nil {
		t.Fatalf("a filter matching nothing: %d items, cursor %v, %v; want an empty page with a cursor", len(page.Items), page.NextCursor, err)
	}
	if id, _ := decodeCursor(*page.NextCursor); id <= lq.afterID {
		t.Errorf("the empty page's cursor goes back to id %d", id)
	}
	// The plans are asked of a table of 100,000 listings (added in the
	// transaction explainAnalyze rolls back), where reading it all would
	// show: on the seed's thousand, reading them all is the planner's
	// right choice.
	many := []string{
		`INSERT INTO properties (id, price, region_origin, version, updated_at)
		 SELECT 10000000 + i, 100, 'us', 1, now() FROM generate_series(1, 100000) AS i`,
		`ANALYZE properties`,
	}
	lq.afterID = 10000000
	for _, tt := range []struct {
		name     string
		lq       listQuery
		mostRows float64
	}{
		// One row more than the window, or than the page and the one that
		// says another follows: row_number() reads one ahead.
		{"matches_nothing", lq, scanWindow + 1},
		{"unfiltered", listQuery{limit: 50, afterID: 10000000}, 52},
	} {
		plan, raw := explainAnalyze(t, db, many, listPropertiesSQL, tt.lq.afterID, tt.lq.minPrice, tt.lq.maxPrice,
			tt.lq.minBedrooms, tt.lq.minBathrooms, tt.lq.regionOrigin, tt.lq.limit+1, scanWindow)
		if most := mostRowsRead(plan, ""); most > tt.mostRows {
			t.Errorf("%s: a plan node read %v rows, want at most %v:\n%s", tt.name, most, tt.mostRows, raw)
		}
	}

	filter := listQuery{limit: 3, minBedrooms: ptr(int32(4)), regionOrigin: ptr("eu")}
	var seen []int64
	for pages := 0; ; pages++ {
		page, err := listProperties(ctx, db, filter, 10)
		if err != nil || pages > 10000 {
			t.Fatalf("page %d: %v", pages, err)
		}
		for _, p := range page.Items {
			seen = append(seen, p.ID)
		}
		if page.NextCursor == nil {
			break
		}
		filter.afterID, _ = decodeCursor(*page.NextCursor)
	}
	want := queryIDs(t, db, `SELECT id FROM properties WHERE bedrooms >= 4 AND region_origin = 'eu' AND NOT deleted ORDER BY id`)
	if diff := cmp.Diff(want, seen); diff != "" {
		t.Errorf("pages of windows of 10 (-database +pages):\n%s", diff)
	}
}

// queryIDs runs a query of ids and returns them, in its order.
func queryIDs(t *testing.T, db *sql.DB, query string) []int64 {
	t.Helper()
	rows, err := db.Query(query)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	return ids
}

// mostRowsRead is the most rows any node of an EXPLAIN (ANALYZE, FORMAT
// JSON) plan read in one loop (those it produced and those its filter
// removed), among the nodes that read relation (a table or an index's
// table; "" for every node).
func mostRowsRead(node map[string]any, relation string) float64 {
	var most float64
	if name, _ := node["Relation Name"].(string); relation == "" || name == relation {
		produced, _ := node["Actual Rows"].(float64)
		removed, _ := node["Rows Removed by Filter"].(float64)
		most = produced + removed
	}
	children, _ := node["Plans"].([]any)
	for _, c := range children {
		if child, ok := c.(map[string]any); ok {
			most = max(most, mostRowsRead(child, relation))
		}
	}
	return most
}

// explainAnalyze runs query under EXPLAIN (ANALYZE, FORMAT JSON) in a
// transaction it rolls back (ANALYZE executes it: a DELETE deletes), after
// the statements of setup in the same transaction, and returns the plan's
// root node and the plan as text.
func explainAnalyze(t *testing.T, db *sql.DB, setup []string, query string, args ...any) (map[string]any, string) {
	t.Helper()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	for _, stmt := range setup {
		if _, err := tx.Exec(stmt); err != nil {
			t.Fatalf("%s: %v", stmt, err)
		}
	}
	var raw []byte
	var plan []struct{ Plan map[string]any }
	err = tx.QueryRow("EXPLAIN (ANALYZE, FORMAT JSON) "+query, args...).Scan(&raw)
	if err == nil {
		err = json.Unmarshal(raw, &plan)
	}
	if err != nil || len(plan) != 1 {
		t.Fatalf("EXPLAIN ANALYZE: %v", err)
	}
	return plan[0].Plan, string(raw)
}

// TestListPropertiesBadInput: every bad parameter is a 400 that names it,
// and the database is never asked (it is unreachable here).
func TestListPropertiesBadInput(t *testing.T) {
	srv := testServer(t, "us", unreachableDB(t))
	tests := []struct{ query, want string }{
		{"limit=0", "limit must be an integer from 1 to 200"},
		{"limit=201", "limit must be an integer from 1 to 200"},
		{"limit=ten", "limit must be an integer from 1 to 200"},
		{"limit=1&limit=2", "limit is given more than once"},
		{"cursor=not-ours", "cursor is not one this service gave out"},
		{"cursor=" + encodeCursor(5)[:4], "cursor is not one this service gave out"},
		{"min_price=1.001", "min_price must be a price: price must have at most two decimal places"},
		{"max_price=-3", "max_price must be a price: price must be greater than 0"},
		{"min_bedrooms=-1", "min_bedrooms must be an integer from 0 to 100"},
		{"min_bathrooms=2.5", "min_bathrooms must be an integer from 0 to 100"},
		{"region_origin=asia", "region_origin must be us or eu"},
		{"colour=red", `unknown parameter "colour" (limit, cursor, min_price, max_price, min_bedrooms, min_bathrooms, region_origin)`},
		{"limit=%zz", "the query string is not valid"},
		// Of two bad parameters, always the first by name.
		{"region_origin=asia&limit=0&min_price=x", "limit must be an integer from 1 to 200"},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			for range 10 { // the same answer every time
				status, _, got := call(t, srv, "GET", "/us/properties?"+tt.query, "", "")
				if diff := cmp.Diff(response{Error: tt.want}, got); status != http.StatusBadRequest || diff != "" {
					t.Fatalf("GET /us/properties?%s = %d, want 400 (-want +got):\n%s", tt.query, status, diff)
				}
			}
		})
	}
}

// FuzzListQuery: any query string is either refused with a 400 naming a
// parameter or parsed into a query within the API's bounds; a cursor
// the service gave out reads back as its id.
func FuzzListQuery(f *testing.F) {
	for _, s := range []string{"", "limit=10", "limit=0", "limit=201", "cursor=aWQ6NTA0", "cursor=%%%", "min_price=1.001",
		"region_origin=mars", "limit=1&limit=2", "max_price=5&min_price=6", "color=red", "min_bedrooms=-1"} {
		f.Add(s, int64(504))
	}
	f.Fuzz(func(t *testing.T, raw string, id int64) {
		if id > 0 {
			if got, err := decodeCursor(encodeCursor(id)); err != nil || got != id {
				t.Fatalf("cursor of %d reads back as %d, %v", id, got, err)
			}
		}
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		lq, err := parseListQuery(q)
		if err != nil {
			if _, ok := err.(*validationError); !ok {
				t.Fatalf("%q: %T %v, want a *validationError", raw, err, err)
			}
			return
		}
		if lq.limit < 1 || lq.limit > 200 || lq.afterID < 0 {
			t.Fatalf("%q: parsed out of bounds: %+v", raw, lq)
		}
	})
}
