//go:build integration

package main

// The harness of the integration tests: the running stack, reached through
// NGINX, its databases and its control command.
//
// The tests talk HTTP to NGINX in front of the running stack and stop and
// start its services through one command, so that the same tests run
// against docker compose and against ./stack.sh:
//
//	STACK_URL                 NGINX's address            (default http://localhost:8080)
//	STACK_CMD                 the stack's control command (default "docker compose")
//	STACK_DB_US, STACK_DB_EU  the regional databases (default: localhost:5433
//	                          and :5434 with POSTGRES_USER, POSTGRES_PASSWORD
//	                          and POSTGRES_DB, as in .env)
//	STACK_KAFKA               a broker for host clients (default localhost:9092)
//
// Each is read from the environment, else from .stack/stack.env, which
// ./stack.sh up writes, else from .env (see setting in main_test.go): after
// either stack is up, a bare `go test -tags=integration ./...` finds it.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// stack is the running system under test.
type stack struct {
	url    string
	cmd    []string
	client *http.Client
}

// In this build the stack must be up: TestMain checks it once, before any
// test runs, and stops with one message if it is not.
func init() {
	requireStack = true
	checkStack = func() error { return findStack().up() }
}

// findStack returns the stack the settings name.
func findStack() *stack {
	return &stack{
		url:    setting("STACK_URL", "http://localhost:8080"),
		cmd:    strings.Fields(setting("STACK_CMD", "docker compose")),
		client: &http.Client{Timeout: 15 * time.Second},
	}
}

// up returns an error that says how to start the stack unless both regions
// answer healthy through NGINX.
func (s *stack) up() error {
	for _, region := range []string{"us", "eu"} {
		status, _, _, err := s.do("GET", "/"+region+"/health", "", "")
		if err != nil || status != http.StatusOK {
			return fmt.Errorf("the stack at %s is not up (GET /%s/health: %d, %v): start it with "+
				"`./stack.sh up` or `docker compose up -d --wait` (or run `./stack.sh test`)", s.url, region, status, err)
		}
	}
	return nil
}

// newStack returns the running stack, and fails the test with the command
// that starts it if NGINX does not answer (a test may have broken it).
func newStack(t *testing.T) *stack {
	t.Helper()
	s := findStack()
	if err := s.up(); err != nil {
		t.Fatal(err)
	}
	return s
}

// do sends one request through NGINX. An empty requestID sends no
// X-Request-ID header. err is a transport error or an undecodable body.
func (s *stack) do(method, path, requestID, body string) (status int, servedBy string, got response, err error) {
	header := http.Header{}
	if requestID != "" {
		header.Set("X-Request-ID", requestID)
	}
	status, h, got, err := s.doWith(method, path, header, body)
	return status, h.Get("X-Served-By"), got, err
}

// doWith is do with any request headers, and all the answer's headers.
func (s *stack) doWith(method, path string, header http.Header, body string) (status int, h http.Header, got response, err error) {
	req, err := http.NewRequest(method, s.url+path, strings.NewReader(body))
	if err != nil {
		return 0, nil, response{}, err
	}
	req.Header = header
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, nil, response{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, resp.Header, response{}, err
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		return resp.StatusCode, resp.Header, response{}, fmt.Errorf("%s %s: decoding %q: %w", method, path, raw, err)
	}
	return resp.StatusCode, resp.Header, got, nil
}

