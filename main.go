// Property-listing is one regional backend of a two-region (US and EU)
// property listing service. Each region runs this program against its own
// PostgreSQL database; NGINX routes /us/* and /eu/* to their region and fails
// over to the other one; Kafka carries every change from one region to the
// other.
//
// A tour of the files, in reading order:
//
//   - main.go: configuration from the environment, wiring, start-up and the
//     ordered shutdown.
//   - property.go: the Property type, the rules its values obey, and the
//     writes (update, create, delete to a tombstone): each one atomic
//     statement of the change, the request id and the outbox row, the
//     update under optimistic locking (UPDATE ... WHERE version = $n).
//   - money.go: prices as exact decimals, never a float.
//   - list.go: finding listings, a page at a time (keyset pagination).
//   - etag.go: the ETag that names a listing's exact state, and the
//     conditional requests (If-None-Match, If-Match) that use it.
//   - idempotency.go: X-Request-ID, and how a retried request is recognised in
//     either region.
//   - handlers.go: the routes and a handler for each, with the validation
//     of what each request names.
//   - json.go: the one strict JSON decoder, for request bodies and events,
//     and reading and writing the HTTP bodies.
//   - errors.go: the one function that turns an error into a status code
//     and a JSON body.
//   - standin.go: a region answering for the other (NGINX's failover), and
//     when it may refuse a write.
//   - session.go: session tokens, with which a client reads its own writes
//     whichever region answers, and how a region knows it has caught up
//     with a session without comparing clocks.
//   - middleware.go: what every response goes through: JSON for the mux's
//     own answers, a panic made a 500, X-Served-By, the request log.
//   - database.go: the two connection pools, for requests and replication,
//     and the lock and statement timeouts that keep a request from
//     committing after its client gave up.
//   - replicate.go: how a write reaches the other region, and the
//     replicator that runs the parts below.
//   - records.go: the records on the topic (events, heartbeats, dead
//     letters) and how they are decoded.
//   - relay.go: the transactional outbox's relay, which publishes local
//     writes to Kafka, and its heartbeats.
//   - consume.go: the consumer, which reads the other region's records and
//     stops, loudly, if the broker lost events it needs.
//   - apply.go: the transaction that applies a batch of them: the conflict
//     rule, the request records, the lost writes, the dead letters, the
//     position in the topic.
//   - conflict.go: the conflict rule that makes both databases converge,
//     and the lost writes it leaves, served at GET /{region}/conflicts.
//   - lag.go: what the replication lag means and how it is measured.
//   - rejoin.go: a region whose database went back in time (restored from
//     a backup, or replaced) finds out and rebuilds its copy from the
//     other region; snapshot.go: the consistent copy it rebuilds from.
//   - retention.go: how long request ids and tombstones are kept, and the
//     purge that deletes them after.
//   - metrics.go: what GET /metrics tells Prometheus.
//
// Around the program: init.sql and the seeds define the database and
// service_role.sql the role the service connects as, nginx.conf the
// failover, docker-compose.yml and stack.sh the whole two-region stack, and
// the *_test.go files prove each of these against real servers.
//
// The program also has a health-check mode, "property-listing healthcheck",
// that asks a running instance for GET /health and exits 0 or 1, so that a
// container image without curl can still have a healthcheck; and
// "property-listing rejoin [--from-nothing]", which makes its region
// rebuild its copy from the other region (rejoin.go).
package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// defaultGCPercent is the garbage collector's target unless GOGC is set. The
// service's live heap is a few megabytes, so at Go's default of 100 it
// collects many times a second under load; at 400 the heap may grow to five
// times the live data (tens of megabytes) and the collector runs a quarter as
// often (docs/benchmarks.md, for what that saves).
const defaultGCPercent = 400

// The shutdown budget. Each stage of shutdown has a deadline of its own, so
// the worst case is their sum, shutdownBudget. docker-compose.yml's
// stop_grace_period for the backends (20s) must exceed it, or Docker kills a
// backend in the middle of its shutdown; TestShutdownFitsGracePeriod holds
// the two numbers together.
const (
	// httpDrainTimeout bounds the wait for requests in flight, whose database
	// work is bounded by dbTimeout (handlers.go).
	httpDrainTimeout = 5 * time.Second
	// kafkaCloseTimeout bounds flushing the producer and leaving the
	// consumer group.
	kafkaCloseTimeout = 5 * time.Second
	// shutdownBudget adds the replication stage: the relay's round and the
	// consumer's database attempt in progress, which run side by side to
	// their ends (the consumer's Kafka steps stop at once: its batch, not
	// committed, comes again and changes nothing).
	shutdownBudget = httpDrainTimeout + max(relayRoundTimeout, applyAttemptTimeout) + kafkaCloseTimeout
)

