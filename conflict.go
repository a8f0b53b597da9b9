package main

// The conflict rule, and the lost writes it leaves: how they are recorded
// and served at GET /{region}/conflicts. The batch it judges is applied in
// apply.go.
//
// Both regions accept writes, so the same listing can be changed in US and EU
// at the same moment: both start from version 3 and both make a version 4.
// Each region then receives the other's version 4. The rule, the same in
// every region: an incoming write replaces the local row only if it is
// greater under (version, updated_at, region_origin), compared in that
// order. That is a total order on writes (a region never writes the same
// version of a row twice, so no two different writes compare equal), and a
// row only ever moves up in it. So every region ends with the greatest write
// it has seen, and once both have seen all writes they hold the same row,
// whatever order the events arrived in.

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"time"
)

// compareWrites orders two writes of one property under the conflict rule:
// by version, then updated_at, then region_origin (bytewise, so on a full
// tie "us" beats "eu"). It returns -1, 0 or +1. Both regions use this same
// total order, which is why they converge.
func compareWrites(a, b Property) int {
	if c := cmp.Compare(a.Version, b.Version); c != 0 {
		return c
	}
	// Microseconds: the database's precision, and so the events'.
	if c := cmp.Compare(a.UpdatedAt.UnixMicro(), b.UpdatedAt.UnixMicro()); c != 0 {
		return c
	}
	return cmp.Compare(a.RegionOrigin, b.RegionOrigin)
}

// outcome is what applying a remote write did to the local row.
type outcome int

// The outcomes of resolve.
const (
	applied   outcome = iota // the incoming write is the successor of the local row
	duplicate                // the local row already is this write: a redelivery
	stale                    // the local row is a later version: an old event
	// conflictWon and conflictLost are two concurrent writes of the same
	// version, made in different regions; one of them is lost.
	conflictWon  // the incoming write replaced a concurrent local one
	conflictLost // the incoming write lost to a concurrent local one
	// replayWon and replayLost are the same, but both writes were one
	// request, replayed in the second region (idempotency.go): nothing a
	// client meant was lost.
	replayWon
	replayLost
	// expired is a write older than RETENTION for a listing this region
	// holds no row of: its tombstone may have been purged (retention.go),
	// so it is not applied.
	expired
)

// String names the outcome, for logs and test failures.
func (o outcome) String() string {
	switch o {
	case applied:
		return "applied"
	case duplicate:
		return "duplicate"
	case stale:
		return "stale"
	case conflictWon:
		return "conflict won"
	case conflictLost:
		return "conflict lost"
	case replayWon:
		return "replay won"
	case replayLost:
		return "replay lost"
	case expired:
		return "expired"
	}
	return fmt.Sprintf("outcome(%d)", int(o))
}

// replaces reports whether an outcome writes the incoming row.
func (o outcome) replaces() bool { return o == applied || o == conflictWon || o == replayWon }

// asReplay is the outcome of a conflict between the two writes of one
// request replayed in both regions; any other outcome stays as it is.
func (o outcome) asReplay() outcome {
	switch o {
	case conflictWon:
		return replayWon
	case conflictLost:
		return replayLost
	}
	return o
}

// resolve decides what the conflict rule does with an incoming write, given
// the local row (nil if there is none). It is a pure function: the whole rule
// is here, and the database only carries out its verdict.
func resolve(local *Property, incoming Property) outcome {
	if local == nil {
		return applied
	}
	c := compareWrites(incoming, *local)
	switch {
	case c == 0:
		return duplicate
	case incoming.Version == local.Version && c > 0:
		return conflictWon
	case incoming.Version == local.Version:
		return conflictLost
	case c > 0:
		return applied
	}
	return stale
}

// write is one write of a listing: the row it made, the request that made it
// and the state it was built on ("" where unknown: a seed, or a row older
// than the columns that say).
type write struct {
	Property
	requestID, parent string
}

// tag names the state w made, as its ETag does.
func (w write) tag() string { return tagValue(w.Version, w.RegionOrigin) }

// ConflictWrite is a write as a conflict record shows it: the listing's
// state it made, as GET shows a listing ("deleted": true for a delete), the
// request that made it (null where unknown: a seed), and the state it was
// built on (null for a create or where unknown).
type ConflictWrite struct {
	Property
	RequestID *string `json:"request_id"`
	Parent    *string `json:"parent"`
}

// shown is w as a conflict record shows it.
func (w write) shown() ConflictWrite {
	c := ConflictWrite{Property: w.Property}
	if w.requestID != "" {
		c.RequestID = &w.requestID
	}
	if w.parent != "" {
		c.Parent = &w.parent
	}
	return c
}

// lostWrite is an acknowledged write found lost, and the write that won.
type lostWrite struct {
	lost, won write
}

// A write is lost when the listing ends with a write not built on it: the
// conflict rule replaced it by a write of the other region that never saw
// it, or it arrived here after such a write won. Equal versions are the
// common case, but not the only one: EU writes A (1 to 2), US writes B (1 to
// 2) and EU then C (2 to 3) on A; in EU, B arrives after C and is merely
// old, yet nothing built on B survives. The events say what each write was
// built on (event.Parent), and the rows too (properties.parent), so:
//
//   - an incoming write that replaces the local one without naming it as
//     its parent loses the local one;
//   - an incoming write that does not replace the local one is lost, unless
//     the local one names it as its parent, or this region has seen its
//     request before (a redelivery, judged the first time; or a replay of
//     one request in both regions, which loses nothing the client meant).
//
// A later write may still turn out to be built on a write recorded as lost
// here (B, and then B's successor arriving after A won): its record goes.
// The lost write's request id is the record's key, so a redelivery records
// nothing twice. A region records what it finds; the other region may find
// the same loss from its side, and records it too.

