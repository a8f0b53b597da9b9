package main

// The snapshot: what a region that rejoins (rejoin.go) copies from its
// peer. The peer's backend serves it at GET /internal/snapshot/{region},
// {region} being the region that asks, on the listener NGINX forwards only
// /us/ and /eu/ to, so no client reaches it. Over HTTP from the peer's
// backend, rather than from the peer's database or a state topic: the
// peer's database stays behind its own service, with no credentials shared
// across regions; the snapshot is one transaction there, consistent by
// construction; and the broker, which carries every write already, is not
// asked to keep a second copy of every listing (docs/decisions.md).
//
// A snapshot is consistent with the log by its low watermark. Before its
// transaction begins, the peer reads the end of every partition of the
// topic (low). Every event below it was published, so committed, before the
// transaction began, and is in the snapshot; every write committed after
// the transaction began is published after it, at or above low. So a
// region that copies the snapshot and then reads the log from low on misses
// no write, and a write both in the snapshot and above low is applied
// twice, which the conflict rule makes harmless.
//
// The body is JSON lines: a header, the listings (tombstones included),
// the request records, and an end line with the counts, without which the
// copy is incomplete (a peer that stopped in the middle).

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"
)

// snapshotHeader is the first line of a snapshot.
type snapshotHeader struct {
	Topic string `json:"topic"`
	// Low is the end of each partition, read before the snapshot's
	// transaction began (see above).
	Low map[int32]int64 `json:"low"`
	// Applied is the peer's own position in each partition as of the
	// snapshot: the asking region's events at or above it may not be in
	// the snapshot yet (rejoin.go reads them from the log).
	Applied map[int32]int64 `json:"applied"`
	// Published is the highest outbox seq of the asking region's events
	// that the peer has applied (event.seq).
	Published int64 `json:"published"`
}

// copiedRequest is a request record as a snapshot carries it: the write it
// made, and the request's fingerprint.
type copiedRequest struct {
	event
	Fingerprint string `json:"fingerprint"`
}

// snapshotEnd is the last line of a complete snapshot.
type snapshotEnd struct {
	Listings int64 `json:"listings"`
	Requests int64 `json:"requests"`
}

// snapshotLine is one line of a snapshot: exactly one of its fields is set.
type snapshotLine struct {
	Header  *snapshotHeader `json:"header,omitempty"`
	Listing *event          `json:"listing,omitempty"`
	Request *copiedRequest  `json:"request,omitempty"`
	End     *snapshotEnd    `json:"end,omitempty"`
}

// The snapshot's reads, all in one REPEATABLE READ transaction.
const (
	snapshotAppliedSQL   = `SELECT partition, next_offset FROM replication_positions WHERE topic = $1`
	snapshotPublishedSQL = `SELECT coalesce(max(published), 0) FROM replication_positions WHERE topic = $1`
	snapshotListingsSQL  = `
SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted,
       coalesce(request_id, ''), coalesce(parent, '')
FROM properties`
	snapshotRequestsSQL = `
SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted,
       request_id, fingerprint, coalesce(parent, '')
FROM processed_requests`
)

// handleSnapshot serves this region's snapshot to the region that asks
// ({region}): see the top of this file. ends reads the end of each
// partition of the topic. The snapshot reads on db, the replication's
// pool, so that no client request waits for a connection it holds.
func handleSnapshot(logger *slog.Logger, db *sql.DB, topic string, ends func(context.Context) (map[int32]int64, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asking := r.PathValue("region")
		if !validRegion(asking) {
			encodeError(w, r, logger, errUnknownRegion)
			return
		}
		ctx := r.Context()
		low, err := ends(ctx)
		if err != nil {
			logger.Warn("snapshot: the topic's ends could not be read", "err", err)
			encode(w, http.StatusServiceUnavailable, errorBody{Error: "the topic cannot be read: no snapshot without its low watermark"})
			return
		}
		tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		defer tx.Rollback()
		h := snapshotHeader{Topic: topic, Low: low, Applied: map[int32]int64{}}
		if err := readSnapshotHeader(ctx, tx, asking, &h); err != nil {
			encodeError(w, r, logger, err)
			return
		}
		// The body takes as long as the tables: no write deadline.
		if err := http.NewResponseController(w).SetWriteDeadline(time.Time{}); err != nil {
			encodeError(w, r, logger, err)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		start := time.Now()
		end, err := writeSnapshot(ctx, tx, w, h)
		if err != nil {
			// The status is sent: the missing end line tells the other side.
			logger.Warn("snapshot: cut short", "for", asking, "err", err)
			return
		}
		logger.Info("snapshot served", "for", asking, "listings", end.Listings, "requests", end.Requests,
			"low", low, "took", time.Since(start).Round(time.Millisecond).String())
	})
}

