package main

// Rejoining: a region whose database is not what its position says finds
// out, sends its clients away, and rebuilds its copy from the peer by
// itself, while the peer goes on serving.
//
// What goes wrong without it. A database restored from a backup, or
// replaced by an empty one, has gone back in time, and so have its
// position in the topic (which catches up again: the consumer reads on
// from it), its own writes after the backup (which only the peer and the
// topic still hold, and the consumer skips its own region's records) and
// its id sequence (whose next POST would hand out an id the peer holds).
//
// How a region finds out. Every event carries its outbox seq (event.seq),
// a committed write's, and the peer keeps the greatest it applied. Outbox
// seqs only grow: a crash of the database keeps every committed one, and
// only a database that went back in time hands out a seq below one it
// published. So each instance asks the peer, at start, every
// rejoinCheckInterval and at once when its database has restarted
// (admit), for that number (GET /internal/published/{region}), and
// compares it with its outbox sequence. The peer's number counts only once
// it has read every record produced before the database started (a
// database goes back in time by starting again); when the peer cannot
// tell, this region's own consumer, which reads its region's
// events too for their seqs (consume.go), can, once it has read that far.
// A database that is behind has lost writes that left it: the region
// rejoins. So does one whose position the broker no longer holds
// (consume.go: the events it needs are gone, and only a snapshot has their
// effect), and one an operator asks to (property-listing rejoin). Until a
// check can tell, the instance serves nothing (its next POST could take an
// id the peer holds), but for peerCatchUpWait at its start: a region must
// start while the other is down.
//
// How it rebuilds. A row in the rejoin table says the region is rejoining;
// every instance reads it, answers 503 to clients (NGINX then sends them
// to the peer, nginx.conf) and stops applying the peer's records. One
// instance, holding an advisory lock, does the work:
//
//  1. (from nothing only) empties the region's copy: listings, request
//     records, positions and watermarks.
//  2. copies the peer's snapshot (snapshot.go) under the conflict rule:
//     every listing and request record, a copy greater than what the
//     region holds replacing it.
//  3. reads the log from the snapshot's low watermark back to where the
//     peer stood (the smaller of the two), up to the low watermark, and
//     copies its events the same way: its own region's writes that the
//     peer had not applied yet come back this way.
//  4. moves the positions to the low watermark (never back), the outbox
//     sequence past what the peer saw published, and lets the consumers
//     go on (phase 'log'): the peer's writes during and after the snapshot
//     are in the log above the low watermark.
//  5. when the consumers have reached the end of the log as it was after
//     step 4, moves the id sequence past every id of the region's it now
//     holds, and a billion ids further (those its lost creates may have
//     had, which nobody holds), and deletes the row: the region serves
//     again.
//
// A copy is not judged again: the write it carries was judged by the
// region that applied it, and any conflict it lost was recorded there. So
// the copy writes no conflict records and no outbox rows. What is lost is
// only what never left the database that was lost: writes that were still
// in its outbox (docs/semantics.md, §12).

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
)

// rejoinCheckInterval is how often an instance compares its database with
// what the peer holds of it, and reads the rejoin row that tells it the
// region is rejoining. A database restored under a running instance is
// found within it.
const rejoinCheckInterval = time.Second

// peerCheckTimeout bounds the peer's answer to a check. A peer that does
// not answer in time cannot tell, and the region serves.
const peerCheckTimeout = time.Second

// peerCatchUpWait is how long an instance, at its start, waits for the
// peer, or its own consumer, to read the topic far enough to tell (check);
// after it, the instance serves: a region must be able to start while the
// other is down and Kafka too.
const peerCatchUpWait = 5 * time.Second

// copyBatchSize is how many listings or request records one transaction of
// the copy writes.
const copyBatchSize = 5000

// rejoinLockKey names the advisory lock held by the one instance of a
// region that rebuilds it.
const rejoinLockKey = 0x72656a6f696e // "rejoin"

// The states of a region, as /health and the lag report name them.
const (
	stateChecking  = "checking"  // the database is not checked yet: at start, or after it restarted
	stateServing   = "serving"   // the region serves its clients
	stateRejoining = "rejoining" // the region rebuilds its copy from the peer
)

// errRejoining is a consumer's batch refused while the region waits for a
// snapshot (apply.go): it is applied after.
var errRejoining = errors.New("this region is rejoining: the peer's records wait for the snapshot")

// rejoinStatus is what a region says of itself while it is not serving.
type rejoinStatus struct {
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
	// Phase is where the rebuild stands: waiting (for an instance to take
	// it up), snapshot (copying it), log (catching up from its low
	// watermark).
	Phase     string     `json:"phase,omitempty"`
	Listings  int64      `json:"listings_copied"`
	Requests  int64      `json:"requests_copied"`
	StartedAt *time.Time `json:"started_at,omitempty"`
}

