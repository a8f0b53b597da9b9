package main

// The HTTP API: the one list of routes (addRoutes), a handler for each, the
// request decoding and validation they share, and the one function that
// turns an error into a status code and a JSON body (encodeError). The
// rules a listing obeys live in property.go, and what every response goes
// through on its way out in middleware.go.

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// maxBodyBytes bounds a PUT body. A valid one is under 100 bytes; NGINX
// enforces the same limit in front (client_max_body_size).
const maxBodyBytes = 64 << 10

// dbTimeout bounds the database work of one request, so that a hung database
// turns into a quick 503 (and an NGINX failover) instead of a hung client.
const dbTimeout = 3 * time.Second

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
}

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
	notify, lag, stopped := rep.notify, rep.lagReport, rep.stoppedReason
	mux.Handle("GET /metrics", metrics)
	mux.Handle("GET /health", handleHealth(region, db, stopped))
	mux.Handle("GET /{region}/health", knownRegion(logger, handleHealth(region, db, stopped)))
	mux.Handle("GET /{region}/properties/{id}", knownRegion(logger, handleGetProperty(logger, db)))
	mux.Handle("PUT /{region}/properties/{id}", knownRegion(logger, handleUpdateProperty(logger, region, db, notify)))
	mux.Handle("DELETE /{region}/properties/{id}", knownRegion(logger, handleDeleteProperty(logger, region, db, notify)))
	mux.Handle("POST /{region}/properties", knownRegion(logger, handleCreateProperty(logger, region, db, notify)))
	mux.Handle("GET /{region}/properties", knownRegion(logger, handleListProperties(logger, db)))
	mux.Handle("GET /{region}/replication-lag", knownRegion(logger, handleReplicationLag(logger, lag)))
	mux.Handle("GET /{region}/conflicts", knownRegion(logger, handleListConflicts(logger, db)))
}

