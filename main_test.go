package main

// The test harness every unit test shares, and the tests of main.go.
//
// The tests that need PostgreSQL run against a real server: TestMain creates
// a scratch database from init.sql and both seeds on the server named by
// TEST_DATABASE_URL, and drops it afterwards, so a running stack on the same
// server is never touched. The tests of routing, bad input and error mapping
// need no database and run anywhere.

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// scratchURL is the connection string of the scratch database, or "" when
// there is no server to make one on.
var scratchURL string

// requireStack is true in the integration build (stack_test.go sets it):
// those tests need the running stack, and TestMain checks once that it is up
// rather than let every test fail with the same message.
var requireStack bool

// checkStack is the integration build's check that the stack is up.
var checkStack func() error

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	loadSettings()
	if requireStack {
		if err := checkStack(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	admin, chosen := testDatabaseURL()
	if admin == "" {
		// Every test that needs the database fails and says how to get one.
		return m.Run()
	}
	name := fmt.Sprintf("property_test_%d_%d", os.Getpid(), time.Now().UnixNano())
	url, drop, err := createScratchDB(admin, name)
	if err != nil && (chosen || requireStack) {
		fmt.Fprintln(os.Stderr, "create scratch database:", err)
		return 1
	}
	if err != nil {
		// A guessed server that is not there: run what needs no database.
		fmt.Fprintf(os.Stderr, "no scratch database on %s (%v): the tests that need PostgreSQL will fail\n", admin, err)
		return m.Run()
	}
	defer drop()
	scratchURL = url
	return m.Run()
}

// settings are the variables that point the tests at a database and at the
// running stack, found the way a user would expect: the environment first,
// then .stack/stack.env (which ./stack.sh up writes and down removes), then
// .env (compose's credentials, as compose reads them). loadSettings fills it
// once, before any test runs.
var settings = map[string]string{}

// setting returns the named setting, or def if none is found.
func setting(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	if v := settings[name]; v != "" {
		return v
	}
	return def
}

// loadSettings reads .env and then .stack/stack.env into settings; a file
// that is not there adds nothing.
func loadSettings() {
	for _, file := range []string{".env", ".stack/stack.env"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			line = strings.TrimSpace(line)
			name, value, ok := strings.Cut(line, "=")
			if !ok || strings.HasPrefix(line, "#") {
				continue
			}
			settings[strings.TrimSpace(name)] = strings.Trim(strings.TrimSpace(value), `"'`)
		}
	}
}

// testDatabaseURL returns the server to make the scratch database on, and
// whether somebody chose it: TEST_DATABASE_URL from the environment or from
// the local stack's stack.env; or else a guess, the US database's server of
// a compose stack with the credentials in .env.
func testDatabaseURL() (url string, chosen bool) {
	if u := setting("TEST_DATABASE_URL", ""); u != "" {
		return u, true
	}
	user, password := setting("POSTGRES_USER", ""), setting("POSTGRES_PASSWORD", "")
	if user == "" || password == "" {
		return "", false
	}
	u := neturl.URL{Scheme: "postgres", User: neturl.UserPassword(user, password), Host: "localhost:5433", Path: "/postgres"}
	return u.String(), false
}

// createScratchDB creates database name on the admin server, loads the
// schema and both seeds, and returns its URL and a function that drops it.
func createScratchDB(adminURL, name string) (string, func(), error) {
	ctx := context.Background()
	admin, err := openDB(adminURL, 2, sessionLimits{})
	if err != nil {
		return "", nil, err
	}
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close()
		return "", nil, err
	}
	drop := func() {
		admin.ExecContext(ctx, "DROP DATABASE "+name+" WITH (FORCE)")
		admin.Close()
	}
	url, err := replaceDBName(adminURL, name)
	if err != nil {
		drop()
		return "", nil, err
	}
	db, err := openDB(url, 1, sessionLimits{})
	if err != nil {
		drop()
		return "", nil, err
	}
	defer db.Close()
	for _, file := range []string{"init.sql", "us_seed.sql", "eu_seed.sql"} {
		script, err := os.ReadFile(file)
		if err == nil {
			// Without arguments the driver uses the simple protocol, which
			// runs a whole multi-statement script.
			_, err = db.ExecContext(ctx, string(script))
		}
		if err != nil {
			drop()
			return "", nil, fmt.Errorf("load %s: %w", file, err)
		}
	}
	return url, drop, nil
}

// replaceDBName returns a PostgreSQL URL with its database name replaced.
func replaceDBName(rawURL, name string) (string, error) {
	i := strings.Index(rawURL, "://")
	if i < 0 {
		return "", fmt.Errorf("TEST_DATABASE_URL must be a postgres:// URL")
	}
	rest := rawURL[i+3:]
	query := ""
	if q := strings.IndexByte(rest, '?'); q >= 0 {
		rest, query = rest[:q], rest[q:]
	}
	host, _, _ := strings.Cut(rest, "/")
	return rawURL[:i+3] + host + "/" + name + query, nil
}