// main runs the program and turns its error into exit status 1.
func main() {
	if err := run(context.Background(), os.Args[1:], os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "property-listing:", err)
		os.Exit(1)
	}
}

// config is everything the service reads from its environment, once, at
// start. The defaults match docker-compose.yml.
type config struct {
	region      string // "us" or "eu": the region this instance serves as
	listenAddr  string // where the API listens, host:port; LISTEN_ADDR, or :PORT
	databaseURL string // PostgreSQL connection string
	dbMaxConns  int    // the size of the connection pool
	debugAddr   string // where to serve pprof; empty for nowhere

	// peerURLs are the other region's backends, base URLs (PEER_URL,
	// comma-separated): where a region that rejoins asks (rejoin.go).
	peerURLs []string

	kafkaBrokers  []string // seed brokers, host:port
	kafkaTopic    string   // the replication topic; its DLQ is kafkaTopic + ".dlq"
	kafkaReplicas int      // the topics' replication factor, KAFKA_REPLICATION_FACTOR

	retention time.Duration // how long request ids and tombstones are kept
}

// loadConfig reads the configuration through getenv. A missing or invalid
// setting is an error that names the variable.
func loadConfig(getenv func(string) string) (config, error) {
	cfg := config{
		region:        getenv("REGION"),
		dbMaxConns:    16,
		kafkaTopic:    "property-updates",
		kafkaReplicas: 1,
		retention:     defaultRetention,
	}
	if !validRegion(cfg.region) {
		return config{}, fmt.Errorf("REGION must be us or eu, got %q", cfg.region)
	}
	var err error
	if cfg.listenAddr, err = listenAddr(getenv); err != nil {
		return config{}, err
	}
	if cfg.dbMaxConns, err = intSetting(getenv, "DB_MAX_CONNS", cfg.dbMaxConns, 1, 1000); err != nil {
		return config{}, err
	}
	if cfg.databaseURL, err = databaseURL(getenv); err != nil {
		return config{}, err
	}
	if cfg.peerURLs, err = peerURLs(getenv("PEER_URL")); err != nil {
		return config{}, err
	}
	if cfg.kafkaBrokers, err = brokers(getenv("KAFKA_BROKER")); err != nil {
		return config{}, err
	}
	if t := getenv("KAFKA_TOPIC"); t != "" {
		if !validTopic(t) {
			return config{}, fmt.Errorf("KAFKA_TOPIC must be 1 to 200 of a-z A-Z 0-9 . _ -, got %q", t)
		}
		cfg.kafkaTopic = t
	}
	// One broker, one replica; a cluster of three takes 3
	// (docs/ha.md).
	if cfg.kafkaReplicas, err = intSetting(getenv, "KAFKA_REPLICATION_FACTOR", cfg.kafkaReplicas, 1, 7); err != nil {
		return config{}, err
	}
	if s := getenv("RETENTION"); s != "" {
		if cfg.retention, err = parseRetention(s); err != nil {
			return config{}, err
		}
	}
	if cfg.debugAddr = getenv("DEBUG_ADDR"); cfg.debugAddr != "" {
		if _, _, err := net.SplitHostPort(cfg.debugAddr); err != nil {
			return config{}, fmt.Errorf("DEBUG_ADDR must be host:port, got %q", cfg.debugAddr)
		}
	}
	return cfg, nil
}

// listenAddr is where the API listens: LISTEN_ADDR (host:port, such as
// 127.0.0.1:8001 for a process that only NGINX on the same host may reach),
// or else every interface on PORT (8000), as a container does, whose
// network is the compose network.
func listenAddr(getenv func(string) string) (string, error) {
	if s := getenv("LISTEN_ADDR"); s != "" {
		_, port, err := net.SplitHostPort(s)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("LISTEN_ADDR must be host:port with a port from 1 to 65535, got %q", s)
		}
		return s, nil
	}
	port, err := intSetting(getenv, "PORT", 8000, 1, 65535)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("", strconv.Itoa(port)), nil
}

