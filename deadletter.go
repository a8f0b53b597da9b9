package main

// The dead-letter queue: where the consumer puts a record it cannot apply,
// with the reason, so that one bad record neither stops replication nor
// vanishes. Two kinds go there: a record that cannot be decoded or breaks
// the rules (decodeMessage), and an event the database refuses for what it
// holds, after maxRefusals tries (applyEach). An outage is neither: it
// pauses consumption, and nothing is skipped.

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/twmb/franz-go/pkg/kgo"
)

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
	kept.watermarks, kept.partitions, kept.next = b.watermarks, b.partitions, b.next
	kept.dead = append(b.dead, refused...)
	if err := c.commit(ctx, tx, c.withExpired(kept, outcomes), partitions); err != nil {
		return nil, nil, fmt.Errorf("apply events one by one: %w", err)
	}
	*b = kept
	return outcomes, lost, nil
}

// refusedByDatabase reports whether err is PostgreSQL refusing what an event
// holds (SQLSTATE class 22, data exception, or 23, integrity constraint
// violation): trying the same event again changes nothing. Every other
// failure, an outage above all, is worth retrying.
func refusedByDatabase(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}

// deadLetter returns the dead-letter record for rec: the original key, value
// and headers, plus why it was rejected and where it came from.
func (c *consumer) deadLetter(rec *kgo.Record, reason error) *kgo.Record {
	c.logger.Error("consume: record sent to the dead-letter queue",
		"partition", rec.Partition, "offset", rec.Offset, "reason", reason)
	headers := append([]kgo.RecordHeader(nil), rec.Headers...)
	headers = append(headers,
		kgo.RecordHeader{Key: headerReason, Value: []byte(reason.Error())},
		kgo.RecordHeader{Key: "source", Value: fmt.Appendf(nil, "%s/%d/%d", rec.Topic, rec.Partition, rec.Offset)},
		kgo.RecordHeader{Key: "rejected-by", Value: []byte(c.region)},
	)
	return &kgo.Record{Topic: c.dlqTopic, Key: rec.Key, Value: rec.Value, Headers: headers}
}