// testDB returns a pool on the scratch database. Without one it fails the
// test, saying how to provide one.
func testDB(t *testing.T) *sql.DB {
	t.Helper()
	if scratchURL == "" {
		t.Fatal("no PostgreSQL server to make a scratch database on: start the stack (`./stack.sh up` " +
			"or `docker compose up -d --wait`), or set TEST_DATABASE_URL to a server the tests may " +
			"create a database on, e.g. TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres")
	}
	db, err := openDB(scratchURL, 30, requestLimits)
	if err != nil {
		t.Fatalf("openDB(%q): %v", scratchURL, err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func ptr[T any](v T) *T { return &v }

// waitFor polls cond until it holds and returns how long that took. It fails
// the test, naming what it waited for, after timeout.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	tb.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			tb.Fatalf("waited %v for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// newRequestID returns a request id no earlier run has used.
func newRequestID(prefix string) string {
	return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano())
}

// seedProperty is property id as the seeds write it.
func seedProperty(id int64) Property {
	region := "us"
	if id > 500 {
		region = "eu"
	}
	return Property{
		ID:           id,
		Price:        Money(15_000_000 + id*125_000 + (id%4)*25),
		Bedrooms:     ptr(int32(1 + id%5)),
		Bathrooms:    ptr(int32(1 + id%3)),
		RegionOrigin: region,
		Version:      1,
		UpdatedAt:    time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
	}
}

func TestLoadConfig(t *testing.T) {
	base := map[string]string{"REGION": "us", "DATABASE_URL": "postgres://u:p@db:5432/property_db", "KAFKA_BROKER": "kafka:29092", "PEER_URL": "http://backend-eu:8000"}
	with := func(kv ...string) func(string) string {
		env := map[string]string{}
		for k, v := range base {
			env[k] = v
		}
		for i := 0; i < len(kv); i += 2 {
			env[kv[i]] = kv[i+1]
		}
		return func(k string) string { return env[k] }
	}
	tests := []struct {
		name    string
		getenv  func(string) string
		want    config
		wantErr string
	}{
		{"defaults", with(), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: defaultRetention}, ""},
		{"kafka_brokers", with("KAFKA_BROKER", "k1:9092, k2:9092", "KAFKA_TOPIC", "updates.v2"), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000",
			databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16, kafkaBrokers: []string{"k1:9092", "k2:9092"}, kafkaTopic: "updates.v2", kafkaReplicas: 1, retention: defaultRetention}, ""},
		{"peer_urls", with("PEER_URL", "http://10.0.0.7:8000/, https://eu-2.internal:8443"), config{region: "us", peerURLs: []string{"http://10.0.0.7:8000", "https://eu-2.internal:8443"},
			listenAddr: ":8000", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16, kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: defaultRetention}, ""},
		{"peer_url_missing", with("PEER_URL", ""), config{},
			"PEER_URL is not set (the other region's backend, such as http://backend-eu:8000; comma-separated for several)"},
		{"peer_url_with_path", with("PEER_URL", "http://backend-eu:8000/eu"), config{}, `PEER_URL must be http://host:port[,http://host:port...], got "http://backend-eu:8000/eu"`},
		{"peer_url_no_scheme", with("PEER_URL", "backend-eu:8000"), config{}, `PEER_URL must be http://host:port[,http://host:port...], got "backend-eu:8000"`},
		{"kafka_broker_missing", with("KAFKA_BROKER", ""), config{},
			"KAFKA_BROKER is not set (host:port of a Kafka broker, comma-separated for several)"},
		{"kafka_broker_no_port", with("KAFKA_BROKER", "kafka"), config{}, `KAFKA_BROKER must be host:port[,host:port...], got "kafka"`},
		{"kafka_topic_invalid", with("KAFKA_TOPIC", "bad topic"), config{}, `KAFKA_TOPIC must be 1 to 200 of a-z A-Z 0-9 . _ -, got "bad topic"`},
		{"debug_addr_invalid", with("DEBUG_ADDR", "6060"), config{}, `DEBUG_ADDR must be host:port, got "6060"`},
		{"retention_days", with("RETENTION", "10d"), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: 240 * time.Hour}, ""},
		{"retention_duration", with("RETENTION", "90s"), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: 90 * time.Second}, ""},
		{"replication_factor", with("KAFKA_REPLICATION_FACTOR", "3"), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 3, retention: defaultRetention}, ""},
		{"replication_factor_zero", with("KAFKA_REPLICATION_FACTOR", "0"), config{}, `KAFKA_REPLICATION_FACTOR must be an integer from 1 to 7, got "0"`},
		{"retention_invalid", with("RETENTION", "a week"), config{}, `RETENTION must be a duration such as 8d or 192h, got "a week"`},
		{"retention_zero", with("RETENTION", "0d"), config{}, `RETENTION must be a duration such as 8d or 192h, got "0d"`},
		{"region_missing", with("REGION", ""), config{}, `REGION must be us or eu, got ""`},
		{"region_unknown", with("REGION", "asia"), config{}, `REGION must be us or eu, got "asia"`},
		{"port_not_a_number", with("PORT", "http"), config{}, `PORT must be an integer from 1 to 65535, got "http"`},
		{"port_out_of_range", with("PORT", "70000"), config{}, `PORT must be an integer from 1 to 65535, got "70000"`},
		{"listen_addr", with("LISTEN_ADDR", "127.0.0.1:8001", "PORT", "9"), config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: "127.0.0.1:8001", databaseURL: "postgres://u:p@db:5432/property_db", dbMaxConns: 16,
			kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: defaultRetention}, ""},
		{"listen_addr_no_port", with("LISTEN_ADDR", "127.0.0.1"), config{}, `LISTEN_ADDR must be host:port with a port from 1 to 65535, got "127.0.0.1"`},
		{"listen_addr_bad_port", with("LISTEN_ADDR", "127.0.0.1:http"), config{}, `LISTEN_ADDR must be host:port with a port from 1 to 65535, got "127.0.0.1:http"`},
		{"database_url_invalid", with("DATABASE_URL", "postgres://%zz"), config{}, "DATABASE_URL is not a valid PostgreSQL connection string"},
		{"db_parts", with("DATABASE_URL", "", "DB_HOST", "db-eu", "DB_USER", "app", "DB_PASSWORD", "p@ss word", "DB_NAME", "property_db"),
			config{region: "us", peerURLs: []string{"http://backend-eu:8000"}, listenAddr: ":8000", databaseURL: "postgres://app:p%40ss%20word@db-eu:5432/property_db", dbMaxConns: 16,
				kafkaBrokers: []string{"kafka:29092"}, kafkaTopic: "property-updates", kafkaReplicas: 1, retention: defaultRetention}, ""},
		{"db_parts_missing_password", with("DATABASE_URL", "", "DB_HOST", "db-eu", "DB_USER", "app", "DB_NAME", "property_db"), config{},
			"DB_PASSWORD is not set (set DATABASE_URL, or DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME)"},
		{"db_port_invalid", with("DATABASE_URL", "", "DB_HOST", "h", "DB_USER", "u", "DB_PASSWORD", "p", "DB_NAME", "n", "DB_PORT", "x"), config{},
			`DB_PORT must be an integer from 1 to 65535, got "x"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loadConfig(tt.getenv)
			gotErr := ""
			if err != nil {
				gotErr = err.Error()
			}
			if gotErr != tt.wantErr {
				t.Fatalf("loadConfig() error = %q, want %q", gotErr, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(config{})); diff != "" {
				t.Errorf("loadConfig() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRunStartsAndStops(t *testing.T) {
	testDB(t) // fails early, with the explanation, when there is no database
	ctx, cancel := context.WithCancel(context.Background())
	// Kafka and the peer region on a closed port: the service must start,
	// serve and stop while both are down (it serves once it has waited
	// peerCatchUpWait for either to tell what it has published, rejoin.go).
	env := map[string]string{"REGION": "eu", "LISTEN_ADDR": "127.0.0.1:18931", "DATABASE_URL": scratchURL, "KAFKA_BROKER": "127.0.0.1:1", "PEER_URL": "http://127.0.0.1:1"}
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, &out) }()
	t.Cleanup(cancel)

	// The health-check mode of the same binary must see the instance healthy.
	waitFor(t, 10*time.Second, "run healthcheck to pass against the started service", func() bool {
		return run(context.Background(), []string{"healthcheck"}, func(k string) string { return env[k] }, io.Discard) == nil
	})
	// Reads and writes work while Kafka is down; the write waits in the
	// outbox.
	base := "http://127.0.0.1:18931/eu/properties/50"
	resp, err := http.Get(base)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s with Kafka down: %v %v, want 200", base, resp, err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("PUT", base, strings.NewReader(`{"price": 1234.5, "version": 1}`))
	req.Header.Set("X-Request-ID", newRequestID("kafka-down"))
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT %s with Kafka down: %v %v, want 200", base, resp, err)
	}
	resp.Body.Close()
	db := testDB(t)
	if row := readRow(t, db, 50); row.Outbox != 1 || row.Property.Version != 2 {
		t.Errorf("after a PUT with Kafka down: version %d, outbox rows %d; want 2 and 1 waiting", row.Property.Version, row.Outbox)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run() after cancel = %v, want nil", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run() did not return within 15s of cancel")
	}
	if !strings.Contains(out.String(), `"msg":"stopped"`) {
		t.Errorf("run() log does not show an orderly stop:\n%s", out.String())
	}
}

// TestShutdownFitsGracePeriod holds the shutdown budget (main.go) and
// compose's stop_grace_period for the backends together: Docker kills a
// backend that has not stopped when the period ends, in the middle of its
// shutdown.
func TestShutdownFitsGracePeriod(t *testing.T) {
	compose, err := os.ReadFile("docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*stop_grace_period:\s*(\d+)s\s*$`).FindSubmatch(compose)
	if m == nil {
		t.Fatal("docker-compose.yml: no stop_grace_period in seconds for the backends")
	}
	seconds, _ := strconv.Atoi(string(m[1]))
	if grace := time.Duration(seconds) * time.Second; shutdownBudget >= grace {
		t.Errorf("shutdown budget %v does not fit docker-compose.yml's stop_grace_period %v", shutdownBudget, grace)
	}
}