// Conflict is one lost write as GET /{region}/conflicts shows it: the
// write lost, the write that won, and where and when it was found.
type Conflict struct {
	ID         int64         `json:"id"`
	PropertyID int64         `json:"property_id"`
	Lost       ConflictWrite `json:"lost"`
	Won        ConflictWrite `json:"won"`
	FoundIn    string        `json:"found_in"`
	FoundAt    time.Time     `json:"found_at"`
}

// ConflictPage is the body of GET /{region}/conflicts: newest first;
// NextCursor is null on the last page.
type ConflictPage struct {
	Items      []Conflict `json:"items"`
	NextCursor *string    `json:"next_cursor"`
}

// parseConflictQuery reads the page size and the cursor (the record after
// which the page starts, newest first), as parseListQuery does for
// listings; 0 for no cursor.
func parseConflictQuery(q url.Values) (limit int, before int64, err error) {
	limit = defaultPageSize
	for name, values := range q {
		if len(values) > 1 {
			return 0, 0, &validationError{fmt.Sprintf("%s is given more than once", name)}
		}
		v := values[0]
		switch name {
		case "limit":
			limit, err = strconv.Atoi(v)
			if err != nil || limit < 1 || limit > maxPageSize || strconv.Itoa(limit) != v {
				err = fmt.Errorf("limit must be an integer from 1 to %d", maxPageSize)
			}
		case "cursor":
			before, err = decodeCursor(v)
		default:
			err = fmt.Errorf("unknown parameter %q (limit, cursor)", name)
		}
		if err != nil {
			return 0, 0, &validationError{err.Error()}
		}
	}
	return limit, before, nil
}

// listConflictsSQL reads one page of records newest first, before seq $1
// (0: from the newest), one more than asked for ($2).
const listConflictsSQL = `
SELECT seq, property_id, lost, won, found_in, found_at
FROM conflicts
WHERE $1 = 0 OR seq < $1
ORDER BY seq DESC
LIMIT $2`

// listConflicts returns the page of conflict records before the record
// before (0: the newest page).
func listConflicts(ctx context.Context, db *sql.DB, limit int, before int64) (ConflictPage, error) {
	rows, err := db.QueryContext(ctx, listConflictsSQL, before, limit+1)
	if err != nil {
		return ConflictPage{}, fmt.Errorf("list conflicts: %w", err)
	}
	defer rows.Close()
	page := ConflictPage{Items: []Conflict{}}
	for rows.Next() {
		var c Conflict
		var lost, won []byte
		if err := rows.Scan(&c.ID, &c.PropertyID, &lost, &won, &c.FoundIn, &c.FoundAt); err != nil {
			return ConflictPage{}, fmt.Errorf("list conflicts: %w", err)
		}
		if err := errors.Join(json.Unmarshal(lost, &c.Lost), json.Unmarshal(won, &c.Won)); err != nil {
			return ConflictPage{}, fmt.Errorf("list conflicts: record %d: %w", c.ID, err)
		}
		c.FoundAt = c.FoundAt.UTC()
		page.Items = append(page.Items, c)
	}
	if err := rows.Err(); err != nil {
		return ConflictPage{}, fmt.Errorf("list conflicts: %w", err)
	}
	if len(page.Items) > limit {
		page.Items = page.Items[:limit]
		next := encodeCursor(page.Items[limit-1].ID)
		page.NextCursor = &next
	}
	return page, nil
}

// recordConflictsSQL records lost writes, each once; found_in is the region
// that found them, the one the events came to ($6).
const recordConflictsSQL = `
INSERT INTO conflicts (property_id, lost_request_id, lost_tag, lost, won, found_in)
SELECT property_id, lost_request_id, lost_tag, lost, won, $6
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[])
     AS c(property_id, lost_request_id, lost_tag, lost, won)
ON CONFLICT (lost_request_id) DO NOTHING`

// forgetBuiltOnSQL deletes the records of writes, by listing and tag, that a
// later write was built on after all.
const forgetBuiltOnSQL = `
DELETE FROM conflicts
WHERE (property_id, lost_tag) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))`

// recordConflicts records the lost writes of a batch, found in region, and
// forgets the records of writes a write of the batch was built on.
func recordConflicts(ctx context.Context, tx *sql.Tx, region string, lost []lostWrite, builtOn []write) error {
	if len(builtOn) > 0 {
		ids, tags := make([]int64, len(builtOn)), make([]string, len(builtOn))
		for i, w := range builtOn {
			ids[i], tags[i] = w.ID, w.parent
		}
		if _, err := tx.ExecContext(ctx, forgetBuiltOnSQL, ids, tags); err != nil {
			return fmt.Errorf("forget conflicts built on: %w", err)
		}
	}
	if len(lost) == 0 {
		return nil
	}
	var (
		ids               []int64
		requestIDs, tags  []string
		lostJSON, wonJSON []string
	)
	for _, l := range lost {
		ids = append(ids, l.lost.ID)
		requestIDs = append(requestIDs, l.lost.requestID)
		tags = append(tags, l.lost.tag())
		lostB, err := json.Marshal(l.lost.shown())
		if err != nil {
			return fmt.Errorf("record conflicts: %w", err)
		}
		wonB, err := json.Marshal(l.won.shown())
		if err != nil {
			return fmt.Errorf("record conflicts: %w", err)
		}
		lostJSON, wonJSON = append(lostJSON, string(lostB)), append(wonJSON, string(wonB))
	}
	if _, err := tx.ExecContext(ctx, recordConflictsSQL, ids, requestIDs, tags, lostJSON, wonJSON, region); err != nil {
		return fmt.Errorf("record conflicts: %w", err)
	}
	return nil
}
