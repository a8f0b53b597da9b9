package main

// Applying a batch of the other region's records: one transaction, written
// here from its first statement to its commit. The consumer (consume.go)
// polls and sorts the records; this is what it does with them:
//
//  1. Lock the rows the batch's events touch (lockForApply), so that no
//     local write slips between the comparison and the write.
//  2. Compare each event with the row under the conflict rule (resolve,
//     conflict.go) and upsert the winners (applyEvents).
//  3. Record the events' request ids, so that a retry in this region is
//     recognised (recordReplicatedRequests); a request written in both
//     regions under one id is a replay, not a conflict (replayedRequests).
//  4. Record the acknowledged writes the batch replaced without building on
//     them: the lost writes (recordConflicts).
//  5. Save the heartbeats' watermarks (lag.go) and where the region now
//     stands in each partition, then commit (commit).
//
// A database that refuses the batch for what is in it (not an outage) gets
// it again, up to maxRefusals times; then the events are applied one by
// one and each one the database refuses goes to the dead-letter topic with
// the reason (applyEach). An outage pauses the consumer: the same batch is
// retried, and nothing is skipped.

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// apply applies a batch's events in one transaction, and returns each
// event's outcome and the writes found lost.
func (c *consumer) apply(ctx context.Context, b batch, partitions int32) ([]outcome, []lostWrite, error) {
	tx, err := c.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("apply batch: %w", err)
	}
	defer tx.Rollback()
	if err := c.checkPositions(ctx, tx, b); err != nil {
		return nil, nil, err
	}
	outcomes, lost, err := applyEvents(ctx, tx, b.events, c.expiredBefore())
	if err != nil {
		return nil, nil, fmt.Errorf("apply batch: %w", err)
	}
	if err := c.commit(ctx, tx, c.withExpired(b, outcomes), partitions); err != nil {
		return nil, nil, fmt.Errorf("apply batch: %w", err)
	}
	return outcomes, lost, nil
}

// expiredBefore is the time before which a write for a listing with no row
// here is not applied (retention.go).
func (c *consumer) expiredBefore() time.Time { return time.Now().Add(-c.retention) }

// withExpired returns b with a dead letter for each of its events that
// outcomes says expired: kept there, with the reason, rather than dropped.
func (c *consumer) withExpired(b batch, outcomes []outcome) batch {
	dead := b.dead[:len(b.dead):len(b.dead)]
	for i, o := range outcomes {
		if o == expired {
			dead = append(dead, c.deadLetter(b.sources[i], fmt.Errorf(
				"older than RETENTION (%v) for a listing this region holds no row of: its tombstone may have been purged", c.retention)))
		}
	}
	b.dead = dead
	return b
}

// maxRefusals is how many times the database may refuse a batch for what is
// in it (refusedByDatabase) before the consumer applies its events one by
// one and sends those the database refuses to the dead-letter queue.
const maxRefusals = 3

// applyEach is apply for a batch the database keeps refusing: each event is
// applied under a savepoint of its own, and one that the database refuses
// (refusedByDatabase) is rolled back and moved from b's events to its dead
// letters, with the database's reason. The rest, and the watermarks, commit
// together as apply's would.
func (c *consumer) applyEach(ctx context.Context, b *batch, partitions int32) ([]outcome, []lostWrite, error) {
	tx, err := c.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("apply events one by one: %w", err)
	}
	defer tx.Rollback()
	if err := c.checkPositions(ctx, tx, *b); err != nil {
		return nil, nil, err
	}
	var (
		outcomes []outcome
		lost     []lostWrite
		kept     batch
		refused  []*kgo.Record
	)
	for i, e := range b.events {
		if _, err := tx.ExecContext(ctx, "SAVEPOINT event"); err != nil {
			return nil, nil, fmt.Errorf("apply events one by one: %w", err)
		}
		o, l, err := applyEvents(ctx, tx, []event{e}, c.expiredBefore())
		switch {
		case refusedByDatabase(err):
			if _, err := tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT event"); err != nil {
				return nil, nil, fmt.Errorf("apply events one by one: %w", err)
			}
			refused = append(refused, c.deadLetter(b.sources[i], fmt.Errorf("refused by the database: %w", err)))
		case err != nil:
			return nil, nil, fmt.Errorf("apply events one by one: %w", err)
		default:
			outcomes, lost = append(outcomes, o...), append(lost, l...)
			kept.events = append(kept.events, e)
			kept.sources = append(kept.sources, b.sources[i])
		}
	}
	kept.watermarks, kept.partitions, kept.next, kept.first = b.watermarks, b.partitions, b.next, b.first
	kept.dead = append(b.dead, refused...)
	if err := c.commit(ctx, tx, c.withExpired(kept, outcomes), partitions); err != nil {
		return nil, nil, fmt.Errorf("apply events one by one: %w", err)
	}
	*b = kept
	return outcomes, lost, nil
}

