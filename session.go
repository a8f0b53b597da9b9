package main

// Sessions: a client that sends back the X-Session-Token of its last answer
// is never shown a state older than one it has already seen or written,
// whichever region serves it (read your writes, monotonic reads, writes
// that follow reads). Without the token, a client that wrote in US and is
// failed over to EU may read EU's copy from before its write.
//
// What a token holds. For each region, a time of that region's own
// database clock: every write of that region that the session has seen or
// made carries a time (its transaction's start, updated_at) at or before
// it. A region learns what the other has applied from the other's
// heartbeats: its watermark of the peer, a time of the PEER's clock,
// before which every peer write has been applied here (lag.go). So a
// region serves a token's request once its watermark of each other region
// is past that region's time in the token: the two times come from the
// same clock, and no answer depends on two clocks agreeing.
//
// What an answer adds. A region always holds its own writes, and only
// those can be missing from the other region's copy; so an answer adds
// the serving region's own writes it showed: the row of a GET, a PUT, a
// POST or a DELETE when this region wrote it (its updated_at), and for a
// page of the list, which shows what it filtered out as much as what it
// lists, the database's clock as it read. A peer write shown here needs no
// entry: the peer holds it. (With more than two regions it would.)
//
// The cost. A token-carrying request that a region can serve at once pays
// only for parsing the token; one sent to the other region right after a
// write there waits until a heartbeat of the writer's region, sent after the
// write, is applied: the waiting region asks for one (relay.go), which
// takes a round trip through Kafka. A region that cannot catch
// up within sessionWait answers 503 with Retry-After, and NGINX tries the
// other region, which holds the writes the wait was for.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// sessionHeader carries the token both ways.
	sessionHeader = "X-Session-Token"
	// sessionWait is how long a region waits for its copy to include a
	// token's writes before it answers 503.
	sessionWait = time.Second
	// maxSessionToken bounds a token's length: one entry per region, so a
	// token never grows with the session.
	maxSessionToken = 200
	// sessionTokenVersion begins every token, so that its form can change.
	sessionTokenVersion = "v1"
	// maxTokenDigits bounds a time's digits (µs since 1970: 18 digits
	// last until the year 33658), as openapi.yaml's pattern does.
	maxTokenDigits = 18
)

// sessionRegions are the regions a token may name, in the order it names
// them.
var sessionRegions = [...]string{regionUS, regionEU}

// sessionToken is, for each region of sessionRegions, the time (µs since
// the epoch, in that region's database clock) up to which the session has
// seen that region's writes; 0 for none.
type sessionToken [len(sessionRegions)]int64

// Errors of a token that is not one this service gave out: a 400.
var (
	errSessionMalformed = errors.New("X-Session-Token is malformed: send back the token of an earlier answer, unchanged")
	errSessionRegion    = errors.New("X-Session-Token names an unknown region")
)

// errSessionBehind is a region that has not applied, within sessionWait,
// every write the request's token covers: a 503.
var errSessionBehind = errors.New("this region has not caught up with your session yet")

// parseSessionToken reads the request's token: the zero token if it sends
// none. The form is "v1" followed by ";region=µs" for each region with a
// time, in the order of sessionRegions: "v1;us=1764820000123456".
func parseSessionToken(h http.Header) (sessionToken, error) {
	var t sessionToken
	values := h.Values(sessionHeader)
	if len(values) == 0 {
		return t, nil
	}
	if len(values) > 1 || len(values[0]) > maxSessionToken {
		return t, errSessionMalformed
	}
	parts := strings.Split(values[0], ";")
	if parts[0] != sessionTokenVersion {
		return t, errSessionMalformed
	}
	next := 0 // the first region an entry may name: each once, in order
	for _, part := range parts[1:] {
		region, at, ok := strings.Cut(part, "=")
		if !ok {
			return t, errSessionMalformed
		}
		i := regionIndex(region)
		if i < 0 {
			if validName(region) {
				return t, errSessionRegion
			}
			return t, errSessionMalformed
		}
		micros, err := strconv.ParseInt(at, 10, 64)
		if err != nil || micros <= 0 || len(at) > maxTokenDigits || strconv.FormatInt(micros, 10) != at || i < next {
			return t, errSessionMalformed
		}
		t[i], next = micros, i+1
	}
	return t, nil
}