// rejoiner watches one region's database for the signs above, and rebuilds
// it when they show.
type rejoiner struct {
	logger    *slog.Logger
	db        *sql.DB // the replication pool
	region    string
	topic     string
	peers     []string // the peer's backends, base URLs (PEER_URL)
	brokers   []string
	retention time.Duration
	client    *http.Client
	// ends reads the end of each partition of the topic.
	ends func(context.Context) (map[int32]int64, error)
	// starts reads the start of each partition: its oldest retained record.
	starts func(context.Context) (map[int32]int64, error)
	// offsetsAt reads, for each partition, the offset of the first record
	// produced at or after a time, or the end.
	offsetsAt func(context.Context, time.Time) (map[int32]int64, error)
	// before is the last answer of endsBefore that can no longer change.
	before atomic.Pointer[offsetsBefore]

	status atomic.Pointer[rejoinStatus]
	// rejoins counts the rebuilds this instance finished.
	rejoins atomic.Int64
	// peerDown remembers that the last check found no peer to ask, so
	// that it is logged once, not every second.
	peerDown bool
	// clockBehind remembers that the last check found the database's clock
	// behind the peer's watermark (clockPast), so that it is logged once.
	clockBehind bool
	// checked is when the database last checked had started
	// (pg_postmaster_start_time), nil before the first check: a
	// connection to a database started since is not admitted (admit).
	checked atomic.Pointer[time.Time]
	// recheck wakes the loop for a check at once.
	recheck chan struct{}
	// born is when the instance started.
	born time.Time
	// rejoined is called when a rebuild is done: the purge's wake, and
	// restarted when the database checked is not the one checked before:
	// what was cached of it is forgotten (the sessions' watermark).
	rejoined, restarted func()
}

// newRejoiner returns the rejoiner of region, starting.
func newRejoiner(logger *slog.Logger, db *sql.DB, region, topic string, peers, brokers []string, retention time.Duration,
	ends, starts func(context.Context) (map[int32]int64, error), offsetsAt func(context.Context, time.Time) (map[int32]int64, error)) *rejoiner {
	j := &rejoiner{
		logger: logger, db: db, region: region, topic: topic,
		peers: peers, brokers: brokers, retention: retention, ends: ends, starts: starts, offsetsAt: offsetsAt,
		// No timeout of the whole exchange: a snapshot takes as long as the
		// peer's tables. Each call bounds itself with its context.
		client:  &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 30 * time.Second}},
		recheck: make(chan struct{}, 1),
		born:    time.Now(),
	}
	j.status.Store(&rejoinStatus{State: stateChecking})
	return j
}

// current is the region's state as this instance last found it.
func (j *rejoiner) current() rejoinStatus { return *j.status.Load() }

// serving reports whether the instance serves clients.
func (j *rejoiner) serving() bool { return j.status.Load().State == stateServing }

// run checks every rejoinCheckInterval, and rebuilds when a check says so,
// until ctx is cancelled.
func (j *rejoiner) run(ctx context.Context) {
	for {
		j.step(ctx)
		// An instance that does not serve checks again sooner: the peer
		// that could not tell a moment ago usually can now.
		wait := rejoinCheckInterval
		if !j.serving() {
			wait = rejoinCheckInterval / 5
		}
		select {
		case <-ctx.Done():
			return
		case <-j.recheck:
		case <-time.After(wait):
		}
	}
}

// errDatabaseRestarted is a request's connection to a database that
// started since it was last checked (admit).
var errDatabaseRestarted = errors.New("this region's database restarted and is being checked against the other region")

// admit runs on every new connection of the request pool. A database that
// started since the last check (it restarted, or was restored from a
// backup, which takes a restart) is checked again before it serves: the
// connection is refused, the request answered 503 (NGINX then asks the
// other region), and the check runs at once. Without it, a request in the
// second before the next check could read the restored past, or a POST take
// an id the peer holds.
func (j *rejoiner) admit(ctx context.Context, conn *pgx.Conn) error {
	checked := j.checked.Load()
	if checked == nil {
		return nil // the first check has not run: nothing is served yet
	}
	var started time.Time
	if err := conn.QueryRow(ctx, `SELECT pg_postmaster_start_time()`).Scan(&started); err != nil {
		return err
	}
	if started.Equal(*checked) {
		return nil
	}
	if s := j.status.Load(); s.State == stateServing {
		j.status.CompareAndSwap(s, &rejoinStatus{State: stateChecking})
	}
	select {
	case j.recheck <- struct{}{}:
	default:
	}
	return errDatabaseRestarted
}

