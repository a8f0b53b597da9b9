package main

// The HTTP API: the one list of routes (addRoutes) and a handler for each,
// with the validation of what each request names. A handler decodes the
// request (json.go), calls the function that does the work (property.go,
// list.go, lag.go), and hands what went wrong to encodeError (errors.go);
// a write served for the other region goes through the stand-in
// (standin.go). What every response goes through on its way out is in
// middleware.go.

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// maxBodyBytes bounds a PUT body. A valid one is under 100 bytes; NGINX
// enforces the same limit in front (client_max_body_size).
const maxBodyBytes = 64 << 10

// dbTimeout bounds the database work of one request, so that a hung database
// turns into a quick 503 (and an NGINX failover) instead of a hung client.
const dbTimeout = 3 * time.Second

// newServer returns the HTTP handler of one regional backend: the routes of
// addRoutes, wrapped so that every response is JSON, carries X-Served-By, is
// logged and counted. db is the pool of requests; pools are all the
// backend's pools by name, whose use /metrics shows.
func newServer(logger *slog.Logger, region string, db *sql.DB, rep replication, pools map[string]*sql.DB) http.Handler {
	mux := http.NewServeMux()
	requests := newRequestMetrics()
	addRoutes(mux, logger, region, db, rep, handleMetrics(requests, rep, pools))
	return middleware(logger, region, requests, mux)
}

// addRoutes is the one list of the service's routes. Every route but the bare
// /health and /metrics exists under both region prefixes: either backend
// serves either region's traffic, which is what NGINX failover needs. NGINX
// passes on only the prefixed ones.
func addRoutes(mux *http.ServeMux, logger *slog.Logger, region string, db *sql.DB, rep replication, metrics http.Handler) {
	notify, lag, stopped, state := rep.notify, rep.lagReport, rep.stoppedReason, rep.rejoinStatus
	// The listings are served only while the region serves (rejoin.go):
	// until then a 503 sends their clients to the other region.
	listings := func(h http.Handler) http.Handler { return knownRegion(logger, whileServing(state, h)) }
	// The listings' own routes honour session tokens too (session.go).
	peer := rep.peerWatermark()
	encodeErr := func(w http.ResponseWriter, r *http.Request, err error) { encodeError(w, r, logger, err) }
	session := func(h http.Handler) http.Handler { return listings(sessions(peer, encodeErr, h)) }
	mux.Handle("GET /metrics", metrics)
	mux.Handle("GET /health", handleHealth(region, db, stopped, state))
	mux.Handle("GET /{region}/health", knownRegion(logger, handleHealth(region, db, stopped, state)))
	mux.Handle("GET /{region}/properties/{id}", session(handleGetProperty(logger, region, db)))
	mux.Handle("PUT /{region}/properties/{id}", session(handleUpdateProperty(logger, region, db, notify, peer.ask)))
	mux.Handle("DELETE /{region}/properties/{id}", session(handleDeleteProperty(logger, region, db, notify, peer.ask)))
	mux.Handle("POST /{region}/properties", session(handleCreateProperty(logger, region, db, notify)))
	mux.Handle("GET /{region}/properties", session(handleListProperties(logger, region, db)))
	mux.Handle("GET /{region}/replication-lag", knownRegion(logger, handleReplicationLag(logger, lag, state)))
	mux.Handle("GET /{region}/conflicts", listings(handleListConflicts(logger, db)))
	// Between the regions' backends, never through NGINX, which forwards
	// only the region prefixes (rejoin.go, snapshot.go).
	mux.Handle("GET /internal/published/{region}", handlePublished(logger, region, db, rep.topicName()))
	mux.Handle("GET /internal/snapshot/{region}", rep.snapshot())
}

// replication is what the handlers need of the replicator (replicate.go).
type replication interface {
	// notify wakes the outbox relay after a write commits.
	notify()
	// lagReport builds the replication lag report (lag.go).
	lagReport(context.Context) (LagReport, error)
	// stoppedReason says why replication stopped for good, or "" while it
	// runs.
	stoppedReason() string
	// produceErrors counts the relay's publish rounds that failed, and
	// published the events this instance's relay published.
	produceErrors() int64
	published() int64
	// purgeStats is what the purge of expired request ids and tombstones
	// has done (retention.go).
	purgeStats() purgeStats
	// rejoinStatus is whether the region serves, and if not, why and how
	// far its rejoining has come (rejoin.go).
	rejoinStatus() rejoinStatus
	// peerWatermark is the watermark of the other region that session
	// tokens wait for (session.go).
	peerWatermark() *peerWatermark
	// snapshot serves this region's snapshot to the other (snapshot.go),
	// and topicName is the replication topic.
	snapshot() http.Handler
	topicName() string
}