// regionIndex is region's place in sessionRegions, or -1.
func regionIndex(region string) int {
	for i, r := range sessionRegions {
		if r == region {
			return i
		}
	}
	return -1
}

// validName reports whether s could be a region's name (lower-case letters),
// which tells a token naming a region this service does not know from one
// that is not a token at all.
func validName(s string) bool {
	if s == "" || len(s) > 16 {
		return false
	}
	for _, c := range s {
		if c < 'a' || c > 'z' {
			return false
		}
	}
	return true
}

// String is the token's form on the wire (parseSessionToken).
func (t sessionToken) String() string {
	b := make([]byte, 0, 64)
	b = append(b, sessionTokenVersion...)
	for i, micros := range t {
		if micros > 0 {
			b = append(b, ';')
			b = append(b, sessionRegions[i]...)
			b = append(b, '=')
			b = strconv.AppendInt(b, micros, 10)
		}
	}
	return string(b)
}

// saw returns t covering also region's writes up to at.
func (t sessionToken) saw(region string, at time.Time) sessionToken {
	if i := regionIndex(region); i >= 0 {
		t[i] = max(t[i], at.UnixMicro())
	}
	return t
}

// answerSession sets the answer's token: the request's, covering also
// what the answer shows of the serving region's own writes (shown: the
// region and time of a row, or the clock of a page's read). The request's
// token was checked on the way in (sessions), so it parses.
func answerSession(w http.ResponseWriter, r *http.Request, shownRegion string, shown time.Time) {
	t, _ := parseSessionToken(r.Header)
	if shownRegion != "" {
		t = t.saw(shownRegion, shown)
	}
	w.Header().Set(sessionHeader, t.String())
}

// answerSessionRow is answerSession for a row: what it adds is the row's
// own time, if region wrote it (see the top of this file).
func answerSessionRow(w http.ResponseWriter, r *http.Request, region string, p Property) {
	if p.RegionOrigin == region {
		answerSession(w, r, region, p.UpdatedAt)
		return
	}
	answerSession(w, r, "", time.Time{})
}

// answerSessionDuplicate gives the 422 of a request applied before the
// token of that first write: it is often the only answer a client gets
// for its write (the first was lost with a connection, or a crash).
func answerSessionDuplicate(w http.ResponseWriter, r *http.Request, region string, err error) {
	var dup *duplicateRequestError
	if errors.As(err, &dup) {
		answerSessionRow(w, r, region, dup.original)
	}
}