// handleHealth answers 200 when the database answers, and 503 otherwise so
// that NGINX moves the region's traffic to the other backend. A replication
// that stopped for good (stopped) is said in the body, not in the status:
// the region still serves its clients, and NGINX must not move them.
func handleHealth(region string, db *sql.DB, stopped func() string) http.Handler {
	type response struct {
		Status             string `json:"status"`
		Region             string `json:"region"`
		Error              string `json:"error,omitempty"`
		ReplicationStopped string `json:"replication_stopped,omitempty"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), time.Second)
		defer cancel()
		if err := db.PingContext(ctx); err != nil {
			encode(w, http.StatusServiceUnavailable, response{"unavailable", region, "database unreachable", stopped()})
			return
		}
		encode(w, http.StatusOK, response{Status: "ok", Region: region, ReplicationStopped: stopped()})
	})
}

// handleGetProperty returns one property.
func handleGetProperty(logger *slog.Logger, db *sql.DB) http.Handler {
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
// updateProperty for the transaction and the contract for the check order.
// After a commit it wakes the outbox relay, so that the change is on its way
// to the other region within milliseconds.
func handleUpdateProperty(logger *slog.Logger, region string, db *sql.DB, notify func()) http.Handler {
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
		p, err := standIn(ctx, db, region, r, func() (Property, error) {
			return updateProperty(ctx, db, region, requestID, fingerprint, id, u)
		})
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("ETag", etag(p))
		encode(w, http.StatusOK, p)
	})
}

// parseWriteHeaders reads what a PUT or DELETE of one listing names before
// its body, in the contract's order: the id, the X-Request-ID, and the
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
// (README, "Decisions": one request written in both regions).
const standInWait = time.Second

// errCannotTell is a stand-in's refusal that the other region's writes
// might contradict.
var errCannotTell = errors.New("the other region's writes up to this request have not arrived")

// standIn runs write, the PUT or DELETE of r, and, when r stands in for
// the other region and write is refused on this region's copy, runs it
// again once the copy has caught up with the request (see above).
func standIn(ctx context.Context, db *sql.DB, region string, r *http.Request, write func() (Property, error)) (Property, error) {
	p, err := write()
	if err == nil || r.PathValue("region") == region || !refusedOnCopy(err) {
		return p, err
	}
	// Every write the peer began before now (after this request arrived,
	// so before it too), applied here: awaitPeer.
	if err := awaitPeer(ctx, db, peerOf(region), standInWait); err != nil {
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

// errIfMatchRequired is a DELETE without If-Match.
var errIfMatchRequired = errors.New("If-Match required")

// handleDeleteProperty deletes a listing, idempotently by X-Request-ID, if
// If-Match names its current state, and answers with the tombstone (see
// deleteProperty). A delete takes no body.
func handleDeleteProperty(logger *slog.Logger, region string, db *sql.DB, notify func()) http.Handler {
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
		p, err := standIn(ctx, db, region, r, func() (Property, error) {
			return deleteProperty(ctx, db, region, requestID, fingerprint, id, ifMatch.states())
		})
		if err != nil {
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("ETag", etag(p))
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
func handleListProperties(logger *slog.Logger, db *sql.DB) http.Handler {
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
			encodeError(w, r, logger, err)
			return
		}
		notify()
		w.Header().Set("Location", fmt.Sprintf("/%s/properties/%d", r.PathValue("region"), p.ID))
		w.Header().Set("ETag", etag(p))
		encode(w, http.StatusCreated, p)
	})
}

// lagFunc builds the replication lag report (lag.go).
type lagFunc func(context.Context) (LagReport, error)

// handleReplicationLag reports how far this region trails the other one; see
// lag.go for what the number means.
func handleReplicationLag(logger *slog.Logger, lag lagFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
		defer cancel()
		report, err := lag(ctx)
		if err != nil {
			encodeError(w, r, logger, err)
			return
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

// encode writes v as the JSON response with the given status. Headers must be
// set before WriteHeader, so the content type goes first.
func encode[T any](w http.ResponseWriter, status int, v T) {
	w.Header().Set("Content-Type", "application/json")
	if status >= 400 {
		// An error tells of a moment, not of the resource: no cache may
		// keep it and answer it again.
		w.Header().Set("Cache-Control", "no-store")
	}
	w.WriteHeader(status)
	// An error here means the client went away; there is nobody to tell.
	_ = json.NewEncoder(w).Encode(v)
}

// maxDrainBytes bounds how much of a body over maxBodyBytes the server reads
// and throws away before it answers 413.
const maxDrainBytes = 1 << 20

// decode reads a request body of at most maxBodyBytes holding exactly one JSON
// object with only the fields of T (strictUnmarshal). Every failure is a
// *validationError or an *http.MaxBytesError, with a message fit for the
// client.
func decode[T any](w http.ResponseWriter, r *http.Request) (T, error) {
	var v T
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			// The server closes the connection after the 413, and a socket
			// closed with unread data in it is reset: a client still sending
			// its body would see the reset, not the answer. So the rest of the
			// body is read first, up to maxDrainBytes more.
			io.CopyN(io.Discard, r.Body, maxDrainBytes)
			return v, tooLarge
		}
		return v, &validationError{"could not read the request body"}
	}
	if !bytes.HasPrefix(bytes.TrimLeft(body, " \t\r\n"), []byte("{")) {
		return v, &validationError{"body must be one JSON object"}
	}
	if err := strictUnmarshal(body, &v); err != nil {
		return v, decodeError(err)
	}
	return v, nil
}

// noBody reads a request that must have no body, such as a DELETE, and
// returns a *validationError if it has one (or an *http.MaxBytesError if it
// is too large to read).
func noBody(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		io.CopyN(io.Discard, r.Body, maxDrainBytes)
		return tooLarge
	case err != nil:
		return &validationError{"could not read the request body"}
	case len(body) > 0:
		return &validationError{r.Method + " takes no body"}
	}
	return nil
}

// decodeError turns an encoding/json error into a message that names the
// problem in the client's terms, without Go type names.
func decodeError(err error) error {
	var (
		verr      *validationError
		fieldErr  *fieldError
		typeErr   *json.UnmarshalTypeError
		syntaxErr *json.SyntaxError
	)
	switch {
	case errors.As(err, &verr):
		return verr
	case errors.Is(err, errTrailingData):
		return &validationError{"body must be one JSON object with nothing after it"}
	case errors.As(err, &fieldErr):
		return &validationError{fieldErr.Error()}
	case errors.As(err, &typeErr):
		want := "a JSON object"
		switch typeErr.Type.Kind() {
		case reflect.Int32, reflect.Int64:
			want = "an integer in range"
		}
		if typeErr.Field == "" {
			return &validationError{"body must be one JSON object"}
		}
		return &validationError{fmt.Sprintf("%s must be %s", typeErr.Field, want)}
	case errors.As(err, &syntaxErr), errors.Is(err, io.ErrUnexpectedEOF):
		return &validationError{"body is not valid JSON"}
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return &validationError{"unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")}
	}
	return &validationError{"body is not valid JSON"}
}

// errorBody is the contract's error response, {"error": "..."}.
type errorBody struct {
	Error string `json:"error"`
}

// encodeError is the one place where an error becomes a status code and a
// JSON body. A 5xx is logged with the real error; the client sees only a
// generic message, never internals.
func encodeError(w http.ResponseWriter, r *http.Request, logger *slog.Logger, err error) {
	var (
		verr     *validationError
		tooLarge *http.MaxBytesError
		dup      *duplicateRequestError
		reused   *requestReusedError
		gone     *deletedError
		mismatch *versionMismatchError
		failed   *preconditionFailedError
	)
	switch {
	case errors.As(err, &verr):
		encode(w, http.StatusBadRequest, errorBody{Error: verr.msg})
	case errors.As(err, &tooLarge):
		encode(w, http.StatusRequestEntityTooLarge, errorBody{Error: fmt.Sprintf("request body is larger than %d bytes", tooLarge.Limit)})
	case errors.As(err, &dup):
		encode(w, http.StatusUnprocessableEntity, struct {
			Error            string `json:"error"`
			RequestID        string `json:"request_id"`
			OriginalResponse any    `json:"original_response"`
		}{"duplicate request", dup.requestID, view(dup.original)})
	case errors.As(err, &reused):
		encode(w, http.StatusUnprocessableEntity, struct {
			Error     string `json:"error"`
			RequestID string `json:"request_id"`
		}{"request id reused for a different request", reused.requestID})
	case errors.Is(err, errUnknownRegion):
		encode(w, http.StatusNotFound, errorBody{Error: "unknown region: use /us/ or /eu/"})
	case errors.Is(err, errNotFound):
		encode(w, http.StatusNotFound, errorBody{Error: "property not found"})
	case errors.As(err, &gone):
		encode(w, http.StatusGone, struct {
			Error          string `json:"error"`
			CurrentVersion int64  `json:"current_version"`
		}{"property deleted", gone.current})
	case errors.Is(err, errIfMatchRequired):
		encode(w, http.StatusPreconditionRequired, errorBody{Error: `If-Match is required: send the ETag of the state to delete, such as "4-us"`})
	case errors.As(err, &failed):
		w.Header().Set("ETag", etag(failed.current))
		encode(w, http.StatusPreconditionFailed, struct {
			Error          string `json:"error"`
			CurrentVersion int64  `json:"current_version"`
		}{"version mismatch", failed.current.Version})
	case errors.As(err, &mismatch):
		encode(w, http.StatusConflict, struct {
			Error          string `json:"error"`
			CurrentVersion int64  `json:"current_version"`
		}{"version mismatch", mismatch.current})
	case errors.Is(err, errCannotTell):
		w.Header().Set("Retry-After", "1")
		encode(w, http.StatusServiceUnavailable, errorBody{Error: "this region cannot tell yet whether the listing's own region applied this request: retry with the same X-Request-ID"})
	case errors.Is(err, errKeptChanging):
		w.Header().Set("Retry-After", "1")
		encode(w, http.StatusServiceUnavailable, errorBody{Error: "the listing kept changing under this write: retry with the same X-Request-ID"})
	case databaseUnreachable(err):
		logger.WarnContext(r.Context(), "database unreachable", "method", r.Method, "path", r.URL.Path, "err", err)
		encode(w, http.StatusServiceUnavailable, errorBody{Error: "service unavailable, try again"})
	default:
		logger.ErrorContext(r.Context(), "internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		encode(w, http.StatusInternalServerError, errorBody{Error: "internal error"})
	}
}

// databaseUnreachable tells an outage from a bug. If PostgreSQL answered with
// an error, the request or the code is wrong: a 500. If it did not answer at
// all (connection refused or lost, timeout, server shutting down), or gave up
// waiting (a lock or statement timeout, see requestLimits), the region cannot
// serve this request now and changed nothing: a 503, on which NGINX retries
// the other region.
func databaseUnreachable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// Class 08 is connection exceptions, 57P0x the server shutting down,
		// 55P03 a lock not granted in time, 57014 a statement cancelled (its
		// timeout, or its context ended).
		return strings.HasPrefix(pgErr.Code, "08") || strings.HasPrefix(pgErr.Code, "57P0") ||
			pgErr.Code == "55P03" || pgErr.Code == "57014"
	}
	var netErr net.Error
	var connectErr *pgconn.ConnectError
	return errors.As(err, &netErr) ||
		errors.As(err, &connectErr) ||
		errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, context.Canceled) ||
		errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, io.EOF) ||
		pgconn.Timeout(err)
}