// brokers parses KAFKA_BROKER: comma-separated host:port pairs.
func brokers(s string) ([]string, error) {
	if s == "" {
		return nil, errors.New("KAFKA_BROKER is not set (host:port of a Kafka broker, comma-separated for several)")
	}
	var list []string
	for _, b := range strings.Split(s, ",") {
		b = strings.TrimSpace(b)
		if host, port, err := net.SplitHostPort(b); err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("KAFKA_BROKER must be host:port[,host:port...], got %q", s)
		}
		list = append(list, b)
	}
	return list, nil
}

// peerURLs parses PEER_URL: the other region's backends, as
// comma-separated http:// base URLs without a path.
func peerURLs(s string) ([]string, error) {
	if s == "" {
		return nil, errors.New("PEER_URL is not set (the other region's backend, such as http://backend-eu:8000; comma-separated for several)")
	}
	var list []string
	for _, p := range strings.Split(s, ",") {
		u, err := url.Parse(strings.TrimSpace(p))
		if err != nil || u.Scheme != "http" && u.Scheme != "https" || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.User != nil {
			return nil, fmt.Errorf("PEER_URL must be http://host:port[,http://host:port...], got %q", s)
		}
		list = append(list, u.Scheme+"://"+u.Host)
	}
	return list, nil
}

// validTopic reports whether t is a legal Kafka topic name.
func validTopic(t string) bool {
	if len(t) == 0 || len(t) > 200 || t == "." || t == ".." {
		return false
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// intSetting reads an optional integer variable within [lo, hi].
func intSetting(getenv func(string) string, name string, def, lo, hi int) (int, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s must be an integer from %d to %d, got %q", name, lo, hi, s)
	}
	return n, nil
}

// databaseURL returns DATABASE_URL if set, and otherwise builds one from
// DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME, as the seed's .env has
// them.
func databaseURL(getenv func(string) string) (string, error) {
	if u := getenv("DATABASE_URL"); u != "" {
		if _, err := pgx.ParseConfig(u); err != nil {
			return "", errors.New("DATABASE_URL is not a valid PostgreSQL connection string")
		}
		return u, nil
	}
	parts := map[string]string{}
	for _, name := range []string{"DB_HOST", "DB_USER", "DB_PASSWORD", "DB_NAME"} {
		if parts[name] = getenv(name); parts[name] == "" {
			return "", fmt.Errorf("%s is not set (set DATABASE_URL, or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME)", name)
		}
	}
	port, err := intSetting(getenv, "DB_PORT", 5432, 1, 65535)
	if err != nil {
		return "", err
	}
	u := url.URL{
		Scheme: "postgres",
		User:   url.UserPassword(parts["DB_USER"], parts["DB_PASSWORD"]),
		Host:   net.JoinHostPort(parts["DB_HOST"], strconv.Itoa(port)),
		Path:   "/" + parts["DB_NAME"],
	}
	return u.String(), nil
}

// run is the whole program: main only turns its error into an exit code. It
// returns when ctx is cancelled or the process receives SIGINT or SIGTERM,
// and everything it started has stopped.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(args) > 0 && args[0] == "healthcheck" {
		return healthcheck(ctx, getenv)
	}
	if len(args) > 0 && args[0] != "rejoin" {
		return fmt.Errorf("unknown argument %q (the commands are healthcheck and rejoin)", args[0])
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	if len(args) > 0 {
		return rejoinCommand(ctx, args[1:], cfg, func(line string) { fmt.Fprintln(stdout, line) })
	}
	if getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	logger := slog.New(slog.NewJSONHandler(stdout, nil)).With("region", cfg.region)

	// A request's connection is admitted by the rejoiner (rejoin.go), made
	// below: no connection is opened before a request comes.
	var rep *replicator
	db, replicationDB, err := openPools(cfg.databaseURL, cfg.dbMaxConns, func(ctx context.Context, conn *pgx.Conn) error {
		return rep.rejoin.admit(ctx, conn)
	})
	if err != nil {
		return err
	}
	// Closed last, after everything that uses them has stopped.
	defer db.Close()
	defer replicationDB.Close()
	rep, err = newReplicator(logger, replicationDB, db, cfg.region, cfg.kafkaBrokers, cfg.kafkaTopic, cfg.kafkaReplicas, cfg.retention, cfg.peerURLs)
	if err != nil {
		return err
	}
	srv := newHTTPServer(cfg.listenAddr, logger, newServer(logger, cfg.region, db, rep,
		map[string]*sql.DB{"request": db, "replication": replicationDB}))
	listener, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), kafkaCloseTimeout)
		defer cancel()
		rep.close(closeCtx)
		return fmt.Errorf("listen on %s: %w", cfg.listenAddr, err)
	}

	var wg sync.WaitGroup
	serveErr := make(chan error, 1)
	wg.Go(func() {
		// Exits when shutdown calls Shutdown, or on a listener error.
		if err := srv.Serve(listener); !errors.Is(err, http.ErrServerClosed) {
			serveErr <- err
		}
	})
	logger.Info("listening", "addr", listener.Addr().String())

	stopReplication := startReplication(rep)
	debugSrv := startDebugServer(&wg, logger, cfg.debugAddr)

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}
	logger.Info("shutting down")
	err = errors.Join(err, shutdown(srv, debugSrv, stopReplication, rep))
	wg.Wait()
	logger.Info("stopped")
	return err
}

