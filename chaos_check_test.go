//go:build integration && chaos

package main

// The fault campaign's checker and report (the campaign: chaos_test.go).
// After the last fault is healed and both regions have drained their
// backlogs, it reads the final state and judges it, with the history of
// every request, by these rules:
//
//  1. both regions hold identical rows, every listing;
//  2. every acknowledged write is the final row, or built upon by it (on
//     the chain of writes, each built on the last, that the request records
//     follow back from the final row), or recorded lost at /{region}/conflicts
//     in either region: none was lost without a trace. (Ordered below the
//     final row by the conflict rule is not enough: EU's A, US's B, both
//     from version 1, and EU's C on A leave C, greater than B and not built
//     on it);
//  3. every final row is a value some client wrote (acknowledged or unknown)
//     or the one the campaign began from: nothing invented, nothing refused
//     took effect;
//  4. per request id, both regions hold the same record, and no request id
//     was acknowledged for two different writes;
//  5. no event stayed in an outbox, and the dead-letter topic gained nothing
//     (the workload sends no poison);
//  6. whenever a region's lag report said L, every write of the peer
//     acknowledged more than L before was there (a sample of the report,
//     then of the rows, every half second of the run).
//
// Rule 7 is judged by its own scenario after the campaign (longOutage), and
// rule 8 by the history alone:
//
//  8. no answer to a request that carried a session token shows a listing
//     at an older version than one its session had seen or written (half
//     the clients carry one, session.go).

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	gocmp "github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// chaosFinal is the state the checker judges.
type chaosFinal struct {
	us, eu    []Property
	requests  map[string][]requestRecord // region: the campaign's request records
	outbox    map[string]int             // region: events not yet published
	stopped   map[string]string          // region: why replication stopped, if it did
	conflicts map[string]int64           // region: conflicts resolved (since the backend started)
	lost      map[string]bool            // request ids recorded lost, in either region
	dlqAdded  int64
	converged bool
	// published are the request ids, of those a restore may have taken
	// back, whose events are in the topic: they left their region's
	// outbox, so a restore cannot excuse their loss (publishedRequests).
	published map[string]bool
}

// requestRecord is a row of processed_requests, but for processed_at (each
// region's own clock at the time it learned of the request).
type requestRecord struct {
	RequestID, Fingerprint string
	PropertyID             int64
	Price                  string
	RegionOrigin           string
	Version                int64
	UpdatedAt              time.Time
	Deleted                bool
	Parent                 string // the state the write was built on; "" for a create
}