// deadLetter logs rec's rejection and returns its dead-letter record
// (deadLetterRecord).
func (c *consumer) deadLetter(rec *kgo.Record, reason error) *kgo.Record {
	c.logger.Error("consume: record sent to the dead-letter queue",
		"partition", rec.Partition, "offset", rec.Offset, "reason", reason)
	return deadLetterRecord(rec, reason, c.region, c.dlqTopic)
}

// lockForApplySQL reads and locks the local rows a batch touches, in id
// order (the same order every batch locks in), so that a concurrent local PUT
// of one of them waits for the batch, or the batch for the PUT.
const lockForApplySQL = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted,
       coalesce(request_id, ''), coalesce(parent, '')
FROM properties
WHERE id = ANY($1)
ORDER BY id
FOR UPDATE`

// lockForApply locks and returns the local rows of the events' properties,
// by id.
func lockForApply(ctx context.Context, tx *sql.Tx, events []event) (map[int64]write, error) {
	ids := make([]int64, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.ID)
	}
	rows, err := tx.QueryContext(ctx, lockForApplySQL, ids)
	if err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}
	defer rows.Close()
	local := map[int64]write{}
	for rows.Next() {
		var w write
		if w.Property, err = scanProperty(rows, &w.requestID, &w.parent); err != nil {
			return nil, fmt.Errorf("lock rows: %w", err)
		}
		local[w.ID] = w
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("lock rows: %w", err)
	}
	return local, nil
}

// upsertPropertiesSQL writes the winning rows of a batch, one array per
// column (propertyColumns).
const upsertPropertiesSQL = `
INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, request_id, parent)
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, nullif(request_id, ''), nullif(parent, '')
FROM unnest($1::bigint[], $2::numeric[], $3::integer[], $4::integer[], $5::varchar[], $6::bigint[], $7::timestamptz[], $8::boolean[], $9::text[], $10::text[])
     AS w(id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, request_id, parent)
