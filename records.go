package main

// The records on the topic, the vocabulary every part of replication
// speaks: an event (one committed write), a heartbeat (the relay's promise
// of what is already in Kafka, lag.go), the headers that say which is
// which and who produced it, and how a record is decoded and checked. And
// the pace every loop keeps: how long it waits to retry, how often it reads
// the topic's metadata again.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// event is what travels through Kafka for one committed update: the whole new
// row plus the request id that produced it. Sending the full row rather than
// the change makes applying it idempotent and order-independent. The
// embedded Property's fields appear at the top level of the JSON:
// {"id", "price", "bedrooms", "bathrooms", "region_origin", "version",
// "updated_at", "request_id"}, and "deleted": true when the write was a
// delete (its tombstone, which carries the last live values).
type event struct {
	Property
	RequestID string `json:"request_id"`

	// Parent names the state the write was built on, as its ETag would
	// ("2-eu"); empty for a create. A region that keeps or takes a write
	// not built on the one it replaces knows a write was lost (conflict.go).
	Parent string `json:"parent,omitempty"`
	// fingerprint names the request (requestFingerprint). It travels in the
	// record's headerFingerprint, beside the event rather than in it.
	fingerprint string
	// seq is the event's outbox seq in its region, a committed write's,
	// which no crash of the database takes back. It travels in the
	// record's headerSeq: a database of that region whose outbox sequence
	// is below a seq in the topic has lost writes that left it (rejoin.go).
	seq int64
}

// heartbeat is the record a region's relay publishes to every partition,
// every heartbeatInterval while it writes, less often while it does not,
// and when asked (relay.go): "every write of mine that carries a time
// before Watermark is in Kafka, ahead of this record". The peer's lag is
// measured against it (lag.go).
type heartbeat struct {
	Region string `json:"region"`

	Watermark time.Time `json:"watermark"`
	// Partitions is how many partitions the relay sent this round's
	// heartbeats to: the peer waits for a watermark from each of them
	// before it reports any, so that a partition added to the topic cannot
	// hide a write (lag.go).
	Partitions int32 `json:"partitions,omitempty"`
	// Seen echoes the other region's watermark as this region had applied
	// it when the relay read Watermark (null before it has one): a time in
	// the other region's own clock, which the other region can compare
	// with its clock to know that this heartbeat was sent after a moment of
	// its own, whatever the two clocks say (standin.go).
	Seen *time.Time `json:"seen,omitempty"`
	// Sent is when the relay read Watermark and Seen, in this region's
	// clock (null from a relay that sent no echo). Seen happened before
	// Sent, so Seen − Sent is a lower bound of the other clock minus this
	// one, whatever the clocks say: the other region uses it to measure its
	// lag without trusting the two clocks to agree (lag.go).
	Sent *time.Time `json:"sent,omitempty"`
	// Ask asks the other region for a heartbeat of its own at once: a
	// reader here waits for one that echoes this heartbeat's watermark
	// (relay.go). An answer never asks.
	Ask bool `json:"ask,omitempty"`
}

// Kafka record headers. Every record on the topic says what it is and which
// region produced it, so that a consumer can skip its own region's records
// without decoding them.
const (
	headerKind   = "kind"   // kindEvent or kindHeartbeat
	headerRegion = "region" // the region that produced the record
	headerReason = "reason" // why a record went to the dead-letter queue
	// headerFingerprint is an event's request fingerprint, so that a retry
	// in the other region is told from a reused request id there too.
	headerFingerprint = "request-fingerprint"
	// headerSeq is an event's outbox seq in its region (event.seq).
	headerSeq = "seq"

	kindEvent     = "event"
	kindHeartbeat = "heartbeat"
)

// recordHeaders are the headers of a record of the given kind produced by
// region.
func recordHeaders(kind, region string) []kgo.RecordHeader {
	return []kgo.RecordHeader{{Key: headerKind, Value: []byte(kind)}, {Key: headerRegion, Value: []byte(region)}}
}

// eventRecord is the record of e on topic: keyed by the property id, from
// the region that wrote it, with the request's fingerprint.
func eventRecord(topic string, e event) (*kgo.Record, error) {
	payload, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("encode event: %w", err)
	}
	return &kgo.Record{
		Topic: topic,
		Key:   []byte(strconv.FormatInt(e.ID, 10)),
		Value: payload,
		Headers: append(recordHeaders(kindEvent, e.RegionOrigin),
			kgo.RecordHeader{Key: headerFingerprint, Value: []byte(e.fingerprint)},
			kgo.RecordHeader{Key: headerSeq, Value: strconv.AppendInt(nil, e.seq, 10)}),
	}, nil
}