// handleHealth answers 200 when the database answers and the region
// serves, and 503 otherwise so that NGINX moves the region's traffic to the
// other backend: a region that is starting or rejoining (state) says so,
// with its progress. A replication that stopped for good (stopped) is said
// in the body, not in the status: the region still serves its clients, and
// NGINX must not move them.
func handleHealth(region string, db *sql.DB, stopped func() string, state func() rejoinStatus) http.Handler {
	type response struct {
		Status             string        `json:"status"`
		Region             string        `json:"region"`
		Error              string        `json:"error,omitempty"`
		ReplicationStopped string        `json:"replication_stopped,omitempty"`
		Rejoining          *rejoinStatus `json:"rejoining,omitempty"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), time.Second)
		defer cancel()
		if err := db.PingContext(ctx); err != nil {
			encode(w, http.StatusServiceUnavailable, response{"unavailable", region, "database unreachable", stopped(), nil})
			return
		}
		if s := state(); s.State != stateServing {
			encode(w, http.StatusServiceUnavailable, response{Status: s.State, Region: region, ReplicationStopped: stopped(), Rejoining: &s})
			return
		}
		encode(w, http.StatusOK, response{Status: "ok", Region: region, ReplicationStopped: stopped()})
	})
}

// errNotServing is a request to a region that is starting or rejoining
// (rejoin.go).
var errNotServing = errors.New("this region is not serving yet")

// whileServing answers 503, with Retry-After, while the region is not
// serving, so that NGINX sends the request to the other region.
func whileServing(state func() rejoinStatus, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s := state(); s.State != stateServing {
			w.Header().Set("Retry-After", "1")
			encode(w, http.StatusServiceUnavailable, errorBody{Error: "this region is " + s.State + "; the other region serves its listings meanwhile"})
			return
		}
		h.ServeHTTP(w, r)
	})
}

// publishedAnswer is the answer to the other region's check (rejoin.go).
type publishedAnswer struct {
	Region string `json:"region"`
	// Published is the highest outbox seq of Region's events that this
	// region has applied, and Positions where this region stands in each
	// partition of the topic, read with it.
	Published int64           `json:"published"`
	Positions map[int32]int64 `json:"positions"`
	// Watermark is the newest of this region's watermarks of Region, a
	// time of Region's clock: Region's sessions are vouched for up to it
	// here, so its new writes must not carry an earlier time (rejoin.go,
	// clockPast). Absent before the first heartbeat.
	Watermark *time.Time `json:"watermark,omitempty"`
}

// publishedSQL reads publishedAnswer's figures in one statement, so that
// they go together. Every event this region applies is the other
// region's: the highest seq of them is the other region's (event.seq).
// The watermarks are saved in the transaction that moves the positions.
const publishedSQL = `
SELECT coalesce(max(published), 0), coalesce(json_object_agg(partition, next_offset), '{}'),
       (SELECT max(watermark) FROM replication_watermarks WHERE peer_region = $2)
FROM replication_positions WHERE topic = $1`

// handlePublished answers the other region's check (rejoin.go) on topic.
func handlePublished(logger *slog.Logger, region string, db *sql.DB, topic string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a := publishedAnswer{Region: r.PathValue("region")}
		if !validRegion(a.Region) || a.Region == region {
			encodeError(w, r, logger, errUnknownRegion)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		var positions []byte
		if err := db.QueryRowContext(ctx, publishedSQL, topic, a.Region).Scan(&a.Published, &positions, &a.Watermark); err != nil {
			encodeError(w, r, logger, err)
			return
		}
		if err := json.Unmarshal(positions, &a.Positions); err != nil {
			encodeError(w, r, logger, err)
			return
		}
		encode(w, http.StatusOK, a)
	})
}

// handleGetProperty returns one property.
func handleGetProperty(logger *slog.Logger, region string, db *sql.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		p, err := getProperty(ctx, db, id)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		w.Header().Set("ETag", etag(p))
		answerSessionRow(w, r, region, p)
		if cond, ok, _ := parseTagCondition(r.Header, "If-None-Match"); ok && cond.matchesWeak(p) {
			// The client's copy is the current state: no body.
			w.WriteHeader(http.StatusNotModified)
			return
		}
		encode(w, http.StatusOK, p)
	})
}

// updateRequest is the body of PUT /{region}/properties/{id}. Pointers tell a
// missing field from a zero one.
type updateRequest struct {
	Price     *Money      `json:"price"`
	Version   *wholeInt64 `json:"version"`
	Bedrooms  *wholeInt32 `json:"bedrooms"`
	Bathrooms *wholeInt32 `json:"bathrooms"`
}

// validate checks the fields the JSON decoder cannot, by the same rules as
// every write (checkValues), and returns the update.
func (req updateRequest) validate() (propertyUpdate, error) {
	switch {
	case req.Price == nil:
		return propertyUpdate{}, &validationError{"price is required"}
	case req.Version == nil:
		return propertyUpdate{}, &validationError{"version is required"}
	case *req.Version < 1:
		return propertyUpdate{}, &validationError{"version must be at least 1"}
	}
	u := propertyUpdate{
		Price:     *req.Price,
		Version:   int64(*req.Version),
		Bedrooms:  (*int32)(req.Bedrooms),
		Bathrooms: (*int32)(req.Bathrooms),
	}
	return u, checkValues(u.Price, u.Bedrooms, u.Bathrooms)
}

// handleUpdateProperty applies an optimistic, idempotent update; see
// updateProperty for the transaction and docs/semantics.md, §3, for the
// check order.
// After a commit it wakes the outbox relay, so that the change is on its way
// to the other region within milliseconds.
func handleUpdateProperty(logger *slog.Logger, region string, db *sql.DB, notify, askPeer func()) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, requestID, ifMatch, hasIfMatch, err := parseWriteHeaders(r)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		req, err := decode[updateRequest](w, r)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		u, err := req.validate()
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		if hasIfMatch {
			u.IfMatch = ifMatch.states()
		}
		fingerprint := requestFingerprint(r.Method, "/properties/"+strconv.FormatInt(id, 10), req)
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		p, err := standIn(ctx, db, region, r, askPeer, func() (Property, error) {
			return updateProperty(ctx, db, region, requestID, fingerprint, id, u)
		})
		if err != nil {
			answerSessionDuplicate(w, r, region, err)
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("ETag", etag(p))
		answerSessionRow(w, r, region, p)
		encode(w, http.StatusOK, p)
	})
}

// parseWriteHeaders reads what a PUT or DELETE of one listing names before
// its body, in the order of docs/semantics.md, §3: the id, the X-Request-ID, and the
// If-Match (hasIfMatch false if there is none).
func parseWriteHeaders(r *http.Request) (id int64, requestID string, ifMatch tagCondition, hasIfMatch bool, err error) {
	if id, err = parseID(r.PathValue("id")); err != nil {
		return 0, "", tagCondition{}, false, err
	}
	if requestID, err = parseRequestID(r.Header); err != nil {
		return 0, "", tagCondition{}, false, err
	}
	ifMatch, hasIfMatch, err = parseTagCondition(r.Header, "If-Match")
	return id, requestID, ifMatch, hasIfMatch, err
}

// errIfMatchRequired is a DELETE without If-Match.
var errIfMatchRequired = errors.New("If-Match required")

// handleDeleteProperty deletes a listing, idempotently by X-Request-ID, if
// If-Match names its current state, and answers with the tombstone (see
// deleteProperty). A delete takes no body.
func handleDeleteProperty(logger *slog.Logger, region string, db *sql.DB, notify, askPeer func()) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, requestID, ifMatch, hasIfMatch, err := parseWriteHeaders(r)
		if err == nil {
			err = noBody(w, r)
		}
		if err == nil && !hasIfMatch {
			err = errIfMatchRequired
		}
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		fingerprint := requestFingerprint(r.Method, "/properties/"+strconv.FormatInt(id, 10), nil)
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		p, err := standIn(ctx, db, region, r, askPeer, func() (Property, error) {
			return deleteProperty(ctx, db, region, requestID, fingerprint, id, ifMatch.states())
		})
		if err != nil {
			answerSessionDuplicate(w, r, region, err)
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("ETag", etag(p))
		answerSessionRow(w, r, region, p)
		encode(w, http.StatusOK, view(p))
	})
}

// tombstone is what a client sees of a deleted listing.
type tombstone struct {
	ID           int64     `json:"id"`
	Deleted      bool      `json:"deleted"`
	Version      int64     `json:"version"`
	RegionOrigin string    `json:"region_origin"`
	UpdatedAt    time.Time `json:"updated_at"`
}

// view is the body that shows a client the state p: the property, or the
// tombstone when p is one.
func view(p Property) any {
	if p.Deleted {
		return tombstone{p.ID, true, p.Version, p.RegionOrigin, p.UpdatedAt}
	}
	return p
}

// handleListProperties answers one page of listings, filtered (list.go).
func handleListProperties(logger *slog.Logger, region string, db *sql.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// ParseQuery rather than r.URL.Query, which drops what it cannot
		// parse without a word.
		q, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			encodeError(w, r, logger, &validationError{"the query string is not valid"})
			return
		}
		lq, err := parseListQuery(q)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		page, err := listProperties(ctx, db, lq, scanWindow)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		answerSession(w, r, region, page.readAt)
		encode(w, http.StatusOK, page)
	})
}

// handleListConflicts answers one page of the writes this region found
// lost, newest first (conflict.go).
func handleListConflicts(logger *slog.Logger, db *sql.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			encodeError(w, r, logger, &validationError{"the query string is not valid"})
			return
		}
		limit, before, err := parseConflictQuery(q)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		page, err := listConflicts(ctx, db, limit, before)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		encode(w, http.StatusOK, page)
	})
}

// createRequest is the body of POST /{region}/properties.
type createRequest struct {
	Price     *Money      `json:"price"`
	Bedrooms  *wholeInt32 `json:"bedrooms"`
	Bathrooms *wholeInt32 `json:"bathrooms"`
}

// validate checks the fields the JSON decoder cannot, by the same rules as
// every write (checkValues): the price is required, the rooms default to 0.
func (req createRequest) validate() (newProperty, error) {
	if req.Price == nil {
		return newProperty{}, &validationError{"price is required"}
	}
	n := newProperty{Price: *req.Price}
	if req.Bedrooms != nil {
		n.Bedrooms = int32(*req.Bedrooms)
	}
	if req.Bathrooms != nil {
		n.Bathrooms = int32(*req.Bathrooms)
	}
	return n, checkValues(n.Price, &n.Bedrooms, &n.Bathrooms)
}

// canonical is the request that asks for n with every field given: what
// its fingerprint names, so that {"price":1} and {"price":1,"bedrooms":0},
// which create the same listing, are one request.
func (n newProperty) canonical() createRequest {
	bedrooms, bathrooms := wholeInt32(n.Bedrooms), wholeInt32(n.Bathrooms)
	return createRequest{Price: &n.Price, Bedrooms: &bedrooms, Bathrooms: &bathrooms}
}

// handleCreateProperty adds a listing, idempotently by X-Request-ID like an
// update, and answers 201 with it, its Location (under the prefix the client
// used) and its ETag.
func handleCreateProperty(logger *slog.Logger, region string, db *sql.DB, notify func()) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requestID, err := parseRequestID(r.Header)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		req, err := decode[createRequest](w, r)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		n, err := req.validate()
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		fingerprint := requestFingerprint(r.Method, "/properties", n.canonical())
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		p, err := createProperty(ctx, db, region, requestID, fingerprint, n)
		if err != nil {
			answerSessionDuplicate(w, r, region, err)
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("Location", fmt.Sprintf("/%s/properties/%d", r.PathValue("region"), p.ID))
		w.Header().Set("ETag", etag(p))
		answerSessionRow(w, r, region, p)
		encode(w, http.StatusCreated, p)
	})
}

// lagFunc builds the replication lag report (lag.go).
type lagFunc func(context.Context) (LagReport, error)

// handleReplicationLag reports how far this region trails the other one; see
// lag.go for what the number means.
func handleReplicationLag(logger *slog.Logger, lag lagFunc, state func() rejoinStatus) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		report, err := lag(ctx)
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		if s := state(); s.State != stateServing {
			report.Rejoining = &s
		}
		encode(w, http.StatusOK, report)
	})
}

// errUnknownRegion is a path whose region prefix is not us or eu.
var errUnknownRegion = errors.New("unknown region")

// knownRegion answers 404 for a region prefix other than us or eu.
func knownRegion(logger *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !validRegion(r.PathValue("region")) {
			encodeError(w, r, logger, errUnknownRegion)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// parseID parses a property id: a positive 64-bit decimal integer written the
// canonical way (no sign, no leading zeros), so that one listing has one URL.
func parseID(s string) (int64, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id < 1 || strconv.FormatInt(id, 10) != s {
		return 0, &validationError{"id must be a positive 64-bit integer"}
	}
	return id, nil
}
