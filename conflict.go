package main

// The conflict rule, and how a batch of the other region's writes is applied
// by it.
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
	"fmt"
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

// lockForApplySQL reads and locks the local rows a batch touches, in id
// order (the same order every batch locks in), so that a concurrent local PUT
// of one of them waits for the batch, or the batch for the PUT.
const lockForApplySQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted
FROM properties
WHERE id = ANY($1)
ORDER BY id
FOR UPDATE`

// upsertPropertiesSQL writes the winning rows of a batch, one array per
// column (propertyColumns).
const upsertPropertiesSQL = `
INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted)
SELECT * FROM unnest($1::bigint[], $2::numeric[], $3::integer[], $4::integer[], $5::varchar[], $6::bigint[], $7::timestamptz[], $8::boolean[])
ON CONFLICT (id) DO UPDATE
SET price         = EXCLUDED.price,
    bedrooms      = EXCLUDED.bedrooms,
    bathrooms     = EXCLUDED.bathrooms,
    region_origin = EXCLUDED.region_origin,
    version       = EXCLUDED.version,
    updated_at    = EXCLUDED.updated_at,
    deleted       = EXCLUDED.deleted`

// applyEvents applies a batch of remote writes inside tx and returns what
// the conflict rule did with each. A write older than expiredBefore for a
// listing with no row here is expired, and neither it nor its request id
// is written (retention.go); a zero expiredBefore expires nothing. The rule itself runs in Go (resolve), over
// the locked local rows, event after event; the database then receives the
// winners in one statement and all request ids in another, instead of three
// statements per event. Every request id is recorded, the losers' too: it
// was consumed in the other region whoever won. No outbox row is written: a
// replicated write is not replicated back.
func applyEvents(ctx context.Context, tx *sql.Tx, events []event, expiredBefore time.Time) ([]outcome, error) {
	if len(events) == 0 {
		return nil, nil
	}
	local, err := lockForApply(ctx, tx, events)
	if err != nil {
		return nil, err
	}
	replayed, err := twins(ctx, tx, events)
	if err != nil {
		return nil, err
	}
	outcomes := make([]outcome, len(events))
	winners := map[int64]Property{}
	kept := events[:0:0]
	for i, e := range events {
		var current *Property
		if p, ok := local[e.ID]; ok {
			current = &p
		}
		if current == nil && e.UpdatedAt.Before(expiredBefore) {
			outcomes[i] = expired
			continue
		}
		kept = append(kept, e)
		outcomes[i] = resolve(current, e.Property)
		if replayed[e.RequestID] {
			outcomes[i] = outcomes[i].asReplay()
		}
		if outcomes[i].replaces() {
			local[e.ID] = e.Property
			winners[e.ID] = e.Property
		}
	}
	if len(winners) > 0 {
		var c propertyColumns
		for _, p := range winners {
			c.add(p)
		}
		if _, err := tx.ExecContext(ctx, upsertPropertiesSQL, c.args()...); err != nil {
			return nil, fmt.Errorf("upsert rows: %w", err)
		}
	}
	if len(kept) > 0 {
		if err := recordReplicatedRequests(ctx, tx, kept); err != nil {
			return nil, err
		}
	}
	return outcomes, nil
}

// lockForApply locks and returns the local rows of the events' properties,
// by id.
func lockForApply(ctx context.Context, tx *sql.Tx, events []event) (map[int64]Property, error) {
	ids := make([]int64, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.ID)
	}
	rows, err := tx.QueryContext(ctx, lockForApplySQL, ids)
	if err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}
	defer rows.Close()
	local := map[int64]Property{}
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			return nil, fmt.Errorf("lock rows: %w", err)
		}
		local[p.ID] = p
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}
	return local, nil
}