// recordSeq is an event record's outbox seq (headerSeq), or 0 for a record
// without one (a heartbeat, or an event from a relay older than the
// header).
func recordSeq(rec *kgo.Record) int64 {
	n, _ := strconv.ParseInt(header(rec, headerSeq), 10, 64)
	return max(n, 0)
}

// header returns the value of a record's header, or "" if it has none.
func header(rec *kgo.Record, key string) string {
	for _, h := range rec.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// deadLetterRecord is the record that takes rec to the dead-letter topic
// dlqTopic: the original key, value and headers, plus why region rejected
// it and where it came from.
func deadLetterRecord(rec *kgo.Record, reason error, region, dlqTopic string) *kgo.Record {
	headers := append([]kgo.RecordHeader(nil), rec.Headers...)
	headers = append(headers,
		kgo.RecordHeader{Key: headerReason, Value: []byte(reason.Error())},
		kgo.RecordHeader{Key: "source", Value: fmt.Appendf(nil, "%s/%d/%d", rec.Topic, rec.Partition, rec.Offset)},
		kgo.RecordHeader{Key: "rejected-by", Value: []byte(region)},
	)
	return &kgo.Record{Topic: dlqTopic, Key: rec.Key, Value: rec.Value, Headers: headers}
}

// message is one decoded record of the topic: an event or a heartbeat.
type message struct {
	region    string // the producing region
	event     *event
	heartbeat *heartbeat
}

// decodeMessage decodes and validates one record.
func decodeMessage(rec *kgo.Record) (message, error) {
	m := message{region: header(rec, headerRegion)}
	if !validRegion(m.region) {
		return m, fmt.Errorf("missing or unknown %q header %q", headerRegion, m.region)
	}
	switch kind := header(rec, headerKind); kind {
	case kindHeartbeat:
		var hb heartbeat
		if err := strictUnmarshal(rec.Value, &hb); err != nil {
			return m, fmt.Errorf("heartbeat: %w", err)
		}
		if hb.Region != m.region || hb.Watermark.IsZero() {
			return m, errors.New("heartbeat: region or watermark missing")
		}
		m.heartbeat = &hb
	case kindEvent:
		var e event
		if err := strictUnmarshal(rec.Value, &e); err != nil {
			return m, fmt.Errorf("event: %w", err)
		}
		e.fingerprint = header(rec, headerFingerprint)
		if err := e.validate(); err != nil {
			return m, fmt.Errorf("event: %w", err)
		}
		if e.RegionOrigin != m.region {
			return m, fmt.Errorf("event: region_origin %q differs from header %q", e.RegionOrigin, m.region)
		}
		if string(rec.Key) != strconv.FormatInt(e.ID, 10) {
			return m, fmt.Errorf("event: key %q is not the property id %d", rec.Key, e.ID)
		}
		m.event = &e
	default:
		return m, fmt.Errorf("missing or unknown %q header %q", headerKind, kind)
	}
	return m, nil
}

// validate checks what the database would otherwise reject in the middle of
// a batch: an event that cannot be applied is poison, not an outage. The
// values obey the same rules as a client's (checkValues).
func (e event) validate() error {
	switch {
	case !validRequestID(e.RequestID):
		return errors.New("invalid request_id")
	case !validFingerprint(e.fingerprint):
		return fmt.Errorf("missing or invalid %q header", headerFingerprint)
	}
	return e.validateState()
}

// validateState checks the state e carries, which a listing copied from a
// snapshot (snapshot.go) has too, with no request id if it is a seed's.
func (e event) validateState() error {
	switch {
	case e.ID < 1:
		return errors.New("id must be positive")
	case !validRegion(e.RegionOrigin):
		return errors.New("unknown region_origin")
	case e.Version < 1:
		return errors.New("version must be positive")
	case e.UpdatedAt.IsZero():
		return errors.New("updated_at missing")
	case e.Parent != "" && !validTag(e.Parent):
		return errors.New("parent is not a state's tag")
	case e.RequestID != "" && !validRequestID(e.RequestID):
		return errors.New("invalid request_id")
	}
	return checkValues(e.Price, e.Bedrooms, e.Bathrooms)
}

// metadataMaxAge is how often the clients and the relay read the topic's
// metadata again: a partition added to the topic is consumed, and gets
// events and heartbeats, within about this long.
const metadataMaxAge = 10 * time.Second

// maxBackoff caps the wait between retries while Kafka or the database is
// down, so that recovery is noticed within this much time.
const maxBackoff = 2 * time.Second

// backoff is the wait before retry number attempt: 100ms doubling to
// maxBackoff.
func backoff(attempt int) time.Duration {
	d := 100 * time.Millisecond << min(attempt, 5)
	return min(d, maxBackoff)
}

// sleep waits for d and reports false if ctx was cancelled first.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
