package main

// Errors to answers: encodeError is the one place where an error becomes a
// status code and a JSON body {"error": "..."}, in the order
// docs/semantics.md, §3, gives. A handler returns what went wrong as a Go
// error (a validationError, a versionMismatchError, errNotFound, a
// database that does not answer) and never writes a status of its own.
// What kind of failure a database error is, an outage
// (databaseUnreachable) or a refusal of what was asked
// (refusedByDatabase), is told here for the consumer as well.

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// errorBody is every error's answer, {"error": "..."} (docs/semantics.md, §3).
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
	case errors.Is(err, errSessionMalformed) || errors.Is(err, errSessionRegion):
		encode(w, http.StatusBadRequest, errorBody{Error: err.Error()})
	case errors.Is(err, errSessionBehind):
		w.Header().Set("Retry-After", "1")
		encode(w, http.StatusServiceUnavailable, errorBody{Error: err.Error()})
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
	case errors.Is(err, errDatabaseRestarted):
		w.Header().Set("Retry-After", "1")
		encode(w, http.StatusServiceUnavailable, errorBody{Error: "this region's database restarted; the other region serves while it is checked"})
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

// refusedByDatabase reports whether err is PostgreSQL refusing what an event
// holds (SQLSTATE class 22, data exception, or 23, integrity constraint
// violation): trying the same event again changes nothing. Every other
// failure, an outage above all, is worth retrying.
func refusedByDatabase(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "22") || strings.HasPrefix(pgErr.Code, "23"))
}