// readSnapshotHeader reads, as the snapshot's first statements, this
// region's position in the topic and the highest published seq of asking
// that it has seen.
func readSnapshotHeader(ctx context.Context, tx *sql.Tx, asking string, h *snapshotHeader) error {
	// The snapshot's statements run as long as the tables are large.
	if _, err := tx.ExecContext(ctx, `SET LOCAL statement_timeout = 0`); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	rows, err := tx.QueryContext(ctx, snapshotAppliedSQL, h.Topic)
	if err != nil {
		return fmt.Errorf("snapshot positions: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var p int32
		var next int64
		if err := rows.Scan(&p, &next); err != nil {
			return fmt.Errorf("snapshot positions: %w", err)
		}
		h.Applied[p] = next
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("snapshot positions: %w", err)
	}
	if err := tx.QueryRowContext(ctx, snapshotPublishedSQL, h.Topic).Scan(&h.Published); err != nil {
		return fmt.Errorf("snapshot published: %w", err)
	}
	return nil
}

// writeSnapshot writes the snapshot's lines to w: h, every listing, every
// request record and the end line.
func writeSnapshot(ctx context.Context, tx *sql.Tx, w io.Writer, h snapshotHeader) (snapshotEnd, error) {
	buf := bufio.NewWriterSize(w, 64<<10)
	enc := json.NewEncoder(buf)
	var end snapshotEnd
	if err := enc.Encode(snapshotLine{Header: &h}); err != nil {
		return end, err
	}
	rows, err := tx.QueryContext(ctx, snapshotListingsSQL)
	if err != nil {
		return end, err
	}
	for rows.Next() {
		var e event
		if e.Property, err = scanProperty(rows, &e.RequestID, &e.Parent); err != nil {
			rows.Close()
			return end, err
		}
		if err := enc.Encode(snapshotLine{Listing: &e}); err != nil {
			rows.Close()
			return end, err
		}
		end.Listings++
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return end, err
	}
	if rows, err = tx.QueryContext(ctx, snapshotRequestsSQL); err != nil {
		return end, err
	}
	defer rows.Close()
	for rows.Next() {
		var c copiedRequest
		if c.Property, err = scanProperty(rows, &c.RequestID, &c.Fingerprint, &c.Parent); err != nil {
			return end, err
		}
		if err := enc.Encode(snapshotLine{Request: &c}); err != nil {
			return end, err
		}
		end.Requests++
	}
	if err := rows.Err(); err != nil {
		return end, err
	}
	if err := enc.Encode(snapshotLine{End: &end}); err != nil {
		return end, err
	}
	return end, buf.Flush()
}

// snapshotReader reads a snapshot's lines in batches.
type snapshotReader struct {
	dec    *json.Decoder
	header snapshotHeader
	end    *snapshotEnd
	// next is a line read ahead: the first of the next section.
	next *snapshotLine
	// listings and requests count the lines read, to check the end line.
	listings, requests int64
}

// newSnapshotReader reads the header of the snapshot in body.
func newSnapshotReader(body io.Reader) (*snapshotReader, error) {
	s := &snapshotReader{dec: json.NewDecoder(bufio.NewReaderSize(body, 64<<10))}
	var first snapshotLine
	if err := s.dec.Decode(&first); err != nil {
		return nil, fmt.Errorf("snapshot header: %w", err)
	}
	if first.Header == nil || first.Header.Low == nil {
		return nil, errors.New("snapshot: the first line is not a header")
	}
	s.header = *first.Header
	return s, nil
}

// errSnapshotCut is a snapshot that ended without its end line, or whose
// end line does not count what came.
var errSnapshotCut = errors.New("snapshot cut short")

// batch returns up to n of the listings, then up to n of the request
// records (as events with their fingerprints), and nil, nil once the end
// line is read. Each listing and record is validated as an event is.
func (s *snapshotReader) batch(n int) (listings, requests []event, err error) {
	for len(listings)+len(requests) < n {
		line := s.next
		s.next = nil
		if line == nil {
			line = &snapshotLine{}
			if err := s.dec.Decode(line); err != nil {
				return nil, nil, fmt.Errorf("%w: %v", errSnapshotCut, err)
			}
		}
		switch {
		case line.Listing != nil:
			if len(requests) > 0 {
				return nil, nil, errors.New("snapshot: a listing after the request records")
			}
			if err := line.Listing.validateState(); err != nil {
				return nil, nil, fmt.Errorf("snapshot listing: %w", err)
			}
			listings = append(listings, *line.Listing)
			s.listings++
		case line.Request != nil:
			if len(listings) > 0 {
				s.next = line // a batch holds one section
				return listings, nil, nil
			}
			e := line.Request.event
			e.fingerprint = line.Request.Fingerprint
			// The fingerprint is copied as the peer holds it, not checked
			// as an event's is: a record written before the fingerprint's
			// form, or by hand, must not stop a rebuild for good.
			if err := e.validateState(); err != nil || !validRequestID(e.RequestID) || e.fingerprint == "" || len(e.fingerprint) > 256 {
				return nil, nil, fmt.Errorf("snapshot request record %q: %v", e.RequestID, err)
			}
			requests = append(requests, e)
			s.requests++
		case line.End != nil:
			if *line.End != (snapshotEnd{s.listings, s.requests}) {
				return nil, nil, fmt.Errorf("%w: %d listings and %d request records came, the end line says %d and %d",
					errSnapshotCut, s.listings, s.requests, line.End.Listings, line.End.Requests)
			}
			s.end = line.End
			return listings, requests, nil
		default:
			return nil, nil, errors.New("snapshot: a line that is neither listing, request record nor end")
		}
	}
	return listings, requests, nil
}

// done reports whether the end line has been read.
func (s *snapshotReader) done() bool { return s.end != nil }