// step is one check: the rejoin row if there is one, the peer's word
// otherwise; and the rebuild, if the region rejoins and no other instance
// is doing it.
func (j *rejoiner) step(ctx context.Context) {
	row, err := j.readRow(ctx)
	if err != nil {
		// The database does not answer: neither do the requests, which
		// answer 503 on their own. Try again.
		return
	}
	if row == nil {
		reason, started, err := j.check(ctx)
		switch {
		case started == nil:
			return // the database did not answer: check again
		case errors.Is(err, errClockBehind):
			// Not even at start, nor when it ran serving: until the clock
			// is past what the peer vouches for, no request is answered.
			if s := j.status.Load(); s.State == stateServing {
				j.status.CompareAndSwap(s, &rejoinStatus{State: stateChecking})
			}
			return
		case err != nil && j.restartedUnder(started):
			// The database restarted under this instance, and the peer
			// cannot say whether it came back from a backup. Serving it
			// could hand out ids the peer holds, or build on writes the
			// peer knows were lost: wait until the peer can tell.
			return
		case err != nil && time.Since(j.born) < peerCatchUpWait:
			// At start, the peer or this region's own consumer is given a
			// moment to read on.
			return
		case reason == "":
			// Checked, or, at this instance's start, the peer cannot tell:
			// this database serves.
			if prev := j.checked.Swap(started); prev != nil && !prev.Equal(*started) && j.restarted != nil {
				j.restarted()
			}
			j.status.Store(&rejoinStatus{State: stateServing})
			return
		}
		if err := requestRejoin(ctx, j.db, reason, false); err != nil {
			j.logger.Warn("rejoin: the rejoin row could not be written", "err", err)
			return
		}
		j.logger.Error("rejoin: this region's database is behind what it published; rejoining from the peer", "reason", reason)
		if row, err = j.readRow(ctx); err != nil || row == nil {
			return
		}
	}
	j.status.Store(row)
	if err := j.rebuildIfFree(ctx); err != nil && ctx.Err() == nil {
		j.logger.Warn("rejoin: the rebuild failed; it starts again", "err", err)
	}
}

// restartedUnder reports whether the database, started at started, has
// restarted since this instance last checked it.
func (j *rejoiner) restartedUnder(started *time.Time) bool {
	checked := j.checked.Load()
	return checked != nil && !checked.Equal(*started)
}

// readRejoinSQL reads the rejoin row, if there is one.
const readRejoinSQL = `SELECT reason, phase, listings, requests, started_at FROM rejoin`

// readRow reads the rejoin row as a status, or nil if there is none.
func (j *rejoiner) readRow(ctx context.Context) (*rejoinStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, peerCheckTimeout)
	defer cancel()
	s := rejoinStatus{State: stateRejoining}
	var started time.Time
	err := j.db.QueryRowContext(ctx, readRejoinSQL).Scan(&s.Reason, &s.Phase, &s.Listings, &s.Requests, &started)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	s.StartedAt = &started
	return &s, nil
}

// requestRejoinSQL writes the rejoin row; a region already rejoining
// keeps its reason, and rebuilds from nothing if either asks for it.
const requestRejoinSQL = `
INSERT INTO rejoin (reason, from_nothing) VALUES ($1, $2)
ON CONFLICT (one) DO UPDATE SET from_nothing = rejoin.from_nothing OR EXCLUDED.from_nothing`

// requestRejoin makes db's region rejoin, for reason.
func requestRejoin(ctx context.Context, db *sql.DB, reason string, fromNothing bool) error {
	_, err := db.ExecContext(ctx, requestRejoinSQL, reason, fromNothing)
	return err
}

// outboxSeqSQL is the highest outbox seq this database has written (0
// before the first): the outbox's, or the highest the relay published and
// deleted (outbox_published in init.sql); and when the database started.
const outboxSeqSQL = `
SELECT GREATEST((SELECT coalesce(max(seq), 0) FROM outbox), (SELECT coalesce(max(seq), 0) FROM outbox_published)),
       pg_postmaster_start_time()`

// check asks the peer for the highest outbox seq of this region's it has
// seen published, and returns why the region must rejoin, or "" if it need
// not, and when the database it checked started. With the database
// unreachable, started is nil. When the peer cannot tell (it does not
// answer, or has not read the topic as far as it ended when the check
// began, or the topic cannot be read), the answer is "" with the error.
func (j *rejoiner) check(ctx context.Context) (reason string, started *time.Time, err error) {
	// When the database started first: a check is about the database as
	// it is since then.
	var local int64
	var at time.Time
	if err := j.db.QueryRowContext(ctx, outboxSeqSQL).Scan(&local, &at); err != nil {
		return "", nil, err
	}
	published, watermark, err := j.peerPublished(ctx, at)
	if err == nil {
		// The outbox sequence again, after the peer's answer: the writes
		// this region made and published while the question was on its
		// way are in the answer, and must be in the comparison too (a
		// region under load was once taken for one gone back in time).
		var again time.Time
		if err := j.db.QueryRowContext(ctx, outboxSeqSQL).Scan(&local, &again); err != nil {
			return "", nil, err
		}
		if !again.Equal(at) {
			return "", &again, errors.New("the database restarted during the check")
		}
	}
	if err != nil && j.readTopicOurselves(ctx, at) {
		// The peer cannot tell, but this region's own consumer has read
		// every record produced before the database started, this region's
		// events among them, and would have found one above the outbox
		// sequence (consume.go, behindOwnPublished).
		published, err = 0, nil
	}
	if err != nil {
		if errors.Is(err, errPeerBehind) && j.serving() && !j.restartedUnder(&at) {
			// Routine while serving: the peer is a few records behind,
			// and the next check asks again.
			return "", &at, err
		}
		if !j.peerDown {
			then := "serving meanwhile"
			if j.restartedUnder(&at) {
				then = "the database restarted: not serving until the peer can tell"
			}
			j.logger.Warn("rejoin: the peer cannot tell what it holds of this region; "+then, "err", err)
		}
		j.peerDown = true
		return "", &at, err
	}
	j.peerDown = false
	if published <= local {
		if err := j.clockPast(ctx, watermark); err != nil {
			return "", &at, err
		}
		if j.checked.Load() == nil || !j.checked.Load().Equal(at) {
			j.logger.Info("rejoin: the database checked against the peer", "outbox_seq", local, "peer_saw_published", published, "database_started", at)
		}
		return "", &at, nil
	}
	return fmt.Sprintf("this database's outbox has handed out seqs up to %d, but %s saw this region publish up to %d: "+
		"it lost writes that had left it (restored from an older backup, or replaced)", local, peerOf(j.region), published), &at, nil
}