ON CONFLICT (id) DO UPDATE
SET price         = EXCLUDED.price,
    bedrooms      = EXCLUDED.bedrooms,
    bathrooms     = EXCLUDED.bathrooms,
    region_origin = EXCLUDED.region_origin,
    version       = EXCLUDED.version,
    updated_at    = EXCLUDED.updated_at,
    deleted       = EXCLUDED.deleted,
    request_id    = EXCLUDED.request_id,
    parent        = EXCLUDED.parent`

// applyEvents applies a batch of remote writes inside tx and returns what
// the conflict rule did with each, and the writes it found lost, which it
// has recorded (see above). The rule itself runs in Go (resolve), over the
// locked local rows, event after event; the database then receives the
// winners in one statement and all request ids in another, instead of three
// statements per event. Every request id is recorded, the losers' too: it
// was consumed in the other region whoever won. No outbox row is written: a
// replicated write is not replicated back. A write older than expiredBefore
// for a listing with no row here is expired, and neither it nor its request
// id is written (retention.go); a zero expiredBefore expires nothing.
func applyEvents(ctx context.Context, tx *sql.Tx, events []event, expiredBefore time.Time) ([]outcome, []lostWrite, error) {
	if len(events) == 0 {
		return nil, nil, nil
	}
	local, err := lockForApply(ctx, tx, events)
	if err != nil {
		return nil, nil, err
	}
	replayed, known, err := replayedRequests(ctx, tx, events)
	if err != nil {
		return nil, nil, err
	}
	outcomes := make([]outcome, len(events))
	winners := map[int64]write{}
	var lost []lostWrite
	var builtOn []write // writes recorded lost that a later one turned out to be built on
	kept := events[:0:0]
	for i, e := range events {
		incoming := write{e.Property, e.RequestID, e.Parent}
		current, ok := local[e.ID]
		if !ok && e.UpdatedAt.Before(expiredBefore) {
			outcomes[i] = expired
			continue
		}
		kept = append(kept, e)
		if !ok {
			outcomes[i] = applied
		} else {
			outcomes[i] = resolve(&current.Property, e.Property)
		}
		if replayed[e.RequestID] {
			outcomes[i] = outcomes[i].asReplay()
		}
		switch o := outcomes[i]; {
		case o.replaces():
			if ok && e.Parent != current.tag() {
				if o != replayWon && current.requestID != "" {
					lost = append(lost, lostWrite{lost: current, won: incoming})
				}
				if e.Parent != "" {
					builtOn = append(builtOn, write{Property: Property{ID: e.ID}, parent: e.Parent})
				}
			}
			local[e.ID] = incoming
			winners[e.ID] = incoming
		case o == stale || o == conflictLost:
			if current.parent != incoming.tag() && !known[e.RequestID] {
				lost = append(lost, lostWrite{lost: incoming, won: current})
			}
		}
	}
	if len(winners) > 0 {
		var c propertyColumns
		for _, w := range winners {
			c.addWrite(w.Property, w.requestID, w.parent)
		}
		if _, err := tx.ExecContext(ctx, upsertPropertiesSQL, c.args()...); err != nil {
			return nil, nil, fmt.Errorf("upsert rows: %w", err)
		}
	}
	if len(kept) > 0 {
		if err := recordReplicatedRequests(ctx, tx, kept); err != nil {
			return nil, nil, err
		}
	}
	// The events are the other region's: this one found what they lost.
	if err := recordConflicts(ctx, tx, peerOf(events[0].RegionOrigin), lost, builtOn); err != nil {
		return nil, nil, err
	}
	return outcomes, lost, nil
}

// recordReplicatedRequestsSQL records the request ids that the other region
// consumed, each with its fingerprint and the row its update wrote there (the
// first two arrays are the ids and fingerprints, the others the properties
// table's columns). A redelivered event finds its record there already and
// changes nothing. A request written in both regions finds the record of its
// own write, and the greater of the two under the conflict rule stays, in both
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

// replayedRequestsSQL reads this region's records of the request ids of a batch.
const replayedRequestsSQL = `
SELECT request_id, property_id, version, fingerprint
FROM processed_requests
WHERE request_id = ANY($1)`

// replayedRequests returns the request ids of the events that this region also wrote:
// the same request (id and fingerprint) applied to the same version of the
// same property here. Such a pair is one request replayed in both regions,
// not two concurrent writers. It also returns every request id of the
// events this region already holds a record of, whatever write it made.
func replayedRequests(ctx context.Context, tx *sql.Tx, events []event) (replayed, known map[string]bool, err error) {
	ids := make([]string, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.RequestID)
	}
	rows, err := tx.QueryContext(ctx, replayedRequestsSQL, ids)
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

// commit ends the transaction that applied b's events: it saves the
// heartbeats' watermarks and the position after the batch, writes the dead
// letters, and commits. The dead letters go to Kafka before the commit, so
// that a poison record is never just dropped: once the position is past it,
// nothing reads it again. A commit that fails after them re-delivers the
// batch, and a dead letter may be written twice.
func (c *consumer) commit(ctx context.Context, tx *sql.Tx, b batch, partitions int32) error {
	partitions = max(partitions, b.partitions)
	if partitions > c.declared {
		// More partitions than this region holds watermarks of: hold
		// the new ones where the old ones stood, before this batch moves
		// them (holdNewPartitionsSQL).
		if _, err := tx.ExecContext(ctx, holdNewPartitionsSQL, c.peer, partitions); err != nil {
			return fmt.Errorf("hold new partitions: %w", err)
		}
	}
	for partition, mk := range b.watermarks {
		if _, err := tx.ExecContext(ctx, saveWatermarkSQL, c.peer, partition, partitions, mk.watermark, maxClockSkew.Milliseconds(), mk.seen, mk.bound, mk.echo); err != nil {
			return fmt.Errorf("save watermark: %w", err)
		}
	}
	ahead, err := c.savePositions(ctx, tx, b.next, b.published)
	if err != nil {
		return err
	}
	if len(b.dead) > 0 {
		if err := c.producer.ProduceSync(ctx, b.dead...).FirstErr(); err != nil {
			return fmt.Errorf("dead letters: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	c.declared = max(c.declared, partitions)
	c.ahead = ahead
	return nil
}

// savePositions saves where the region stands in each partition after the
// batch (next), and returns the partitions whose stored position is ahead
// of it: a rejoin moved them past the records a snapshot brought
// (rejoin.go), and the consumer reads on from there (handle). While the
// region waits for a snapshot, nothing is saved, and the batch is refused
// with errRejoining, to be applied after it.
func (c *consumer) savePositions(ctx context.Context, tx *sql.Tx, next, published map[int32]int64) (ahead map[int32]int64, err error) {
	ps, offsets, seqs := make([]int32, 0, len(next)), make([]int64, 0, len(next)), make([]int64, 0, len(next))
	for p, n := range next {
		ps, offsets, seqs = append(ps, p), append(offsets, n), append(seqs, published[p])
	}
	rows, err := tx.QueryContext(ctx, savePositionsSQL, c.topic, ps, offsets, seqs)
	if err != nil {
		return nil, fmt.Errorf("save position: %w", err)
	}
	defer rows.Close()
	saved := 0
	for rows.Next() {
		var p int32
		var stored int64
		if err := rows.Scan(&p, &stored); err != nil {
			return nil, fmt.Errorf("save position: %w", err)
		}
		saved++
		if stored > next[p] {
			if ahead == nil {
				ahead = map[int32]int64{}
			}
			ahead[p] = stored
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("save position: %w", err)
	}
	if saved == 0 {
		return nil, errRejoining
	}
	return ahead, nil
}

// saveWatermarkSQL moves a partition's watermark forward, never back: a
// re-delivered old heartbeat must not make the lag jump. A watermark from the
// future is clamped to this database's clock plus maxClockSkew ($5): kept as
// it came, it would hold the lag at 0 until that future arrived, whatever
// went missing meanwhile. The echo ($6) moves forward too, and is clamped to
// this database's clock without a margin: it is a time of this region's own,
// so a later one is forged. The watermark in this region's clock ($7) and
// the echo it was computed from ($8) are the latest heartbeat's that had
// them, not the greatest: both must come from one heartbeat (lag.go).
const saveWatermarkSQL = `
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, seen, echo_bound, echo_seen, applied_at)
VALUES ($1, $2, $3, LEAST($4, clock_timestamp() + $5 * interval '1 millisecond'), LEAST($6, clock_timestamp()), $7, $8, now())
ON CONFLICT (peer_region, partition) DO UPDATE
SET watermark  = GREATEST(replication_watermarks.watermark, EXCLUDED.watermark),
    seen       = GREATEST(replication_watermarks.seen, EXCLUDED.seen),
    echo_bound = coalesce(EXCLUDED.echo_bound, replication_watermarks.echo_bound),
    echo_seen  = coalesce(EXCLUDED.echo_seen, replication_watermarks.echo_seen),
    partitions = EXCLUDED.partitions,
    applied_at = now()`

// savePositionsSQL moves this region's position in partitions $2 of topic
// $1 to offsets $3, never back: an instance that lost its partitions while
// applying a batch must not undo what the instance that took them over has
// applied since, nor a batch read before a rejoin what the rejoin's
// snapshot brought. It saves nothing while the region waits for a snapshot
// (a rejoin row before its phase 'log'), and returns the positions as they
// stand after it. With them it keeps the highest outbox seq of the peer's
// events applied in each partition ($4), which the peer asks for
// (rejoin.go).
const savePositionsSQL = `
INSERT INTO replication_positions (topic, partition, next_offset, published)
SELECT $1, p.partition, p.next_offset, p.published
FROM unnest($2::int[], $3::bigint[], $4::bigint[]) AS p(partition, next_offset, published)
WHERE NOT EXISTS (SELECT FROM rejoin WHERE phase <> 'log')
ON CONFLICT (topic, partition) DO UPDATE
SET next_offset = GREATEST(replication_positions.next_offset, EXCLUDED.next_offset),
    published   = GREATEST(replication_positions.published, EXCLUDED.published)
