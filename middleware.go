package main

// Middleware: what every response of the service goes through on its way
// out, whichever handler made it (middleware lists the order). Each piece is
// a function from http.Handler to http.Handler, the standard library's own
// shape, so that a reader can check one without the others.

import (
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"time"
)

// middleware wraps h in what every response of the service goes through,
// from the inside out: the mux's own answers made JSON, a panic made a JSON
// 500, X-Served-By and nosniff, and the request log and metrics (which so see the final
// status).
func middleware(logger *slog.Logger, region string, requests *requestMetrics, h http.Handler) http.Handler {
	h = jsonErrors(h)
	h = recoverPanics(logger, h)
	h = servedBy(region, h)
	return observeRequests(logger, requests, h)
}

// jsonErrors makes the responses the mux writes itself JSON like every other
// response: 404 when no route matches, 405 (with the mux's Allow header) when
// the route has no such method, and 307 (with its Location header) to the
// cleaned form of a path like /us/./health. The mux writes those as plain
// text or HTML; everything the handlers write is JSON already and passes
// through untouched, as does a success in another format (/metrics).
func jsonErrors(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&jsonErrorWriter{ResponseWriter: w}, r)
	})
}

// jsonErrorWriter replaces a non-JSON response with errorBody.
type jsonErrorWriter struct {
	http.ResponseWriter
	replaced bool
}

// WriteHeader passes a JSON response or a success through and replaces any
// other.
func (w *jsonErrorWriter) WriteHeader(status int) {
	h := w.Header()
	// 304 Not Modified has no body by definition (etag.go).
	if strings.HasPrefix(h.Get("Content-Type"), "application/json") || status < 300 || status == http.StatusNotModified {
		w.ResponseWriter.WriteHeader(status)
		return
	}
	w.replaced = true
	msg := strings.ToLower(http.StatusText(status))
	if loc := h.Get("Location"); loc != "" {
		msg = "moved to " + loc
	}
	h.Del("Content-Length")
	encode(w.ResponseWriter, status, errorBody{Error: msg})
}

// Unwrap gives http.ResponseController the writer underneath, for a
// response that streams (snapshot.go).
func (w *jsonErrorWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Write drops the body of a replaced response.
func (w *jsonErrorWriter) Write(b []byte) (int, error) {
	if w.replaced {
		return len(b), nil // the mux's own body, replaced by the JSON one
	}
	return w.ResponseWriter.Write(b)
}

// recoverPanics turns a panic in a handler into a JSON 500 and one log line
// with the stack. Without it, net/http logs the panic and drops the
// connection, and the client (or NGINX, which then replays the request in
// the other region) never learns what happened. http.ErrAbortHandler, the
// deliberate way to abort a response, passes through.
func recoverPanics(logger *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			p := recover()
			if p == nil {
				return
			}
			if p == http.ErrAbortHandler {
				panic(p)
			}
			logger.ErrorContext(r.Context(), "panic", "method", r.Method, "path", r.URL.Path,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			if rec, ok := w.(*statusRecorder); ok && rec.status != 0 {
				// Too late for an answer: a half-written one must not pass
				// for whole, so the connection is dropped.
				panic(http.ErrAbortHandler)
			}
			encode(w, http.StatusInternalServerError, errorBody{Error: "internal error"})
		}()
		h.ServeHTTP(w, r)
	})
}

// servedBy adds the X-Served-By header, which tells a client (and a failover
// test) which region actually answered, and X-Content-Type-Options.
func servedBy(region string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Served-By", region)
		// Every answer is JSON and says so; no browser may guess otherwise.
		w.Header().Set("X-Content-Type-Options", "nosniff")
		h.ServeHTTP(w, r)
	})
}

// observeRequests writes one JSON log line per request, and counts it in
// requests (metrics.go) by the route the mux matched.
func observeRequests(logger *slog.Logger, requests *requestMetrics, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		took := time.Since(start)
		requests.observe(routeOf(r), methodLabel(r.Method), rec.status, took)
		logger.LogAttrs(r.Context(), slog.LevelInfo, "request",
			slog.String("method", r.Method),
			slog.String("path", r.URL.Path),
			slog.Int("status", rec.status),
			slog.Duration("duration", took),
			slog.String("request_id", r.Header.Get("X-Request-ID")),
		)
	})
}

// statusRecorder remembers the status code a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

// WriteHeader records the first status written.
func (s *statusRecorder) WriteHeader(status int) {
	if s.status == 0 {
		s.status = status
	}
	s.ResponseWriter.WriteHeader(status)
}

// Unwrap gives http.ResponseController the writer underneath.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Write records the implicit 200 of a body written without a status.
func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}