// errClockBehind is a check that found this database's clock behind the
// watermark the peer holds of this region.
var errClockBehind = errors.New("this database's clock is behind the watermark the other region holds of this region")

// clockPast returns errClockBehind until this database's clock has passed
// watermark, the newest watermark the peer holds of this region. A
// region's clock that stepped back (a database restarted under a clock
// set back, or stepped by NTP) would stamp new writes with times the peer
// has vouched for already: a session that saw one could be answered there
// without it (session.go), and the lag could read low. So the region does
// not serve until its clock is past every time it announced, which for a
// clock set back by Δ is Δ after its last heartbeat at most.
func (j *rejoiner) clockPast(ctx context.Context, watermark *time.Time) error {
	if watermark == nil {
		return nil
	}
	var now time.Time
	if err := j.db.QueryRowContext(ctx, `SELECT clock_timestamp()`).Scan(&now); err != nil {
		return err
	}
	if now.After(*watermark) {
		j.clockBehind = false
		return nil
	}
	if !j.clockBehind {
		j.logger.Warn("rejoin: this database's clock is behind the watermark the other region holds of this region: it stepped back; not serving until it passes it",
			"clock", now, "watermark", *watermark, "behind", watermark.Sub(now))
	}
	j.clockBehind = true
	return fmt.Errorf("%w by %v", errClockBehind, watermark.Sub(now))
}

// readTopicOurselves reports whether this region's consumer has read
// every record produced before the database started (started), with no
// rejoin asked for meanwhile.
func (j *rejoiner) readTopicOurselves(ctx context.Context, started time.Time) bool {
	ends, err := j.endsBefore(ctx, started)
	if err != nil {
		return false
	}
	at, err := storedPositions(ctx, j.db, j.topic)
	if err != nil {
		return false
	}
	for p, end := range ends {
		if at[p] < end {
			return false
		}
	}
	row, err := j.readRow(ctx)
	return err == nil && row == nil
}

// endsBefore is, for each partition of the topic, the offset of its first
// record produced after started, or its end: every record below it was
// produced before. Records carry their producer's clock and started is
// the database's: maxClockSkew is allowed between them.
//
// Asked once maxClockSkew has passed since then, the answer for one start
// can no longer change: every record produced since carries a later time,
// so it lands above. It is kept (the caller does not change it), and a
// database that has run for a while costs the broker nothing per check,
// where two metadata and two offset requests a second were a fifth of the
// broker's idle work (docs/benchmarks.md).
func (j *rejoiner) endsBefore(ctx context.Context, started time.Time) (map[int32]int64, error) {
	if kept := j.before.Load(); kept != nil && kept.started.Equal(started) {
		return kept.offsets, nil
	}
	asked := time.Now()
	ctx, cancel := context.WithTimeout(ctx, peerCheckTimeout)
	defer cancel()
	offsets, err := j.offsetsAt(ctx, started.Add(maxClockSkew))
	if err == nil && asked.After(started.Add(2*maxClockSkew)) {
		j.before.Store(&offsetsBefore{started: started, offsets: offsets})
	}
	return offsets, err
}

// offsetsBefore is an answer of endsBefore, for one start of the database.
type offsetsBefore struct {
	started time.Time
	offsets map[int32]int64
}

// errPeerBehind is a peer that has not yet read every record of the topic
// this region published before its database started: its word on what this
// region published may be short.
var errPeerBehind = errors.New("the peer has not read every record produced before this database started")