// sessions checks a request's token before h runs: a malformed one is a
// 400, and one whose writes this region has not applied waits for them, at
// most sessionWait, then is a 503.
func sessions(peer *peerWatermark, encodeError func(http.ResponseWriter, *http.Request, error), h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t, err := parseSessionToken(r.Header)
		if err == nil {
			// This region holds its own writes; the peer's must have
			// arrived.
			if at := t[regionIndex(peer.region)]; at > 0 {
				var waited time.Duration
				waited, err = peer.await(r.Context(), at)
				if waited > 0 {
					// Said in the answer, for the client to see what its
					// session cost (the standard Server-Timing header).
					w.Header().Set("Server-Timing", fmt.Sprintf("session-wait;dur=%.1f", waited.Seconds()*1000))
				}
			}
		}
		if err != nil {
			encodeError(w, r, err)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// peerWatermark is this region's watermark of its peer, as sessions need
// it: the time of the peer's clock before which every peer write has been
// applied here.
//
// Requests that wait for it share one reader: while any waits, a single
// goroutine reads the watermark every sessionPoll and wakes them when it
// moves. So a thousand waiting requests cost the database what one does,
// and each sees the watermark within sessionPoll of its arrival.
type peerWatermark struct {
	db     *sql.DB
	region string // the peer
	// askFn has this region's relay ask the peer for a heartbeat (relay.go):
	// the watermark moves with the peer's heartbeats, which come every few
	// seconds when the peer does not write. Nil in tests without a relay.
	askFn func()
	// known is the watermark as last read (µs). The watermark never moves
	// back, so a token below it needs no read of the database.
	known atomic.Int64

	mu      sync.Mutex
	waiters int           // requests waiting; the reader stops at none
	reading bool          // the reader runs
	moved   chan struct{} // closed when known moves, then replaced
	forgets int           // how often forget ran: a read begun before one is not kept
}

// sessionPoll is how often the watermark is read while requests wait for
// it. It moves with the peer's heartbeats: the reader asks for one when it
// starts, and every askAgain while requests wait, and the answer comes a
// round trip through Kafka later.
const sessionPoll = 10 * time.Millisecond

// peerWatermarkSQL reads the watermark: the smallest over the partitions,
// or NULL until every partition has had a heartbeat.
const peerWatermarkSQL = `
SELECT CASE WHEN count(*) > 0 AND count(*) >= max(partitions) THEN min(watermark) END
FROM replication_watermarks WHERE peer_region = $1`

// await returns once the watermark is past at (µs of the peer's clock),
// or errSessionBehind after sessionWait, and how long it waited (0 if the
// watermark was past at already).
func (p *peerWatermark) await(ctx context.Context, at int64) (time.Duration, error) {
	if p.known.Load() > at {
		return 0, nil
	}
	start := time.Now()
	p.mu.Lock()
	p.waiters++
	if p.moved == nil {
		p.moved = make(chan struct{})
	}
	if !p.reading {
		p.reading = true
		go p.read() // exits once no request waits
	}
	moved := p.moved
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.waiters--
		p.mu.Unlock()
	}()
	deadline := time.NewTimer(sessionWait)
	defer deadline.Stop()
	for p.known.Load() <= at {
		select {
		case <-ctx.Done():
			return time.Since(start), ctx.Err()
		case <-deadline.C:
			return time.Since(start), errSessionBehind
		case <-moved:
			p.mu.Lock()
			moved = p.moved
			p.mu.Unlock()
		}
	}
	return time.Since(start), nil
}

// ask has this region's relay ask the peer for a heartbeat, which moves
// the watermark (relay.go).
func (p *peerWatermark) ask() {
	if p.askFn != nil {
		p.askFn()
	}
}

// forget drops the watermark last read: the database it came from went
// back in time (restored from a backup, or rebuilt), and its watermark
// with it.
func (p *peerWatermark) forget() {
	p.mu.Lock()
	p.known.Store(0)
	p.forgets++
	p.mu.Unlock()
}

// read reads the watermark every sessionPoll while requests wait for it,
// and wakes them when it moves. A read that fails is tried again at the
// next tick: the waiters' own deadline ends their wait.
func (p *peerWatermark) read() {
	tick := time.NewTicker(sessionPoll)
	defer tick.Stop()
	var asked time.Time
	for {
		if time.Since(asked) >= askAgain {
			p.ask()
			asked = time.Now()
		}
		p.mu.Lock()
		forgets := p.forgets
		p.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
		var w sql.NullTime
		err := p.db.QueryRowContext(ctx, peerWatermarkSQL, p.region).Scan(&w)
		cancel()
		p.mu.Lock()
		if err == nil && w.Valid && w.Time.UnixMicro() > p.known.Load() && forgets == p.forgets {
			p.known.Store(w.Time.UnixMicro())
			close(p.moved)
			p.moved = make(chan struct{})
		}
		if p.waiters == 0 {
			p.reading = false
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		<-tick.C
	}
}