RETURNING partition, next_offset`

// holdNewPartitionsSQL gives each partition the peer declares ($2) and this
// region has no watermark of a watermark: the smallest of the others, as
// they stood before the heartbeats that declared it. Every write the peer
// began before that time was published to the old partitions, ahead of the
// heartbeats that vouched for it (the relay places a round's records with
// one count), so the new partitions can only hold later ones. Without it,
// a partition never heard from would leave the lag to a fallback (the time
// since the process started), which understates it for a process restarted
// with a backlog (seen in the fault campaign: 2 s reported, a write 15 s
// old missing). With no watermark at all, nothing is held. The watermark in
// this region's clock held is the smallest too, which only makes the lag
// read higher.
const holdNewPartitionsSQL = `
INSERT INTO replication_watermarks (peer_region, partition, partitions, watermark, echo_bound, echo_seen, applied_at)
SELECT $1, p, $2, w.watermark, w.echo_bound, w.echo_seen, now()
FROM generate_series(0, $2 - 1) AS p,
     (SELECT min(watermark) AS watermark, min(echo_bound) AS echo_bound, min(echo_seen) AS echo_seen
      FROM replication_watermarks WHERE peer_region = $1) AS w
WHERE w.watermark IS NOT NULL
ON CONFLICT (peer_region, partition) DO NOTHING`