// peerPublished asks the peer's backends, one after the other, for the
// highest outbox seq of this region's they have applied. The answer
// counts only from a peer that has read every record produced before the
// database started (started): a database that went back in time did so
// by starting again, and whatever the database it replaced published, it
// published before that; then the peer's number is complete. For a
// database that has run for a while the peer is long past that point, and
// answers at once, under any load.
func (j *rejoiner) peerPublished(ctx context.Context, started time.Time) (int64, *time.Time, error) {
	ends, err := j.endsBefore(ctx, started)
	if err != nil {
		return 0, nil, fmt.Errorf("the topic's end: %w", err)
	}
	var errs []error
	for _, base := range j.peers {
		var body publishedAnswer
		err := j.get(ctx, base+"/internal/published/"+j.region, peerCheckTimeout, &body)
		if err == nil {
			for p, end := range ends {
				if body.Positions[p] < end {
					return 0, nil, fmt.Errorf("%w: partition %d at %d of %d", errPeerBehind, p, body.Positions[p], end)
				}
			}
			return body.Published, body.Watermark, nil
		}
		errs = append(errs, err)
	}
	return 0, nil, errors.Join(errs...)
}

// get GETs url within timeout and decodes its JSON answer into v.
func (j *rejoiner) get(ctx context.Context, url string, timeout time.Duration, v any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := j.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// rebuildIfFree rebuilds the region if no other instance is doing it: it
// holds the rejoin lock, on a connection of its own, for the whole
// rebuild. An instance that dies lets the lock go with its connection, and
// the next instance to check starts over.
func (j *rejoiner) rebuildIfFree(ctx context.Context) error {
	conn, err := j.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	var locked bool
	if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1)`, rejoinLockKey).Scan(&locked); err != nil || !locked {
		return err // another instance rebuilds
	}
	defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, rejoinLockKey)
	return j.rebuild(ctx)
}

// rebuild runs the steps at the top of this file.
func (j *rejoiner) rebuild(ctx context.Context) error {
	start := time.Now()
	if err := j.begin(ctx); err != nil {
		return err
	}
	h, err := j.copySnapshot(ctx)
	if err != nil {
		return err
	}
	copied := time.Since(start)
	if err := j.replayLog(ctx, h); err != nil {
		return err
	}
	target, err := j.resume(ctx, h)
	if err != nil {
		return err
	}
	if err := j.awaitConsumers(ctx, target); err != nil {
		return err
	}
	if err := j.finish(ctx); err != nil {
		return err
	}
	j.rejoins.Add(1)
	j.status.Store(&rejoinStatus{State: stateServing})
	if j.rejoined != nil {
		j.rejoined()
	}
	j.logger.Info("rejoin: done; serving again", "took", time.Since(start).Round(time.Millisecond).String(),
		"snapshot_took", copied.Round(time.Millisecond).String())
	return nil
}

// The statements of begin. emptySQL is the rebuild from nothing: the
// region's copy goes, its outbox (writes not yet published) and its
// conflict records (its own findings) stay.
const (
	startSnapshotSQL = `UPDATE rejoin SET phase = 'snapshot', listings = 0, requests = 0 RETURNING from_nothing`
	// Waits for every consumer transaction that saved positions before the
	// rejoin row was there: after it, none applies anything (apply.go).
	barrierSQL = `LOCK TABLE replication_positions IN SHARE MODE`
	emptySQL   = `
DELETE FROM properties;
DELETE FROM processed_requests;
DELETE FROM replication_positions;
DELETE FROM replication_watermarks;
UPDATE rejoin SET from_nothing = false`
)

// begin enters phase 'snapshot' once no consumer transaction can still
// commit, and empties the region's copy if asked to.
func (j *rejoiner) begin(ctx context.Context) error {
	tx, err := j.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SET LOCAL statement_timeout = 0`); err != nil {
		return err
	}
	var fromNothing bool
	if err := tx.QueryRowContext(ctx, startSnapshotSQL).Scan(&fromNothing); err != nil {
		return fmt.Errorf("rejoin: start: %w", err)
	}
	if _, err := tx.ExecContext(ctx, barrierSQL); err != nil {
		return fmt.Errorf("rejoin: wait for the consumers: %w", err)
	}
	if fromNothing {
		// The other instances stop serving within a check interval of the
		// row; give them two before their clients could see the copy go.
		if !sleep(ctx, 2*rejoinCheckInterval) {
			return ctx.Err()
		}
		if _, err := tx.ExecContext(ctx, emptySQL); err != nil {
			return fmt.Errorf("rejoin: empty the copy: %w", err)
		}
		j.logger.Info("rejoin: this region's copy emptied, to be rebuilt from nothing")
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	j.setPhase("snapshot", 0, 0)
	return nil
}

// setPhase updates this instance's status; the other instances read it
// from the row.
func (j *rejoiner) setPhase(phase string, listings, requests int64) {
	s := j.current()
	s.State, s.Phase, s.Listings, s.Requests = stateRejoining, phase, listings, requests
	j.status.Store(&s)
}

// copySnapshot copies the snapshot of the first peer backend that serves
// one, and returns its header.
func (j *rejoiner) copySnapshot(ctx context.Context) (snapshotHeader, error) {
	var errs []error
	for _, base := range j.peers {
		h, err := j.copySnapshotFrom(ctx, base+"/internal/snapshot/"+j.region)
		if err == nil {
			return h, nil
		}
		errs = append(errs, err)
	}
	return snapshotHeader{}, errors.Join(errs...)
}