// mustDo is do for requests that must get an answer.
func (s *stack) mustDo(t *testing.T, method, path, requestID, body string) (int, string, response) {
	t.Helper()
	status, servedBy, got, err := s.do(method, path, requestID, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return status, servedBy, got
}

// control runs the stack command, e.g. control(t, "stop", "backend-us").
func (s *stack) control(t testing.TB, args ...string) string {
	t.Helper()
	cmd := exec.Command(s.cmd[0], append(s.cmd[1:], args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", strings.Join(s.cmd, " "), strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// stop stops a service (kill with SIGKILL when crash is set) and restarts it
// in t.Cleanup, so that a failing test still leaves the stack whole.
func (s *stack) stop(t *testing.T, service string, crash bool) {
	t.Helper()
	t.Cleanup(func() { s.start(t, service) })
	action := "stop"
	if crash {
		action = "kill"
	}
	s.control(t, action, service)
}

// freeze pauses a service (SIGSTOP, or docker compose pause: its
// connections stay open and silent, as a hung process's do) and returns
// the function that resumes it, which t.Cleanup also calls. For a test
// that only needs Kafka away for a moment, a freeze costs nothing to undo,
// where a stop and a start cost the broker's restart, seconds each.
func (s *stack) freeze(t testing.TB, service string) (thaw func()) {
	t.Helper()
	var once sync.Once
	thaw = func() { once.Do(func() { s.control(t, "unpause", service) }) }
	t.Cleanup(thaw)
	s.control(t, "pause", service)
	return thaw
}

// start starts a service and waits until both regions answer healthy from
// their own backend again.
func (s *stack) start(t *testing.T, service string) {
	t.Helper()
	s.control(t, "start", service)
	for _, region := range []string{"us", "eu"} {
		waitFor(t, 30*time.Second, region+" healthy and served by "+region, func() bool {
			status, servedBy, _, err := s.do("GET", "/"+region+"/health", "", "")
			return err == nil && status == http.StatusOK && servedBy == region
		})
	}
}

// current reads property id through region's prefix.
func (s *stack) current(t *testing.T, region string, id int64) response {
	t.Helper()
	path := fmt.Sprintf("/%s/properties/%d", region, id)
	status, _, got := s.mustDo(t, "GET", path, "", "")
	if status != http.StatusOK {
		t.Fatalf("GET %s: status %d (%+v), want 200", path, status, got)
	}
	return got
}

// accessLogEntry is one line of NGINX's JSON access log.
type accessLogEntry struct {
	Method               string  `json:"method"`
	Path                 string  `json:"path"`
	Status               int     `json:"status"`
	RequestID            string  `json:"request_id"`
	UpstreamAddr         string  `json:"upstream_addr"`
	UpstreamStatus       string  `json:"upstream_status"`
	UpstreamResponseTime string  `json:"upstream_response_time"`
	RequestTime          float64 `json:"request_time"`
}

// accessLogEntry finds the access log line of requestID in the stack's NGINX
// logs, waiting briefly for it to be written.
func (s *stack) accessLogEntry(t *testing.T, requestID string) accessLogEntry {
	t.Helper()
	var found accessLogEntry
	waitFor(t, 5*time.Second, "the access log line of "+requestID, func() bool {
		for _, line := range strings.Split(s.control(t, "logs", "nginx"), "\n") {
			i := strings.IndexByte(line, '{')
			if i < 0 || !strings.Contains(line, `"request_id":"`+requestID+`"`) {
				continue
			}
			if err := json.Unmarshal([]byte(line[i:]), &found); err != nil {
				t.Fatalf("access log line %q: %v", line, err)
			}
			return true
		}
		return false
	})
	return found
}

// stackDB opens one region's database as the superuser, failing with what
// to set if the address is unknown or the database does not answer.
func stackDB(t testing.TB, region string) *sql.DB {
	t.Helper()
	return openStackDB(t, stackURL(t, region))
}

// serviceDB opens one region's database as the backends' own role
// (service_role.sql).
func serviceDB(t testing.TB, region string) *sql.DB {
	t.Helper()
	u, err := neturl.Parse(stackURL(t, region))
	if err != nil {
		t.Fatal(err)
	}
	user, pass := setting("SERVICE_DB_USER", ""), setting("SERVICE_DB_PASSWORD", "")
	if user == "" || pass == "" {
		t.Fatal("SERVICE_DB_USER and SERVICE_DB_PASSWORD are not set (in .env for the compose stack; ./stack.sh up writes .stack/stack.env)")
	}
	u.User = neturl.UserPassword(user, pass)
	return openStackDB(t, u.String())
}

// stackURL is the address of one region's database, as the superuser.
func stackURL(t testing.TB, region string) string {
	t.Helper()
	name := "STACK_DB_" + strings.ToUpper(region)
	if url := setting(name, ""); url != "" {
		return url
	}
	user, pass, db := setting("POSTGRES_USER", ""), setting("POSTGRES_PASSWORD", ""), setting("POSTGRES_DB", "")
	if user == "" || pass == "" || db == "" {
		t.Fatalf("%s is not set, nor POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB to build it from "+
			"(in .env for the compose stack; ./stack.sh up writes .stack/stack.env)", name)
	}
	port := map[string]string{"us": "5433", "eu": "5434"}[region]
	u := neturl.URL{Scheme: "postgres", User: neturl.UserPassword(user, pass), Host: "localhost:" + port, Path: "/" + db}
	return u.String()
}

// openStackDB opens a small pool on url and fails unless it answers.
func openStackDB(t testing.TB, url string) *sql.DB {
	t.Helper()
	db, err := openDB(url, 4, sessionLimits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.PingContext(context.Background()); err != nil {
		t.Fatalf("the database does not answer (%v): is the stack up? `./stack.sh up` or `docker compose up -d --wait`", err)
	}
	return db
}

// lag reads one region's replication report through NGINX.
func (s *stack) lag(t *testing.T, region string) LagReport {
	t.Helper()
	resp, err := s.client.Get(s.url + "/" + region + "/replication-lag")
	if err != nil {
		t.Fatalf("GET /%s/replication-lag: %v", region, err)
	}
	defer resp.Body.Close()
	var r LagReport
	if err := decodeJSON(resp, &r); err != nil {
		t.Fatalf("GET /%s/replication-lag: %v", region, err)
	}
	return r
}

// decodeJSON decodes a 200 response's body into v.
func decodeJSON(resp *http.Response, v any) error {
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	return strictUnmarshal(b, v)
}

// caughtUp waits until neither region has anything left to replicate: no
// outbox backlog, no unread records, and a lag under a second.
func (s *stack) caughtUp(t *testing.T, timeout time.Duration) {
	t.Helper()
	// A backend serves a lag report read up to reportInterval ago (lag.go):
	// one read before the writes this call is meant to wait for would say
	// there is nothing to wait for.
	time.Sleep(reportInterval + 10*time.Millisecond)
	waitFor(t, timeout, "both regions to catch up", func() bool {
		for _, region := range []string{"us", "eu"} {
			r := s.lag(t, region)
			if r.OutboxBacklog > 0 || r.RecordsBehind > 0 || r.LagSeconds > 1 {
				return false
			}
		}
		return true
	})
}

// allProperties reads a region's whole properties table, ordered by id.
func allProperties(t *testing.T, db *sql.DB) []Property {
	t.Helper()
	all, err := readAll(db)
	if err != nil {
		t.Fatalf("read properties: %v", err)
	}
	return all
}

// readAll is allProperties without a test to fail.
func readAll(db *sql.DB) ([]Property, error) {
	rows, err := db.Query(`SELECT id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted FROM properties ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var all []Property
	for rows.Next() {
		p, err := scanProperty(rows)
		if err != nil {
			return nil, err
		}
		all = append(all, p)
	}
	return all, rows.Err()
}

// stackBrokers are the stack's Kafka brokers (STACK_KAFKA).
func stackBrokers() []string {
	return strings.Split(setting("STACK_KAFKA", "localhost:9092"), ",")
}

// waitIdentical waits until both databases hold identical properties tables
// and fails with the difference if they do not within timeout.
func waitIdentical(t *testing.T, us, eu *sql.DB, timeout time.Duration) []Property {
	t.Helper()
	var a []Property
	var diff string
	identical := false
	defer func() {
		// Runs as waitFor's Fatal unwinds the test, too.
		if !identical {
			t.Logf("the last difference (-us +eu):\n%s", diff)
		}
	}()
	waitFor(t, timeout, "identical properties tables in both regions", func() bool {
		var b []Property
		a, b = allProperties(t, us), allProperties(t, eu)
		diff = cmp.Diff(a, b)
		return diff == ""
	})
	identical = true
	return a
}

// put updates property id through region's prefix from its current version
// there, and returns the status and body.
func (s *stack) put(t *testing.T, region string, id int64, requestID string, price Money) (int, response) {
	t.Helper()
	version := s.current(t, region, id).Version
	status, _, got := s.mustDo(t, "PUT", fmt.Sprintf("/%s/properties/%d", region, id), requestID,
		fmt.Sprintf(`{"price": %s, "version": %d}`, price, version))
	return status, got
}

// waitReplicated waits until region serves property id at want's version or
// later, and returns what it serves.
func (s *stack) waitReplicated(t *testing.T, region string, want Property, timeout time.Duration) response {
	t.Helper()
	var got response
	waitFor(t, timeout, fmt.Sprintf("%s to serve property %d at version %d", region, want.ID, want.Version), func() bool {
		var servedBy string
		var status int
		var err error
		status, servedBy, got, err = s.do("GET", fmt.Sprintf("/%s/properties/%d", region, want.ID), "", "")
		return err == nil && status == http.StatusOK && servedBy == region && got.Version >= want.Version
	})
	return got
}

// scrape reads one unlabelled sample from a /metrics page.
func scrape(url, metric string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if rest, ok := strings.CutPrefix(line, metric+" "); ok {
			return strconv.ParseFloat(rest, 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", url, metric)
}
