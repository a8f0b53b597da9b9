package main

// The stand-in: a region answering for the other one. NGINX sends a
// region's prefix to the other region's backend when its own cannot
// answer (nginx.conf), so backend-eu serves /us/ requests while backend-us
// is down: it stands in for US. Reads and successful writes need nothing
// more, since either region serves any listing. A refusal does: EU's copy
// of a US listing may lack US's latest writes, and a 404, 409, 410 or 412
// drawn from a copy that is behind would tell the client that a write it
// made did not happen, or that its version is wrong. So a stand-in refuses
// only once it knows its copy holds every write the other region began
// before the request arrived (awaitPeer, lag.go); otherwise it answers 503,
// and the client retries with the same request id (docs/semantics.md, §5).

import (
	"context"
	"database/sql"
	"errors"
	"net/http"
	"time"
)

// A PUT or DELETE under the other region's prefix is one that NGINX failed
// over to this region: the other region's backend refused the connection,
// timed out or answered 5xx. Its first attempt may have committed there all
// the same (the backend killed after its commit, or frozen and resumed
// later), and that write may not have reached this region yet. A refusal
// that rests on this region's copy of the listing (404, 409, 410, 412)
// would then tell the client that a write which happened did not.
//
// So a stand-in refuses only on a copy that includes every write the other
// region began before the request arrived here (awaitPeer, lag.go, which
// knows it without comparing the two regions' clocks): it judges the request again on that copy, where a first attempt
// that committed is a 422 with its original response. If the copy does not
// get there within standInWait (the other region is down, frozen or cut
// off, and its writes cannot arrive), this region cannot tell, and says so:
// a 503, to be retried with the same request id. A write that succeeds here
// needs no wait: if the first attempt committed too, the two are one
// request written in both regions, which the conflict rule settles
// (docs/decisions.md: one request written in both regions).
const standInWait = time.Second

// errCannotTell is a stand-in's refusal that the other region's writes
// might contradict.
var errCannotTell = errors.New("the other region's writes up to this request have not arrived")

// standIn runs write, the PUT or DELETE of r, and, when r stands in for
// the other region and write is refused on this region's copy, runs it
// again once the copy has caught up with the request (see above).
func standIn(ctx context.Context, db *sql.DB, region string, r *http.Request, askPeer func(), write func() (Property, error)) (Property, error) {
	p, err := write()
	if err == nil || r.PathValue("region") == region || !refusedOnCopy(err) {
		return p, err
	}
	// Every write the peer began before now (after this request arrived,
	// so before it too), applied here: awaitPeer.
	if err := awaitPeer(ctx, db, peerOf(region), standInWait, askPeer); err != nil {
		return Property{}, err
	}
	return write()
}

// refusedOnCopy reports whether err refuses a write because of the state
// of this region's copy of the listing.
func refusedOnCopy(err error) bool {
	var (
		gone     *deletedError
		mismatch *versionMismatchError
		failed   *preconditionFailedError
	)
	return errors.Is(err, errNotFound) || errors.As(err, &gone) || errors.As(err, &mismatch) || errors.As(err, &failed)
}