// copySnapshotFrom copies the snapshot at url, a batch per transaction.
func (j *rejoiner) copySnapshotFrom(ctx context.Context, url string) (snapshotHeader, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return snapshotHeader{}, err
	}
	resp, err := j.client.Do(req)
	if err != nil {
		return snapshotHeader{}, fmt.Errorf("snapshot: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return snapshotHeader{}, fmt.Errorf("snapshot: GET %s: %s", url, resp.Status)
	}
	s, err := newSnapshotReader(resp.Body)
	if err != nil {
		return snapshotHeader{}, err
	}
	// Returning early (a batch the database refused) stops the reader:
	// first its context, then (deferred above) the body it may be
	// blocked reading.
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	if s.header.Topic != j.topic {
		return snapshotHeader{}, fmt.Errorf("snapshot: the peer replicates through %q, this region through %q", s.header.Topic, j.topic)
	}
	var listings, requests int64
	for b := range readAhead(ctx, s) {
		if b.err != nil {
			return snapshotHeader{}, b.err
		}
		listings, requests = listings+int64(len(b.listings)), requests+int64(len(b.requests))
		if err := j.copyBatch(ctx, b.listings, b.requests, time.Time{}, listings, requests); err != nil {
			return snapshotHeader{}, err
		}
		j.setPhase("snapshot", listings, requests)
	}
	if !s.done() {
		// The reader stopped without an error to hand over: ctx ended
		// while it read.
		return snapshotHeader{}, cmp.Or(ctx.Err(), errSnapshotCut)
	}
	j.logger.Info("rejoin: snapshot copied", "from", url, "listings", listings, "requests", requests,
		"low", s.header.Low, "peer_applied", s.header.Applied)
	return s.header, nil
}

// snapshotBatch is one batch of a snapshot, or the error that ended it.
type snapshotBatch struct {
	listings, requests []event
	err                error
}

// readAhead reads s's batches (copyBatchSize each) in a goroutine of its
// own, one batch ahead of the caller: while the database writes one batch,
// the next one is read and decoded, and the peer encodes the one after.
// Read one after the other, the copy kept about one of the two cores busy.
// The channel closes after the last batch, after a batch with an error, or
// when ctx ends (the caller then finds s not done). The goroutine ends
// then, or when the snapshot's body is closed under it.
func readAhead(ctx context.Context, s *snapshotReader) <-chan snapshotBatch {
	batches := make(chan snapshotBatch)
	go func() {
		defer close(batches)
		for !s.done() {
			var b snapshotBatch
			b.listings, b.requests, b.err = s.batch(copyBatchSize)
			select {
			case batches <- b:
			case <-ctx.Done():
				return
			}
			if b.err != nil {
				return
			}
		}
	}()
	return batches
}

// copyListingsSQL writes copies of listings under the conflict rule: a row
// is replaced only by a greater write, compared as compareWrites does.
const copyListingsSQL = upsertPropertiesSQL + `
WHERE (EXCLUDED.version, EXCLUDED.updated_at, EXCLUDED.region_origin COLLATE "C")
    > (properties.version, properties.updated_at, properties.region_origin COLLATE "C")`

// progressSQL records the copy's progress in the rejoin row, for the
// other instances to report.
const progressSQL = `UPDATE rejoin SET listings = $1, requests = $2`