// startReplication runs rep's relay and consumer in the background until the
// returned stop is called; stop returns once both have finished. Replication
// does not stop with run's context but when shutdown says, after HTTP has
// drained: the writes of the last requests still wake the relay.
func startReplication(rep *replicator) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { rep.run(ctx) }) // exits when ctx is cancelled
	return func() {
		cancel()
		wg.Wait()
	}
}

// startDebugServer serves pprof on addr, a listener NGINX knows nothing
// about, so that internal endpoints are never reachable from outside. It
// returns nil, and starts nothing, when addr is empty. The server's
// goroutine, counted in wg, exits when shutdown closes the server.
func startDebugServer(wg *sync.WaitGroup, logger *slog.Logger, addr string) *http.Server {
	if addr == "" {
		return nil
	}
	srv := &http.Server{Addr: addr, Handler: debugHandler(), ReadHeaderTimeout: 5 * time.Second}
	wg.Go(func() {
		if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
			logger.Warn("debug server stopped", "err", err)
		}
	})
	return srv
}

// newHTTPServer returns the server of the API on addr.
func newHTTPServer(addr string, logger *slog.Logger, h http.Handler) *http.Server {
	return &http.Server{
		Addr:    addr,
		Handler: h,
		// Slow or stalled clients must not hold connections forever.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      15 * time.Second,
		// Longer than NGINX's upstream keepalive_timeout (60s), so that NGINX,
		// not the backend, closes idle connections: a backend that closes
		// first races NGINX reusing the connection.
		IdleTimeout: 120 * time.Second,
		ErrorLog:    slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
}

// shutdown stops the service in order, each stage within its own deadline
// (shutdownBudget in all): first HTTP, so that no new request starts and
// those in flight finish; then replication, whose relay finishes the round it
// is publishing and whose consumer finishes the batch it is applying (events
// not yet published wait in the outbox for the next start); then the Kafka
// clients, the producer flushed and the consumer group left. The database
// pool, which all of them use, is closed by run after this returns.
func shutdown(srv, debugSrv *http.Server, stopReplication func(), rep *replicator) error {
	var err error
	// Fresh deadlines: the context run was given is already cancelled.
	drainCtx, cancel := context.WithTimeout(context.Background(), httpDrainTimeout)
	defer cancel()
	if serr := srv.Shutdown(drainCtx); serr != nil {
		err = fmt.Errorf("http shutdown: %w", serr)
	}
	if debugSrv != nil {
		debugSrv.Close()
	}
	stopReplication()
	closeCtx, cancel := context.WithTimeout(context.Background(), kafkaCloseTimeout)
	defer cancel()
	rep.close(closeCtx)
	return err
}

// debugHandler serves net/http/pprof's profiles.
func debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// healthcheck asks the instance on its LISTEN_ADDR (or PORT) for GET
// /health and fails unless it answers 200. An instance listening on every
// interface is asked on loopback.
func healthcheck(ctx context.Context, getenv func(string) string) error {
	addr, err := listenAddr(getenv)
	if err != nil {
		return err
	}
	host, port, _ := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	target := "http://" + net.JoinHostPort(host, port) + "/health"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s", target, resp.Status)
	}
	return nil
}