// settle heals nothing: it waits for the healed stack to converge. Both
// regions answer from their own backend, their lag reports show nothing
// left to send or read, and their tables are identical. It returns whether
// they got there within timeout.
func settle(s *stack, dbs map[string]*sql.DB, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 2 * time.Second}
	drained := func(region string) bool {
		resp, err := client.Get(s.url + "/" + region + "/replication-lag")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var r LagReport
		return decodeJSON(resp, &r) == nil && r.Region == region &&
			r.OutboxBacklog == 0 && r.RecordsBehind == 0 && r.LagSeconds < 1
	}
	for time.Now().Before(deadline) {
		if drained("us") && drained("eu") {
			a, errA := readAll(dbs["us"])
			b, errB := readAll(dbs["eu"])
			if errA == nil && errB == nil && gocmp.Equal(a, b) {
				return true
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return false
}

// finalState reads what the checker judges from both regions.
func finalState(t *testing.T, s *stack, dbs map[string]*sql.DB, requestPrefix string) chaosFinal {
	t.Helper()
	f := chaosFinal{
		requests: map[string][]requestRecord{}, outbox: map[string]int{},
		stopped: map[string]string{}, conflicts: map[string]int64{}, lost: map[string]bool{},
	}
	f.us, f.eu = allProperties(t, dbs["us"]), allProperties(t, dbs["eu"])
	for region, db := range dbs {
		rows, err := db.Query(`SELECT request_id, fingerprint, property_id, price::text, region_origin, version, updated_at, deleted, coalesce(parent, '')
FROM processed_requests WHERE starts_with(request_id, $1) ORDER BY request_id`, requestPrefix)
		if err != nil {
			t.Fatalf("read %s's request records: %v", region, err)
		}
		for rows.Next() {
			var r requestRecord
			if err := rows.Scan(&r.RequestID, &r.Fingerprint, &r.PropertyID, &r.Price, &r.RegionOrigin, &r.Version, &r.UpdatedAt, &r.Deleted, &r.Parent); err != nil {
				t.Fatalf("read %s's request records: %v", region, err)
			}
			r.UpdatedAt = r.UpdatedAt.UTC()
			f.requests[region] = append(f.requests[region], r)
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("read %s's request records: %v", region, err)
		}
		rows.Close()
		lost, err := db.Query(`SELECT lost_request_id FROM conflicts WHERE starts_with(lost_request_id, $1)`, requestPrefix)
		if err != nil {
			t.Fatalf("read %s's conflict records: %v", region, err)
		}
		for lost.Next() {
			var id string
			if err := lost.Scan(&id); err != nil {
				t.Fatalf("read %s's conflict records: %v", region, err)
			}
			f.lost[id] = true
		}
		lost.Close()
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM outbox`).Scan(&n); err != nil {
			t.Fatalf("read %s's outbox: %v", region, err)
		}
		f.outbox[region] = n
		r := s.lag(t, region)
		f.stopped[region] = r.ReplicationStopped
		f.conflicts[region] = r.Conflicts
	}
	return f
}

// deadLetters returns how many records the dead-letter topic has ever had
// (the end offset of its one partition).
func deadLetters(t *testing.T) int64 {
	t.Helper()
	req := kmsg.NewPtrListOffsetsRequest()
	rt := kmsg.NewListOffsetsRequestTopic()
	rt.Topic = setting("KAFKA_TOPIC", "property-updates") + ".dlq"
	rp := kmsg.NewListOffsetsRequestTopicPartition()
	rp.Partition, rp.Timestamp = 0, -1 // -1: the end
	rt.Partitions = append(rt.Partitions, rp)
	req.Topics = append(req.Topics, rt)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, kafkaAdmin(t))
	if err != nil {
		t.Fatalf("the dead-letter topic's end: %v", err)
	}
	for _, topic := range resp.Topics {
		for _, p := range topic.Partitions {
			if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
				t.Fatalf("the dead-letter topic's end: %v", err)
			}
			return p.Offset
		}
	}
	t.Fatal("the dead-letter topic's end: no partition in the answer")
	return 0
}

// publishedRequests returns which of ids have an event in the topic: it
// reads the whole topic, from its start to its end.
func publishedRequests(t *testing.T, ids map[string]bool) map[string]bool {
	t.Helper()
	found := map[string]bool{}
	if len(ids) == 0 {
		return found
	}
	topic := setting("KAFKA_TOPIC", "property-updates")
	kafka := kafkaAdmin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ends, err := endOffsets(ctx, kafka, topic)
	if err != nil {
		t.Fatalf("the topic's end: %v", err)
	}
	from := map[int32]kgo.Offset{}
	for p, end := range ends {
		if end > 0 {
			from[p] = kgo.NewOffset().AtStart()
		}
	}
	reader, err := kgo.NewClient(kgo.SeedBrokers(stackBrokers()...), kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: from}))
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	for len(from) > 0 {
		fetches := reader.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading the topic: %v", ctx.Err())
		}
		fetches.EachRecord(func(rec *kgo.Record) {
			if rec.Offset+1 >= ends[rec.Partition] {
				delete(from, rec.Partition)
			}
			if header(rec, headerKind) != kindEvent {
				return
			}
			var e struct {
				RequestID string `json:"request_id"`
			}
			if json.Unmarshal(rec.Value, &e) == nil && ids[e.RequestID] {
				found[e.RequestID] = true
			}
		})
	}
	return found
}

// ------------------------------------------------------------------- checker

// ruleResult is one rule's verdict.
type ruleResult struct {
	rule           int
	name           string
	pass           bool
	detail         string // what was checked, when it passed
	counterexample string // the first violation, when it failed
}

// check judges the final state and the history by rules 1 to 6 and 8.
func check(history []op, initial map[int64]Property, f chaosFinal, samples []lagSample, restores []restoreWindow) []ruleResult {
	final := map[int64]Property{}
	for _, p := range f.us {
		final[p.ID] = p
	}
	byListing := map[int64][]op{}
	for _, o := range history {
		if o.Kind != "GET" && o.ID != 0 {
			byListing[o.ID] = append(byListing[o.ID], o)
		}
	}
	writes := func(id int64) string { return describeWrites(byListing[id]) }
	return []ruleResult{
		ruleIdentical(f, writes),
		ruleNoneLost(history, final, f, writes, restores),
		ruleNothingInvented(history, initial, final, writes),
		ruleRequestIDs(history, f, restores),
		ruleNothingStuck(f),
		ruleLagHonest(history, samples, writes, restores),
		ruleSessions(history, f, restores),
	}
}

// ruleSessions is rule 8. A session has seen what the answers that gave
// it a token (2xx) showed; any later answer to it, a 404, 409, 410 or 412
// included, must show the listing at that version or a later one. A state
// that a restore took back (shown by the restored region within the
// restore's window, and in neither region's request records at the end)
// is the restore's RPO, counted apart.
func ruleSessions(history []op, f chaosFinal, restores []restoreWindow) ruleResult {
	r := ruleResult{rule: 8, name: "a session never reads back in time", pass: true}
	// The states some request record names, by listing, tag and price: a
	// restore takes back the region's id sequence too, so a listing lost
	// with it has its id, version and region given again to a new one,
	// but not its price (each write's price is its own).
	recorded := map[string]bool{}
	for _, records := range f.requests {
		for _, rec := range records {
			recorded[fmt.Sprintf("%d %s %s", rec.PropertyID, tagValue(rec.Version, rec.RegionOrigin), rec.Price)] = true
		}
	}
	// takenBack is the restore that may have taken back the state o showed:
	// shown by the restored region within its window, and recorded nowhere
	// at the end.
	takenBack := func(o op) *restoreWindow {
		for i, w := range restores {
			if o.Shown.RegionOrigin == w.region && !o.End.Before(w.from) && !o.End.After(w.to) &&
				!recorded[fmt.Sprintf("%d %s %s", o.ID, tagValue(o.Shown.Version, o.Shown.RegionOrigin), o.Shown.Price)] {
				return &restores[i]
			}
		}
		return nil
	}
	// What a session has seen of a listing: the highest version, and the
	// highest no restore can have taken back, with the answers that showed
	// them.
	type seenState struct {
		top, kept     int64
		topBy, keptBy op
	}
	seen := map[int]map[int64]*seenState{}
	var answers, excused int
	var cost sessionCost
	for _, req := range history {
		if !req.Session {
			continue
		}
		cost.add(req)
		for _, o := range req.views() {
			answers++
			if seen[o.Client] == nil {
				seen[o.Client] = map[int64]*seenState{}
			}
			had := seen[o.Client][o.ID]
			if had == nil {
				had = &seenState{}
				seen[o.Client][o.ID] = had
			}
			v := o.Shown.Version
			var against op // the answer this one went back from, if it did
			switch {
			case v < had.kept:
				against = had.keptBy
			case v < had.top:
				// Below only what a restore took back, and shown after it.
				if w := takenBack(had.topBy); w != nil && o.Start.After(w.to) {
					excused++
				} else {
					against = had.topBy
				}
			}
			if against.Shown != nil && r.pass {
				r.pass = false
				r.counterexample = fmt.Sprintf("client %d saw listing %d at version %d (%s %s, %d, served by %s, at %s), then %s %s answered %d showing version %d (served by %s, at %s)",
					o.Client, o.ID, against.Shown.Version, against.Kind, against.path(), against.Status, against.ServedBy, against.End.Format("15:04:05.000"),
					o.Kind, o.path(), o.Status, v, o.ServedBy, o.End.Format("15:04:05.000"))
			}
			if o.Status/100 != 2 && o.Status != http.StatusNotModified {
				continue // no token came with it: not what the session saw
			}
			if v > had.top {
				had.top, had.topBy = v, o
			}
			if v > had.kept && takenBack(o) == nil {
				had.kept, had.keptBy = v, o
			}
		}
	}
	r.detail = fmt.Sprintf("%d requests of %d sessions carried a token, %d listings their answers showed (a list page shows several, a 304 the state it confirms) checked against what their session had seen: "+
		"%d waited for the serving region to catch up (p50 %s, p99 %s), %d answered 503 \"not caught up\"; %d older states excused by a restore",
		cost.requests, len(seen), answers, len(cost.waits), quantileMs(cost.waits, 0.5), quantileMs(cost.waits, 0.99), cost.behind, excused)
	return r
}

// sessionCost is what a set of requests cost their sessions: how many
// the serving region answered only after waiting for the session's writes,
// how long it waited, how many it refused as not caught up, and how long
// the clients waited for an answer.
type sessionCost struct {
	requests, answered, behind int
	waits, latencies           []time.Duration
}

func (c *sessionCost) add(o op) {
	c.requests++
	if o.Status > 0 && o.Status < 500 {
		c.answered++
	}
	if o.SessionWait > 0 {
		c.waits = append(c.waits, o.SessionWait)
	}
	if o.SessionBehind {
		c.behind++
	}
	c.latencies = append(c.latencies, o.End.Sub(o.Start))
}

// quantileMs is the q quantile of d, in milliseconds ("-" for none).
func quantileMs(d []time.Duration, q float64) string {
	if len(d) == 0 {
		return "-"
	}
	sorted := slices.Clone(d)
	slices.Sort(sorted)
	return fmt.Sprintf("%.0f ms", float64(sorted[int(q*float64(len(sorted)-1))].Microseconds())/1000)
}

func ruleIdentical(f chaosFinal, writes func(int64) string) ruleResult {
	r := ruleResult{rule: 1, name: "both regions identical", pass: true}
	eu := map[int64]Property{}
	for _, p := range f.eu {
		eu[p.ID] = p
	}
	seen := 0
	for _, a := range f.us {
		b, ok := eu[a.ID]
		delete(eu, a.ID)
		if !ok || !gocmp.Equal(a, b) {
			r.pass = false
			r.counterexample = fmt.Sprintf("listing %d: us %s, eu %s; writes: %s", a.ID, rowString(&a), rowString(ptrIf(b, ok)), writes(a.ID))
			return r
		}
		seen++
	}
	for id, b := range eu {
		r.pass = false
		r.counterexample = fmt.Sprintf("listing %d: only eu has it, %s; writes: %s", id, rowString(&b), writes(id))
		return r
	}
	for region, why := range f.stopped {
		if why != "" {
			r.pass = false
			r.counterexample = fmt.Sprintf("%s stopped replicating: %s", region, why)
			return r
		}
	}
	r.detail = fmt.Sprintf("%d rows alike; converged after the last heal: %v", seen, f.converged)
	if !f.converged {
		r.pass = false
		r.counterexample = "the regions did not converge in time after the last heal"
	}
	return r
}

// restoreWindow is a region's database restored from a backup: taken at
// from, restored at to. A write the region acknowledged in between may be
// lost with it, if it had not left the region's outbox when the database
// was taken back: the restore's RPO, counted, not a failure of rule 2.
type restoreWindow struct {
	region   string
	from, to time.Time
}

// lostToRestore reports whether o's write may have been lost to a restore:
// acknowledged by the restored region within the window.
func lostToRestore(o op, restores []restoreWindow) bool {
	for _, w := range restores {
		if o.Row != nil && o.Row.RegionOrigin == w.region && !o.End.Before(w.from) && !o.End.After(w.to) {
			return true
		}
	}
	return false
}

func ruleNoneLost(history []op, final map[int64]Property, f chaosFinal, writes func(int64) string, restores []restoreWindow) ruleResult {
	r := ruleResult{rule: 2, name: "no acknowledged write lost without a trace", pass: true}
	// Each listing's writes by tag, from both regions' request records: the
	// request that made it and the state it was built on.
	type made struct{ requestID, parent string }
	byTag := map[int64]map[string]made{}
	byVersion := map[int64]map[int64][]made{}
	for _, records := range f.requests {
		for _, rec := range records {
			if byTag[rec.PropertyID] == nil {
				byTag[rec.PropertyID], byVersion[rec.PropertyID] = map[string]made{}, map[int64][]made{}
			}
			tag := tagValue(rec.Version, rec.RegionOrigin)
			if _, dup := byTag[rec.PropertyID][tag]; !dup {
				byVersion[rec.PropertyID][rec.Version] = append(byVersion[rec.PropertyID][rec.Version], made{rec.RequestID, rec.Parent})
			}
			byTag[rec.PropertyID][tag] = made{rec.RequestID, rec.Parent}
		}
	}
	// A request written in both regions is one that was retried or failed
	// over: sent more than once, or once without a definite answer.
	sends := map[string]int{}
	for _, o := range history {
		sends[o.RequestID]++
		if o.Outcome != opOK && o.Outcome != opFail {
			sends[o.RequestID]++
		}
	}
	// The tags the history saw acknowledged, with the requests that made
	// them: a request written in both regions keeps the record of only one
	// of its writes, and the other is known from its answer alone.
	answered := map[int64]map[string][]string{}
	for _, o := range history {
		if o.Outcome != opOK || o.Row == nil || o.Kind == "GET" {
			continue
		}
		if answered[o.Row.ID] == nil {
			answered[o.Row.ID] = map[string][]string{}
		}
		tag := tagValue(o.Row.Version, o.Row.RegionOrigin)
		if !slices.Contains(answered[o.Row.ID][tag], o.RequestID) {
			answered[o.Row.ID][tag] = append(answered[o.Row.ID][tag], o.RequestID)
		}
	}
	// The requests on the chain the final row was built on, itself first. A
	// request written in both regions (a replay) keeps one record, the
	// greater write's; a write built on the other one finds no record of
	// its parent's tag. The chain then goes on from the record of the same
	// version, if that is such a request's; or, when the replay landed at
	// another version (the other region had moved on), from the one answer
	// that showed the tag, if its request is such a request, and then from
	// the one record of the version below, the only write it can have been
	// built on. Where either is ambiguous the chain stops: the checker may
	// then fail a write that was kept, never pass one that was lost.
	chain := func(id int64, version int64, tag string, requests map[string]bool) map[string]bool {
		for n := 0; tag != "" && n < 100_000; n++ {
			m, ok := byTag[id][tag]
			if !ok {
				twins := byVersion[id][version]
				if len(twins) == 1 && sends[twins[0].requestID] >= 2 {
					m = twins[0]
				} else if by := answered[id][tag]; len(by) == 1 && sends[by[0]] >= 2 && len(byVersion[id][version-1]) == 1 {
					requests[by[0]] = true
					m = byVersion[id][version-1][0]
					version--
				} else {
					break
				}
			}
			requests[m.requestID] = true
			tag = m.parent
			if v, _, ok := strings.Cut(tag, "-"); ok {
				version, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		return requests
	}
	// A conflict record names the write that lost; the writes it was built
	// on, back to where its line left the winner's, lost with it, and the
	// record's chain of parents names them too.
	lostWith := map[string]bool{}
	for _, records := range f.requests {
		for _, rec := range records {
			if f.lost[rec.RequestID] {
				chain(rec.PropertyID, rec.Version, tagValue(rec.Version, rec.RegionOrigin), lostWith)
			}
		}
	}
	chains := map[int64]map[string]bool{}
	n, builtOn, recorded, recordedUnder, restored := 0, 0, 0, 0, 0
	for _, o := range history {
		if o.Outcome != opOK || o.Row == nil || o.Kind == "GET" {
			continue
		}
		n++
		got, ok := final[o.Row.ID]
		if ok && chains[o.Row.ID] == nil {
			chains[o.Row.ID] = chain(got.ID, got.Version, tagValue(got.Version, got.RegionOrigin), map[string]bool{})
		}
		switch {
		case ok && o.Row.Version == got.Version && o.Row.RegionOrigin == got.RegionOrigin:
		case ok && chains[o.Row.ID][o.RequestID]:
			builtOn++
		case f.lost[o.RequestID]:
			recorded++
		case lostWith[o.RequestID]:
			recordedUnder++
		case lostToRestore(o, restores) && !f.published[o.RequestID]:
			restored++
		default:
			r.pass = false
			r.counterexample = fmt.Sprintf("%s %s (request %s) acknowledged %s at %s, but the final row is %s, not built on it, and no region recorded it lost; writes: %s",
				o.Kind, o.path(), o.RequestID, rowString(o.Row), o.End.Format(time.TimeOnly), rowString(ptrIf(got, ok)), writes(o.Row.ID))
			return r
		}
	}
	r.detail = fmt.Sprintf("%d acknowledged writes: %d final, %d built upon by the final row, %d recorded lost, %d built upon by a write recorded lost",
		n, n-builtOn-recorded-recordedUnder-restored, builtOn, recorded, recordedUnder)
	if len(restores) > 0 {
		r.detail += fmt.Sprintf("; %d restores from a backup lost %d writes that had not left the restored region's outbox (the RPO)", len(restores), restored)
	}
	return r
}

func ruleNothingInvented(history []op, initial, final map[int64]Property, writes func(int64) string) ruleResult {
	r := ruleResult{rule: 3, name: "nothing invented", pass: true}
	// Each price was written by one request (its attempts share it).
	byPrice := map[Money][]op{}
	deletes := map[int64][]op{}
	for _, o := range history {
		switch o.Kind {
		case "PUT", "POST":
			byPrice[o.Price] = append(byPrice[o.Price], o)
		case "DELETE":
			deletes[o.ID] = append(deletes[o.ID], o)
		}
	}
	// mayHaveHappened: an attempt acknowledged or unknown, on this listing
	// (a POST not answered names none), and if acknowledged, this row.
	mayHaveHappened := func(ops []op, p Property, sameRow bool) bool {
		for _, o := range ops {
			if o.Outcome == opFail || (o.ID != 0 && o.ID != p.ID) {
				continue
			}
			if o.Outcome == opOK && sameRow && !o.mayHaveWritten(p.ID, p.Version, p.RegionOrigin) {
				continue
			}
			return true
		}
		return false
	}
	checked := 0
	for id, p := range final {
		start, existed := initial[id]
		if existed && gocmp.Equal(start, p) {
			continue
		}
		checked++
		if !existed && p.Price < 100_000_000 {
			r.pass = false
			r.counterexample = fmt.Sprintf("listing %d appeared (%s) and no client created it", id, rowString(&p))
			return r
		}
		valueWritten := (existed && start.Price == p.Price) || mayHaveHappened(byPrice[p.Price], p, !p.Deleted)
		if !valueWritten {
			r.pass = false
			r.counterexample = fmt.Sprintf("listing %d holds %s: its price was written by no request that may have happened (%s); writes: %s",
				id, rowString(&p), describeWrites(byPrice[p.Price]), writes(id))
			return r
		}
		if p.Deleted && !mayHaveHappened(deletes[id], p, true) {
			r.pass = false
			r.counterexample = fmt.Sprintf("listing %d is a tombstone %s that no DELETE that may have happened wrote; writes: %s", id, rowString(&p), writes(id))
			return r
		}
	}
	r.detail = fmt.Sprintf("%d listings changed during the run, each to a value a request that may have happened wrote", checked)
	return r
}

// mayHaveWritten reports whether the write (id, version, region) may be
// the acknowledged op's: the row its answer describes, or, when the answer
// came from the other region than the prefix's (NGINX failed over after a
// timeout or a 5xx), the same write made by the prefix's region, whose
// first attempt may have committed unseen. Both attempts carry the version
// the request named, so they are siblings the conflict rule orders.
func (o op) mayHaveWritten(id, version int64, region string) bool {
	if o.Row == nil || o.Row.ID != id || o.Row.Version != version {
		return false
	}
	failedOver := o.Status/100 == 2 && o.Row.RegionOrigin != o.Prefix
	return region == o.Row.RegionOrigin || failedOver && region == o.Prefix
}

func ruleRequestIDs(history []op, f chaosFinal, restores []restoreWindow) ruleResult {
	r := ruleResult{rule: 4, name: "one record, one write per request id", pass: true}
	if d := gocmp.Diff(f.requests["us"], f.requests["eu"]); d != "" {
		r.pass = false
		r.counterexample = "the regions' request records differ (-us +eu): " + firstLines(d, 12)
		return r
	}
	// Each request id's acknowledged writes, by the region that made them
	// (a retry's 422 names the original, made wherever it was).
	acks := map[string]map[string]*Property{}
	ackOps := map[string][]op{}
	raced := 0
	// A request id whose write a restore may have taken back is one the
	// region may write again, under the same id: after its loss, not a
	// second write of one request.
	restored := map[string]bool{}
	for _, o := range history {
		if o.Kind != "GET" && lostToRestore(o, restores) {
			restored[o.RequestID] = true
		}
	}
	for _, o := range history {
		if o.Row == nil || o.Kind == "GET" || restored[o.RequestID] {
			continue
		}
		byRegion := acks[o.RequestID]
		if byRegion == nil {
			byRegion = map[string]*Property{}
			acks[o.RequestID] = byRegion
		}
		// Within one region a request id is one write, whatever the body:
		// the region knows the id from its first write on.
		if prev, ok := byRegion[o.Row.RegionOrigin]; ok && (prev.ID != o.Row.ID || prev.Version != o.Row.Version) {
			r.pass = false
			r.counterexample = fmt.Sprintf("request %s acknowledged as two writes in %s: %s and %s", o.RequestID, o.Row.RegionOrigin, rowString(prev), rowString(o.Row))
			return r
		}
		byRegion[o.Row.RegionOrigin] = o.Row
		ackOps[o.RequestID] = append(ackOps[o.RequestID], o)
		if o.Resend && o.Outcome == opOK {
			raced++
		}
	}
	records := map[string]requestRecord{}
	for _, rec := range f.requests["us"] {
		records[rec.RequestID] = rec
	}
	// Across regions a request id can be written twice, when the second
	// reached the other region before the first write did (a failover
	// replay, or a re-send with another body); the conflict rule keeps
	// one, and the record must name it.
	for id, byRegion := range acks {
		rec, ok := records[id]
		named := false
		for _, o := range ackOps[id] {
			named = named || ok && o.mayHaveWritten(rec.PropertyID, rec.Version, rec.RegionOrigin)
		}
		if !named {
			r.pass = false
			r.counterexample = fmt.Sprintf("request %s acknowledged as %s, but its record is %+v (found: %v)", id, rowStrings(byRegion), rec, ok)
			return r
		}
	}
	r.detail = fmt.Sprintf("%d request records alike in both regions; %d request ids acknowledged, each as one write per region and its record naming one of them; %d re-sends with another body accepted by the other region before the first write reached it", len(f.requests["us"]), len(acks), raced)
	return r
}

// rowStrings lists a request id's writes, one per region.
func rowStrings(byRegion map[string]*Property) string {
	var out []string
	for _, region := range slices.Sorted(maps.Keys(byRegion)) {
		out = append(out, rowString(byRegion[region]))
	}
	return strings.Join(out, " and ")
}

func ruleNothingStuck(f chaosFinal) ruleResult {
	r := ruleResult{rule: 5, name: "outboxes empty, no dead letters", pass: true}
	if f.outbox["us"] != 0 || f.outbox["eu"] != 0 {
		r.pass = false
		r.counterexample = fmt.Sprintf("events left in the outbox: us %d, eu %d", f.outbox["us"], f.outbox["eu"])
		return r
	}
	if f.dlqAdded != 0 {
		r.pass = false
		r.counterexample = fmt.Sprintf("%d records sent to the dead-letter topic during the run (the workload sends none that should be)", f.dlqAdded)
		return r
	}
	r.detail = "outboxes empty in both regions; the dead-letter topic gained 0 records"
	return r
}

func ruleLagHonest(history []op, samples []lagSample, writes func(int64) string, restores []restoreWindow) ruleResult {
	r := ruleResult{rule: 6, name: "the lag report never understates", pass: true}
	type ackedOp struct {
		op
		i int // its place in the history
	}
	var acked []ackedOp // acknowledged writes, by completion
	for i, o := range history {
		if o.Outcome == opOK && o.Row != nil && o.Kind != "GET" {
			acked = append(acked, ackedOp{o, i})
		}
	}
	slices.SortFunc(acked, func(a, b ackedOp) int { return a.End.Compare(b.End) })
	// Per region: the highest row of each listing read so far (rows only
	// move up, by the rule, so it still holds at least that), and how far
	// into acked the region was checked: a write checked once stays held.
	seen := map[string]map[int64]Property{"us": {}, "eu": {}}
	checked := map[string]int{}
	checks, aboutZero := 0, 0
	for _, s := range samples {
		if s.lag < 1 {
			aboutZero++
		}
		for id, got := range s.rows {
			if cur, ok := seen[s.region][id]; !ok || compareWrites(got, cur) > 0 {
				seen[s.region][id] = got
			}
		}
		// The report, asked for at s.sent, says every peer write that
		// committed before s.sent - lag is applied; a write acknowledged
		// before then committed before then. A write the sampler had not
		// heard of yet waits for the next sample.
		vouched := s.sent.Add(-time.Duration(s.lag * float64(time.Second)))
		for ; checked[s.region] < len(acked); checked[s.region]++ {
			o := acked[checked[s.region]]
			if !o.End.Before(vouched) || o.i >= s.heard {
				break
			}
			// A write a restore took back from its region (the RPO) is
			// no longer one the peer committed: nothing can bring it.
			if o.Row.RegionOrigin != peerOf(s.region) || lostToRestore(o.op, restores) {
				continue
			}
			checks++
			got, ok := seen[s.region][o.Row.ID]
			if !ok || compareWrites(got, *o.Row) < 0 {
				r.pass = false
				r.counterexample = fmt.Sprintf("%s's lag report at %s read %.3f s, but %s's write %s (request %s, acknowledged %s) was missing: %s held %s; writes: %s",
					s.region, s.sent.Format("15:04:05.000"), s.lag, o.Row.RegionOrigin, rowString(o.Row), o.RequestID,
					o.End.Format("15:04:05.000"), s.region, rowString(ptrIf(got, ok)), writes(o.Row.ID))
				return r
			}
		}
	}
	r.detail = fmt.Sprintf("%d samples (%d read under a second), %d peer writes checked against them", len(samples), aboutZero, checks)
	return r
}

// ---------------------------------------------------------------- reporting

// report is the campaign's account of itself.
type report struct {
	settings    chaosSettings
	topology    string
	kinds       []faultKind
	ops         []op
	faults      []faultRun
	results     []ruleResult
	final       chaosFinal
	samples     []lagSample
	converged   bool
	convergence time.Duration
}

// writes counts the acknowledged writes.
func (r report) writes() (n int) {
	for _, o := range r.ops {
		if o.Kind != "GET" && o.Outcome == opOK {
			n++
		}
	}
	return n
}

// activeAt returns the kinds of fault in force at t.
func (r report) activeAt(t time.Time) []string {
	var kinds []string
	for _, f := range r.faults {
		if !t.Before(f.applied) && t.Before(f.healed) && !slices.Contains(kinds, f.kind) {
			kinds = append(kinds, f.kind)
		}
	}
	return kinds
}

func (r report) markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# Fault campaign, seed %d, topology %s\n\n", r.settings.seed, r.topology)
	env := ""
	if r.settings.clients != 16 {
		env = fmt.Sprintf("CHAOS_CLIENTS=%d ", r.settings.clients)
	}
	p("%v of load from %d clients through NGINX, %d faults; `%s./stack.sh chaos %v %d` runs it again with the same faults.\n\n",
		r.settings.duration, r.settings.clients, len(r.faults), env, r.settings.duration, r.settings.seed)

	p("## Checker\n\n| rule | verdict | what was checked, or the first counterexample |\n|---|---|---|\n")
	for _, res := range r.results {
		verdict, text := "PASS", res.detail
		if !res.pass {
			verdict, text = "**FAIL**", res.counterexample
		}
		p("| %d. %s | %s | %s |\n", res.rule, res.name, verdict, strings.ReplaceAll(text, "|", "\\|"))
	}

	p("\n## Operations\n\n| request | ok | fail (4xx) | unknown | statuses |\n|---|---|---|---|---|\n")
	for _, kind := range []string{"PUT", "POST", "DELETE", "GET", "of which with If-None-Match", "list page", "PUT re-sent with another body", "retries (same request id)"} {
		var ok, fail, unknown int
		statuses := map[int]int{}
		for _, o := range r.ops {
			match := o.Kind == kind && !o.Resend && o.List == ""
			switch kind {
			case "of which with If-None-Match":
				match = o.Cached != nil
			case "list page":
				match = o.List != ""
			case "PUT re-sent with another body":
				match = o.Resend
			case "retries (same request id)":
				match = o.Attempt > 0
			}
			if !match {
				continue
			}
			statuses[o.Status]++
			switch o.Outcome {
			case opOK:
				ok++
			case opFail:
				fail++
			default:
				unknown++
			}
		}
		p("| %s | %d | %d | %d | %s |\n", kind, ok, fail, unknown, statusList(statuses))
	}
	p("\nAcknowledged writes: %d. Lost races answered 409: %d. Conflicts the replication resolved (counters since each backend last started): us %d, eu %d.\n",
		r.writes(), r.count(func(o op) bool { return o.Status == http.StatusConflict }), r.final.conflicts["us"], r.final.conflicts["eu"])

	p("\nFailovers: %d faults during which NGINX answered a prefix from the other region's backend.\n", r.failovers())

	p("\n## Sessions\n\nThe even-numbered clients send back the X-Session-Token of their last answer; the others send none. What a session costs:\n\n")
	p("| requests | answered | waited for the serving region (Server-Timing) | wait p50 | wait p99 | wait max | 503 not caught up | latency p50 | latency p99 |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, session := range []bool{true, false} {
		var c sessionCost
		for _, o := range r.ops {
			if o.Session == session {
				c.add(o)
			}
		}
		label := map[bool]string{true: "with a token", false: "without"}[session]
		p("| %s: %d | %d | %d | %s | %s | %s | %d | %s | %s |\n", label, c.requests, c.answered, len(c.waits),
			quantileMs(c.waits, 0.5), quantileMs(c.waits, 0.99), quantileMs(c.waits, 1), c.behind, quantileMs(c.latencies, 0.5), quantileMs(c.latencies, 0.99))
	}

	p("\n## Faults\n\n| fault | times | held, total | held, longest | failed to cause or heal |\n|---|---|---|---|---|\n")
	for _, k := range r.kinds {
		var n, failed int
		var total, longest time.Duration
		for _, f := range r.faults {
			if f.kind != k.name {
				continue
			}
			n++
			d := f.healed.Sub(f.applied)
			total += d
			longest = max(longest, d)
			if f.err != nil {
				failed++
			}
		}
		p("| %s | %d | %.1f s | %.1f s | %d |\n", k.name, n, total.Seconds(), longest.Seconds(), failed)
	}

	p("\n## Availability through NGINX\n\nWhile each kind of fault was in force: the share of requests answered 2xx, 409 or 422 (the service's own answers to a request it could judge), and the share answered at all (any status below 500: the rest are 5xx or no answer, outcomes the client cannot know). A request counts under every kind in force when it was sent; \"alone\" counts only the requests sent while that kind was the only one.\n\n")
	p("| in force | requests | 2xx, 409, 422 | answered at all | alone: requests | alone: answered at all |\n|---|---|---|---|---|---|\n")
	share := func(part, whole int) string {
		if whole == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f%%", 100*float64(part)/float64(whole))
	}
	for _, kind := range append([]string{"nothing"}, kindNames(r.kinds)...) {
		var n, judged, answered, alone, aloneAnswered int
		for _, o := range r.ops {
			active := r.activeAt(o.Start)
			if (kind == "nothing" && len(active) == 0) || slices.Contains(active, kind) {
				n++
				if o.Status/100 == 2 || o.Status == http.StatusConflict || o.Status == http.StatusUnprocessableEntity {
					judged++
				}
				if o.Status > 0 && o.Status < 500 {
					answered++
				}
				if len(active) <= 1 {
					alone++
					if o.Status > 0 && o.Status < 500 {
						aloneAnswered++
					}
				}
			}
		}
		p("| %s | %d | %s | %s | %d | %s |\n", kind, n, share(judged, n), share(answered, n), alone, share(aloneAnswered, alone))
	}
	p("\nFrom the last heal to both regions drained and identical: %.1f s (converged: %v).\n", r.convergence.Seconds(), r.converged)
	return b.String()
}

// failovers counts the faults during which some request was answered by
// the other region's backend than its prefix names.
func (r report) failovers() (n int) {
	for _, f := range r.faults {
		for _, o := range r.ops {
			if o.ServedBy != "" && o.ServedBy != o.Prefix && !o.Start.Before(f.applied) && o.Start.Before(f.healed) {
				n++
				break
			}
		}
	}
	return n
}

func (r report) count(f func(op) bool) (n int) {
	for _, o := range r.ops {
		if f(o) {
			n++
		}
	}
	return n
}

func kindNames(kinds []faultKind) (names []string) {
	for _, k := range kinds {
		names = append(names, k.name)
	}
	return names
}

// ------------------------------------------------------------------ helpers

func (o op) path() string {
	switch {
	case o.List != "":
		return "/" + o.Prefix + "/properties?" + o.List
	case o.Kind == "POST":
		return "/" + o.Prefix + "/properties"
	}
	return fmt.Sprintf("/%s/properties/%d", o.Prefix, o.ID)
}

// views is what an answer showed, a listing at a time: the listing of a
// GET, PUT, POST, DELETE or 304 (or only the version a 404, 409, 410 or
// 412 names), or each listing of a list page, as an op of its own.
func (o op) views() []op {
	if o.List != "" {
		views := make([]op, len(o.Page))
		for i := range o.Page {
			views[i] = o
			views[i].ID, views[i].Shown, views[i].Page = o.Page[i].ID, &o.Page[i], nil
		}
		return views
	}
	if o.Shown == nil || o.ID == 0 {
		return nil
	}
	return []op{o}
}

// rowString shows a row as the checker's messages name it.
func rowString(p *Property) string {
	if p == nil {
		return "no row"
	}
	s := fmt.Sprintf("{version %d by %s at %s, price %s", p.Version, p.RegionOrigin, p.UpdatedAt.Format("15:04:05.000000"), p.Price)
	if p.Deleted {
		s += ", deleted"
	}
	return s + "}"
}

func ptrIf(p Property, ok bool) *Property {
	if !ok {
		return nil
	}
	return &p
}

// describeWrites lists a listing's writes, for a counterexample: at most
// the last ten.
func describeWrites(ops []op) string {
	ops = slices.Clone(ops)
	slices.SortFunc(ops, func(a, b op) int { return a.Start.Compare(b.Start) })
	var parts []string
	if len(ops) > 10 {
		parts = append(parts, fmt.Sprintf("(%d earlier)", len(ops)-10))
		ops = ops[len(ops)-10:]
	}
	for _, o := range ops {
		s := fmt.Sprintf("%s %s %s at %s: %d %s", o.Kind, o.path(), o.RequestID, o.Start.Format("15:04:05.000"), o.Status, o.Outcome)
		if o.Price != 0 {
			s += " price " + o.Price.String()
		}
		if o.Row != nil {
			s += " " + rowString(o.Row)
		}
		parts = append(parts, s)
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "; ")
}

func statusList(statuses map[int]int) string {
	var codes []int
	for c := range statuses {
		codes = append(codes, c)
	}
	slices.SortFunc(codes, cmp.Compare)
	var parts []string
	for _, c := range codes {
		name := strconv.Itoa(c)
		if c == 0 {
			name = "no answer"
		}
		parts = append(parts, fmt.Sprintf("%s × %d", name, statuses[c]))
	}
	return strings.Join(parts, ", ")
}

func firstLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append(lines[:n], "…")
	}
	return strings.Join(lines, " ")
}

// TestCheckerCatches feeds the checker small made-up campaigns, one clean
// and one broken in each rule's way, so that a checker that passes
// everything cannot pass for one that works.
func TestCheckerCatches(t *testing.T) {
	at := func(s int) time.Time { return time.Date(2026, 1, 1, 0, 0, s, 0, time.UTC) }
	row := func(version int64, region string, s int, price Money) Property {
		return Property{ID: 601, Price: price, RegionOrigin: region, Version: version, UpdatedAt: at(s)}
	}
	start := row(1, "us", 0, 50_000_00)
	acked := row(2, "eu", 10, 100_000_001)
	clean := func() ([]op, chaosFinal, []lagSample) {
		history := []op{
			{Kind: "PUT", Prefix: "eu", ID: 601, RequestID: "r1", Price: 100_000_001, Start: at(9), End: at(10), Status: 200, Outcome: opOK, Row: &acked,
				Session: true, Shown: &acked, ServedBy: "eu"},
			// The session reads its write through the other prefix, in
			// full, as a 304 and on a list page.
			{Kind: "GET", Prefix: "us", ID: 601, Session: true, Start: at(10), End: at(11), Status: 200, Outcome: opOK, Shown: &acked, ServedBy: "us", SessionWait: 120 * time.Millisecond},
			{Kind: "GET", Prefix: "us", ID: 601, Session: true, Start: at(11), End: at(11), Status: 304, Outcome: opOK, Cached: &acked, Shown: &acked, ServedBy: "us"},
			{Kind: "GET", Prefix: "us", List: "cursor=" + encodeCursor(600) + "&limit=1", Session: true, Start: at(11), End: at(11), Status: 200, Outcome: opOK, Page: []Property{acked}, ServedBy: "us"},
			{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r2", Price: 100_000_002, Start: at(11), End: at(12), Status: 409, Outcome: opFail},
		}
		record := requestRecord{RequestID: "r1", PropertyID: 601, Price: "1000000.01", RegionOrigin: "eu", Version: 2, UpdatedAt: at(10)}
		final := chaosFinal{
			us: []Property{acked}, eu: []Property{acked}, converged: true,
			requests: map[string][]requestRecord{"us": {record}, "eu": {record}},
			outbox:   map[string]int{}, stopped: map[string]string{},
		}
		samples := []lagSample{{region: "us", sent: at(20), lag: 0.2, heard: len(history), rows: map[int64]Property{601: acked}}}
		return history, final, samples
	}
	initial := map[int64]Property{601: start}
	var restores []restoreWindow
	verdicts := func(history []op, final chaosFinal, samples []lagSample) (failed []int) {
		for _, r := range check(history, initial, final, samples, restores) {
			if !r.pass {
				failed = append(failed, r.rule)
			}
		}
		return failed
	}
	if failed := verdicts(clean()); len(failed) > 0 {
		t.Fatalf("a clean campaign failed rules %v", failed)
	}
	// A request id written in both regions, the second before the first
	// arrived, is one request the rule settled, if its record names one.
	h, f, s := clean()
	sibling := row(2, "us", 9, 100_000_003)
	h = append(h, op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r1", Price: 100_000_003, Resend: true, Start: at(9), End: at(9), Status: 200, Outcome: opOK, Row: &sibling})
	if failed := verdicts(h, f, s); len(failed) > 0 {
		t.Fatalf("a request id written once in each region failed rules %v", failed)
	}
	// A request written in both regions at different versions: US wrote
	// p as 3-us and its answer was lost; the client sent p again to EU,
	// which had moved on to q's 3-eu and wrote p as 4-eu. The request keeps
	// the record of the greater write (4-eu), US's w was built on 3-us, and
	// q lost to it, recorded. No record names 3-us, yet the final row is
	// built on it: the chain finds it by p's answer.
	replayed := func(retried bool) []int {
		h, f, s := clean()
		pUS, pEU, q, w := row(3, "us", 13, 100_000_004), row(4, "eu", 14, 100_000_005), row(3, "eu", 13, 100_000_006), row(4, "us", 15, 100_000_007)
		h = append(h,
			op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "p", Price: 100_000_004, Start: at(13), End: at(13), Status: 200, Outcome: opOK, Row: &pUS},
			op{Kind: "PUT", Prefix: "eu", ID: 601, RequestID: "q", Price: 100_000_006, Start: at(13), End: at(13), Status: 200, Outcome: opOK, Row: &q},
			op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "w", Price: 100_000_007, Start: at(15), End: at(15), Status: 200, Outcome: opOK, Row: &w})
		if retried {
			h = append(h, op{Kind: "PUT", Prefix: "eu", ID: 601, RequestID: "p", Price: 100_000_004, Start: at(14), End: at(14), Status: 200, Outcome: opOK, Row: &pEU})
		}
		f.us, f.eu = []Property{w}, []Property{w}
		for _, region := range []string{"us", "eu"} {
			f.requests[region] = append(f.requests[region],
				requestRecord{RequestID: "q", PropertyID: 601, Price: "1000000.06", RegionOrigin: "eu", Version: 3, UpdatedAt: at(13), Parent: "2-eu"},
				requestRecord{RequestID: "p", PropertyID: 601, Price: "1000000.04", RegionOrigin: "eu", Version: 4, UpdatedAt: at(14), Parent: "3-eu"},
				requestRecord{RequestID: "w", PropertyID: 601, Price: "1000000.07", RegionOrigin: "us", Version: 4, UpdatedAt: at(15), Parent: "3-us"})
		}
		f.lost = map[string]bool{"q": true}
		return verdicts(h, f, s)
	}
	if failed := replayed(true); slices.Contains(failed, 2) {
		t.Fatalf("a request written in both regions at different versions, the final row built on one: failed rules %v", failed)
	}
	if failed := replayed(false); !slices.Contains(failed, 2) {
		t.Fatalf("a write at a tag no record names, its request sent once: failed rules %v, want 2", failed)
	}
	// A DELETE sent to /eu/ that EU did not answer in time, which NGINX
	// handed to US: US's tombstone is acknowledged, EU's first attempt
	// committed unseen, and the rule keeps EU's, the later of the two. The
	// same outcome from a request US served under its own prefix would
	// be EU's tombstone from nowhere.
	failover := func(prefix string) []int {
		h, f, s := clean()
		ack := row(3, "us", 18, 100_000_001)
		ack.Deleted = true
		unseen := row(3, "eu", 19, 100_000_001)
		unseen.Deleted = true
		h = append(h, op{Kind: "DELETE", Prefix: prefix, ID: 601, RequestID: "d1", Start: at(13), End: at(18), Status: 200, Outcome: opOK, Row: &ack})
		f.us, f.eu = []Property{unseen}, []Property{unseen}
		record := requestRecord{RequestID: "d1", PropertyID: 601, Price: "1000000.01", RegionOrigin: "eu", Version: 3, UpdatedAt: at(19), Deleted: true, Parent: "2-eu"}
		f.requests["us"] = append(f.requests["us"], record)
		f.requests["eu"] = append(f.requests["eu"], record)
		return verdicts(h, f, s)
	}
	if failed := failover("eu"); len(failed) > 0 {
		t.Fatalf("a DELETE failed over after its first attempt committed failed rules %v", failed)
	}
	if failed := failover("us"); !slices.Contains(failed, 3) || !slices.Contains(failed, 4) {
		t.Fatalf("a tombstone no request that reached its region wrote: failed rules %v, want 3 and 4", failed)
	}
	// EU's database restored from a backup taken before r1: r1 is gone
	// from both regions, with its record, as a write that had not left
	// EU's outbox is. Within the restore's window it is the restore's
	// loss (the RPO); outside it, a write lost without a trace.
	h, f, s = clean()
	f.us, f.eu = []Property{start}, []Property{start}
	f.requests = map[string][]requestRecord{"us": nil, "eu": nil}
	s = nil
	if failed := verdicts(h, f, s); !slices.Contains(failed, 2) || !slices.Contains(failed, 4) {
		t.Fatalf("a write gone without a restore: failed rules %v, want 2 and 4", failed)
	}
	restores = []restoreWindow{{region: "eu", from: at(5), to: at(15)}}
	if failed := verdicts(h, f, s); len(failed) > 0 {
		t.Fatalf("a write lost with a database restored from a backup taken before it: failed rules %v", failed)
	}
	f.published = map[string]bool{"r1": true}
	if failed := verdicts(h, f, s); !slices.Contains(failed, 2) {
		t.Fatalf("a write lost in a restore's window whose event is in the topic: failed rules %v, want 2", failed)
	}
	f.published = nil
	// A session that saw that write reads the older state after the
	// restore: the restore's loss, not the session's. Unless the state it
	// saw is still recorded: then the restore did not take it back.
	older := append(slices.Clone(h), op{Kind: "GET", Prefix: "eu", ID: 601, Session: true, Start: at(16), End: at(16),
		Status: 200, Outcome: opOK, Shown: &start, ServedBy: "eu"})
	if failed := verdicts(older, f, s); len(failed) > 0 {
		t.Fatalf("a session that saw a write a restore took back: failed rules %v", failed)
	}
	kept := f
	kept.requests = map[string][]requestRecord{"us": {{RequestID: "r1", PropertyID: 601, Price: "1000000.01", RegionOrigin: "eu", Version: 2, UpdatedAt: at(10)}}}
	if failed := verdicts(older, kept, s); !slices.Contains(failed, 8) {
		t.Fatalf("a session reading back from a state a restore did not take back: failed rules %v, want 8", failed)
	}
	restores = []restoreWindow{{region: "us", from: at(5), to: at(15)}}
	if failed := verdicts(h, f, s); !slices.Contains(failed, 2) {
		t.Fatalf("a write of EU's gone with US's restore: failed rules %v, want 2", failed)
	}
	restores = nil
	// A sample that had not yet heard of a write does not vouch for it,
	// and a row read by an earlier sample still counts in a later one.
	h, f, s = clean()
	s = []lagSample{
		{region: "us", sent: at(20), lag: 0.2, heard: 0, rows: map[int64]Property{}},
		{region: "us", sent: at(21), lag: 5, heard: len(h), rows: map[int64]Property{601: acked}},
		{region: "us", sent: at(22), lag: 0.2, heard: len(h), rows: map[int64]Property{}},
	}
	if failed := verdicts(h, f, s); len(failed) > 0 {
		t.Fatalf("samples that only read what was pending failed rules %v", failed)
	}
	// A write the final row is built on, and one lost but recorded, are
	// not lost without a trace.
	h, f, s = clean()
	on := row(3, "us", 11, 100_000_002)
	h = append(h, op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r3", Price: 100_000_002, Start: at(11), End: at(11), Status: 200, Outcome: opOK, Row: &on})
	f.us, f.eu = []Property{on}, []Property{on}
	r3 := requestRecord{RequestID: "r3", PropertyID: 601, Price: "1000000.02", RegionOrigin: "us", Version: 3, UpdatedAt: at(11), Parent: "2-eu"}
	f.requests["us"] = append(f.requests["us"], r3)
	f.requests["eu"] = append(f.requests["eu"], r3)
	if failed := verdicts(h, f, s); slices.Contains(failed, 2) {
		t.Fatalf("a write the final row is built on: failed rules %v", failed)
	}
	f.requests["us"][1].Parent, f.requests["eu"][1].Parent = "2-us", "2-us"
	if failed := verdicts(h, f, s); !slices.Contains(failed, 2) {
		t.Fatalf("a write the final row is not built on, not recorded: failed rules %v, want 2", failed)
	}
	f.lost = map[string]bool{"r1": true}
	if failed := verdicts(h, f, s); slices.Contains(failed, 2) {
		t.Fatalf("a write recorded lost: failed rules %v", failed)
	}
	// r0, under r1: lost with it, and named by r1's record's parent.
	r0row := row(1, "us", 9, 100_000_009)
	r1rec := f.requests["us"][0]
	h = append(h, op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r0", Price: 100_000_009, Start: at(9), End: at(9), Status: 200, Outcome: opOK, Row: &r0row})
	if failed := verdicts(h, f, s); !slices.Contains(failed, 2) {
		t.Fatalf("a write under a recorded loser, but not on its chain: failed rules %v, want 2", failed)
	}
	r0 := requestRecord{RequestID: "r0", PropertyID: 601, Price: "1000000.09", RegionOrigin: "us", Version: 1, UpdatedAt: at(9)}
	f.requests["us"] = append(f.requests["us"], r0)
	f.requests["eu"] = append(f.requests["eu"], r0)
	f.requests["us"][0].Parent, f.requests["eu"][0].Parent = "1-us", "1-us"
	if failed := verdicts(h, f, s); slices.Contains(failed, 2) {
		t.Fatalf("a write the recorded loser was built on (%+v): failed rules %v", r1rec, failed)
	}
	for _, tc := range []struct {
		name  string
		spoil func(h []op, f *chaosFinal, s []lagSample) []op
		rule  int
	}{
		{"regions differ", func(h []op, f *chaosFinal, s []lagSample) []op { f.eu = []Property{start}; return h }, 1},
		{"an acknowledged write lost", func(h []op, f *chaosFinal, s []lagSample) []op {
			f.us, f.eu = []Property{start}, []Property{start}
			return h
		}, 2},
		{"an acknowledged write below the final row by the rule, but not built upon", func(h []op, f *chaosFinal, s []lagSample) []op {
			// US's B (r1 here, 2-eu) and EU's C (3-us) built on another
			// version 2, A (2-us): C is greater than B, yet B is gone.
			a := requestRecord{RequestID: "a1", PropertyID: 601, Price: "1.00", RegionOrigin: "us", Version: 2, UpdatedAt: at(9), Parent: "1-us"}
			c := requestRecord{RequestID: "c1", PropertyID: 601, Price: "1.00", RegionOrigin: "us", Version: 3, UpdatedAt: at(11), Parent: "2-us"}
			final := row(3, "us", 11, 1_00)
			f.us, f.eu = []Property{final}, []Property{final}
			for _, region := range []string{"us", "eu"} {
				f.requests[region] = append(f.requests[region], a, c)
			}
			return h
		}, 2},
		{"a refused write took effect", func(h []op, f *chaosFinal, s []lagSample) []op {
			refused := row(3, "us", 12, 100_000_002)
			f.us, f.eu = []Property{refused}, []Property{refused}
			return h
		}, 3},
		{"request records differ", func(h []op, f *chaosFinal, s []lagSample) []op { f.requests["eu"] = nil; return h }, 4},
		{"a request id acknowledged as two writes in one region", func(h []op, f *chaosFinal, s []lagSample) []op {
			other := row(3, "eu", 13, 100_000_003)
			return append(h, op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r1", Price: 100_000_003, Resend: true, Start: at(13), End: at(13), Status: 200, Outcome: opOK, Row: &other})
		}, 4},
		{"an event stuck in the outbox", func(h []op, f *chaosFinal, s []lagSample) []op { f.outbox["us"] = 1; return h }, 5},
		{"a dead letter", func(h []op, f *chaosFinal, s []lagSample) []op { f.dlqAdded = 1; return h }, 5},
		{"a lag report that understates", func(h []op, f *chaosFinal, s []lagSample) []op { s[0].rows = map[int64]Property{601: start}; return h }, 6},
		{"a session that reads back in time", func(h []op, f *chaosFinal, s []lagSample) []op {
			old := start
			return append(h, op{Kind: "GET", Prefix: "us", ID: 601, Session: true, Start: at(14), End: at(14), Status: 200, Outcome: opOK, Shown: &old, ServedBy: "us"})
		}, 8},
		{"a session shown an older version by a 304", func(h []op, f *chaosFinal, s []lagSample) []op {
			old := start
			return append(h, op{Kind: "GET", Prefix: "us", ID: 601, Session: true, Start: at(14), End: at(14), Status: 304, Outcome: opOK, Cached: &old, Shown: &old, ServedBy: "us"})
		}, 8},
		{"a session shown an older version after a 304 showed a newer", func(h []op, f *chaosFinal, s []lagSample) []op {
			newer := row(3, "us", 13, 100_000_003)
			return append(h,
				op{Kind: "GET", Prefix: "us", ID: 601, Session: true, Start: at(13), End: at(13), Status: 304, Outcome: opOK, Cached: &newer, Shown: &newer, ServedBy: "us"},
				op{Kind: "GET", Prefix: "eu", ID: 601, Session: true, Start: at(14), End: at(14), Status: 200, Outcome: opOK, Shown: &acked, ServedBy: "eu"})
		}, 8},
		{"a session shown an older version after a list page showed a newer", func(h []op, f *chaosFinal, s []lagSample) []op {
			newer := row(3, "us", 13, 100_000_003)
			return append(h,
				op{Kind: "GET", Prefix: "us", List: "cursor=" + encodeCursor(600) + "&limit=1", Session: true, Start: at(13), End: at(13), Status: 200, Outcome: opOK, Page: []Property{newer}, ServedBy: "us"},
				op{Kind: "GET", Prefix: "eu", ID: 601, Session: true, Start: at(14), End: at(14), Status: 200, Outcome: opOK, Shown: &acked, ServedBy: "eu"})
		}, 8},
		{"a session shown an older version on a list page", func(h []op, f *chaosFinal, s []lagSample) []op {
			other := row(1, "us", 0, 50_000_00)
			other.ID = 602
			return append(h, op{Kind: "GET", Prefix: "us", List: "cursor=" + encodeCursor(600) + "&limit=2", Session: true, Start: at(14), End: at(14), Status: 200, Outcome: opOK,
				Page: []Property{start, other}, ServedBy: "us"})
		}, 8},
		{"a session told an older version by a 409", func(h []op, f *chaosFinal, s []lagSample) []op {
			return append(h, op{Kind: "PUT", Prefix: "us", ID: 601, RequestID: "r3", Price: 100_000_003, Session: true, Start: at(14), End: at(14),
				Status: 409, Outcome: opFail, Shown: &Property{ID: 601, Version: 1}, ServedBy: "us"})
		}, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, f, s := clean()
			h = tc.spoil(h, &f, s)
			if failed := verdicts(h, f, s); !slices.Contains(failed, tc.rule) {
				t.Errorf("rule %d passed (failed: %v)", tc.rule, failed)
			}
		})
	}
}