// copyBatch writes copies of listings (one per id) and of request records
// in one transaction, with the progress. A listing updated before
// expiredBefore that the region holds no row of is not copied: its
// tombstone may have been purged here (retention.go). A zero expiredBefore
// copies everything.
func (j *rejoiner) copyBatch(ctx context.Context, listings, requests []event, expiredBefore time.Time, copiedListings, copiedRequests int64) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tx, err := j.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if !expiredBefore.IsZero() {
		if listings, err = withoutExpired(ctx, tx, listings, expiredBefore); err != nil {
			return err
		}
		requests = listings
	}
	if len(listings) > 0 {
		var c propertyColumns
		for _, e := range greatestPerListing(listings) {
			c.addWrite(e.Property, e.RequestID, e.Parent)
		}
		if _, err := tx.ExecContext(ctx, copyListingsSQL, c.args()...); err != nil {
			return fmt.Errorf("copy listings: %w", err)
		}
	}
	if len(requests) > 0 {
		if err := recordReplicatedRequests(ctx, tx, requests); err != nil {
			return fmt.Errorf("copy request records: %w", err)
		}
	}
	if copiedListings+copiedRequests > 0 {
		if _, err := tx.ExecContext(ctx, progressSQL, copiedListings, copiedRequests); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// greatestPerListing keeps, of several writes of one listing, the
// greatest: one INSERT may touch a row once only.
func greatestPerListing(events []event) []event {
	greatest := map[int64]event{}
	for _, e := range events {
		if g, ok := greatest[e.ID]; !ok || compareWrites(e.Property, g.Property) > 0 {
			greatest[e.ID] = e
		}
	}
	out := make([]event, 0, len(greatest))
	for _, e := range greatest {
		out = append(out, e)
	}
	return out
}

// withoutExpired drops the events older than expiredBefore for listings
// with no row here.
func withoutExpired(ctx context.Context, tx *sql.Tx, events []event, expiredBefore time.Time) ([]event, error) {
	ids := make([]int64, 0, len(events))
	for _, e := range events {
		ids = append(ids, e.ID)
	}
	rows, err := tx.QueryContext(ctx, `SELECT id FROM properties WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	held := map[int64]bool{}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		held[id] = true
	}
	kept := events[:0:0]
	for _, e := range events {
		if held[e.ID] || !e.UpdatedAt.Before(expiredBefore) {
			kept = append(kept, e)
		}
	}
	return kept, rows.Err()
}

// replayLog copies the events of the log from where the peer stood (or
// the low watermark, if lower) up to the low watermark: among them, this
// region's own writes that the peer had not applied when it took the
// snapshot, which nothing else holds. The peer's own events there are in
// the snapshot already; copied again, they change nothing.
func (j *rejoiner) replayLog(ctx context.Context, h snapshotHeader) error {
	// Below the log's start nothing is left to read: what was there is in
	// the snapshot, or was the peer's to apply long before.
	logStarts, err := j.starts(ctx)
	if err != nil {
		return fmt.Errorf("rejoin: replay the log: %w", err)
	}
	from := map[int32]kgo.Offset{}
	for p, low := range h.Low {
		start := max(min(h.Applied[p], low), logStarts[p]) // no position there: from the start
		if start < low {
			from[p] = kgo.NewOffset().At(start)
		}
	}
	if len(from) == 0 {
		return nil
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(j.brokers...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{j.topic: from}),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxWait(500*time.Millisecond),
	)
	if err != nil {
		return fmt.Errorf("rejoin: replay the log: %w", err)
	}
	defer client.Close()
	left := len(from)
	done := map[int32]bool{}
	var replayed int64
	for left > 0 {
		fetches := client.PollRecords(ctx, copyBatchSize)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			j.logger.Warn("rejoin: replay: fetch error", "partition", partition, "err", err)
		})
		var events []event
		for _, rec := range fetches.Records() {
			if done[rec.Partition] {
				continue
			}
			if rec.Offset+1 >= h.Low[rec.Partition] {
				done[rec.Partition] = true
				left--
			}
			if rec.Offset >= h.Low[rec.Partition] {
				continue
			}
			if header(rec, headerKind) != kindEvent {
				continue
			}
			m, err := decodeMessage(rec)
			if err != nil {
				continue // the consumers sent it to the dead-letter queue when it came
			}
			events = append(events, *m.event)
		}
		if len(events) > 0 {
			if err := j.copyBatch(ctx, events, nil, time.Now().Add(-j.retention), 0, 0); err != nil {
				return fmt.Errorf("rejoin: replay the log: %w", err)
			}
			replayed += int64(len(events))
		}
	}
	j.logger.Info("rejoin: the log replayed up to the low watermark", "events", replayed, "from", from, "to", h.Low)
	return nil
}

// resumeSQL moves the positions to the low watermark, never back, and
// the outbox sequence past the highest seq the peer saw published, and
// lets the consumers apply again (phase 'log').
const resumeSQL = `
INSERT INTO replication_positions (topic, partition, next_offset)
SELECT $1, p.partition, p.next_offset FROM unnest($2::int[], $3::bigint[]) AS p(partition, next_offset)
ON CONFLICT (topic, partition) DO UPDATE
SET next_offset = GREATEST(replication_positions.next_offset, EXCLUDED.next_offset)`

// resume ends the snapshot phase (step 4 at the top of this file) and
// returns the end of the log just after it: where the consumers must
// reach before the region serves.
func (j *rejoiner) resume(ctx context.Context, h snapshotHeader) (map[int32]int64, error) {
	tx, err := j.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	ps, offsets := make([]int32, 0, len(h.Low)), make([]int64, 0, len(h.Low))
	for p, low := range h.Low {
		ps, offsets = append(ps, p), append(offsets, low)
	}
	if _, err := tx.ExecContext(ctx, resumeSQL, j.topic, ps, offsets); err != nil {
		return nil, fmt.Errorf("rejoin: move the positions: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `SELECT setval('outbox_seq_seq', GREATEST(last_value, $1)) FROM outbox_seq_seq WHERE $1 > 0`, h.Published); err != nil {
		return nil, fmt.Errorf("rejoin: move the outbox sequence: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO outbox_published (seq) SELECT $1::bigint WHERE $1 > 0
ON CONFLICT (one) DO UPDATE SET seq = GREATEST(outbox_published.seq, EXCLUDED.seq)`, h.Published); err != nil {
		return nil, fmt.Errorf("rejoin: move the outbox's published seq: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `UPDATE rejoin SET phase = 'log'`); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	j.setPhase("log", j.current().Listings, j.current().Requests)
	endCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return j.ends(endCtx)
}

// awaitConsumers waits until the region's stored positions have reached
// target in every partition: the consumers have applied the log up to
// there.
func (j *rejoiner) awaitConsumers(ctx context.Context, target map[int32]int64) error {
	for {
		at, err := storedPositions(ctx, j.db, j.topic)
		if err != nil {
			return err
		}
		behind := false
		for p, end := range target {
			// A partition whose records were all the region's own, or
			// heartbeats, moves too: the consumer saves every position.
			behind = behind || at[p] < end
		}
		if !behind {
			return nil
		}
		if !sleep(ctx, 100*time.Millisecond) {
			return ctx.Err()
		}
	}
}

// storedPositions reads where the region stands in each partition of
// topic: the next record its consumer reads.
func storedPositions(ctx context.Context, db *sql.DB, topic string) (map[int32]int64, error) {
	rows, err := db.QueryContext(ctx, `SELECT partition, next_offset FROM replication_positions WHERE topic = $1`, topic)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	at := map[int32]int64{}
	for rows.Next() {
		var p int32
		var next int64
		if err := rows.Scan(&p, &next); err != nil {
			return nil, err
		}
		at[p] = next
	}
	return at, rows.Err()
}

// lostIDsAtMost is how many ids of its own a region's database can have
// handed out and lost without a trace when it goes back in time: creates
// that were still in its outbox, which neither the peer nor the topic
// holds. A rejoin skips that many of the region's ids, so that none of
// them is handed out again (docs/semantics.md, §12). Far more than an
// outbox ever held (the relay drains a million events in under a minute);
// the ids are 64-bit, so each rejoin spends 2^31 of 2^63: one in four
// billion.
const lostIDsAtMost = 1 << 30

// finish moves the region's id sequence past every id of its own that it
// holds now, the peer's included, and past the lostIDsAtMost after the
// greatest it or its sequence knows, and deletes the rejoin row: the region
// serves again. Ids from 1001 on alternate between the regions, US the odd
// ones (init.sql), so a skip of 2*lostIDsAtMost keeps the region's parity.
func (j *rejoiner) finish(ctx context.Context) error {
	seq := "property_ids_" + j.region
	parity := 1
	if j.region == regionEU {
		parity = 0
	}
	tx, err := j.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var highest sql.NullInt64
	if err := tx.QueryRowContext(ctx, `SELECT max(id) FROM properties WHERE id > 1000 AND id % 2 = $1`, parity).Scan(&highest); err != nil {
		return fmt.Errorf("rejoin: highest id: %w", err)
	}
	// seq is one of two constant names: no injection is possible.
	// GREATEST ignores a NULL highest: a region that holds no id of its own.
	var next int64
	if err := tx.QueryRowContext(ctx, `SELECT setval('`+seq+`', GREATEST(last_value, $1) + $2) + 2 FROM `+seq,
		highest, 2*lostIDsAtMost).Scan(&next); err != nil {
		return fmt.Errorf("rejoin: move the id sequence: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM rejoin`); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	j.logger.Info("rejoin: the id sequence skipped the ids a lost database may have handed out",
		"sequence", seq, "highest_held", highest.Int64, "next_id", next)
	return nil
}

// rejoinCommand is "property-listing rejoin [--from-nothing]": it makes the
// region of the environment's database rejoin, and waits until its running
// instances have rebuilt it, printing the progress.
func rejoinCommand(ctx context.Context, args []string, cfg config, out func(string)) error {
	fromNothing := false
	for _, a := range args {
		switch a {
		case "--from-nothing":
			fromNothing = true
		default:
			return fmt.Errorf("rejoin: unknown argument %q (the only one is --from-nothing)", a)
		}
	}
	db, err := openDB(cfg.databaseURL, 1, replicationLimits)
	if err != nil {
		return err
	}
	defer db.Close()
	reason := "asked for by an operator"
	if fromNothing {
		reason += ", from nothing"
	}
	if err := requestRejoin(ctx, db, reason, fromNothing); err != nil {
		return fmt.Errorf("rejoin: %w", err)
	}
	out("region " + cfg.region + " is rejoining; the running instances rebuild it from " + peerOf(cfg.region))
	last := ""
	for {
		var phase string
		var listings, requests int64
		err := db.QueryRowContext(ctx, `SELECT phase, listings, requests FROM rejoin`).Scan(&phase, &listings, &requests)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			out("region " + cfg.region + " has rejoined and serves again")
			return nil
		case err != nil && ctx.Err() != nil:
			return ctx.Err()
		case err == nil:
			if line := phase + ": " + strconv.FormatInt(listings, 10) + " listings, " + strconv.FormatInt(requests, 10) + " request records copied"; line != last {
				out(line)
				last = line
			}
		}
		if !sleep(ctx, time.Second) {
			return ctx.Err()
		}
	}
}
