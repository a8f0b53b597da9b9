//go:build integration

package main

// BenchmarkServiceSQL is the fair limit for a PUT: the service's own SQL,
// run by pgbench, the leanest client PostgreSQL has. pgbench's built-in
// simple-update (-N) is not what a PUT costs the databases. A PUT is one
// statement that writes the row, the request record and the outbox row
// (updatePropertySQL); the relay then reads and deletes the outbox row
// (readOutboxSQL, deleteOutboxSQL) and the other region applies it in a
// batch (apply.go). Here pgbench runs those statements, their text taken
// from the constants the service runs, so a change to one shows here too:
//
//   - in US, benchClients clients each updating its own listings, as
//     BenchmarkPutProperty does, from the version it last wrote; beside
//     them a relay round (the relay's lock, read and delete) for every
//     sqlBenchRound writes;
//   - then in EU, one client applying as many events as US wrote, in
//     batches of sqlBenchRound: the positions check, the row locks, the
//     request ids' records, the upsert, their records, a watermark and the
//     positions, in one transaction, as consumer.apply does.
//
// The rate is US's writes over the time of both parts. EU runs after US,
// not beside it: that charges the apply's whole time to the rate, the most
// it can cost when both share the machine's cores. Each part runs in a
// scratch database of its own (the schema, the seeds, and as many request
// records as the stack's database of that region holds), so the stack's
// data is not touched and each run starts from version 1. The US part runs
// for BENCH_SECONDS (default 1; ./stack.sh bench sets pgbench's duration).
//
// Where it is not the service's work, besides Kafka, HTTP and the
// service's Go. In its favour: the request ids are 19 digits, not the PUT
// benchmark's 35 characters; the relay's read is gathered into one array
// in the database, where the service receives the rows; the optional
// parameters that are null in a PUT ($6, $7, $9) are the literal NULL, which
// the planner folds away; the scratch tables are fresh, not churned; the
// relay sends no heartbeat rounds (a few a second). Against it: each EU
// batch is first built by a query, inside the EU part's time; pgbench sends
// the arrays as text, the service's driver in binary.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sqlBenchRound is how many writes a relay round and an apply batch carry:
// about what the service's relay publishes per round at the PUT
// benchmark's rate (a round every relayBusyGap at about 2,000 writes/s).
const sqlBenchRound = 200

func BenchmarkServiceSQL(b *testing.B) {
	seconds, err := strconv.Atoi(setting("BENCH_SECONDS", "1"))
	if err != nil || seconds < 1 {
		b.Fatalf("BENCH_SECONDS=%q: want a whole number of seconds", setting("BENCH_SECONDS", ""))
	}
	pgbench := pgbenchPath(b)
	us, eu := sqlBenchDB(b, "us"), sqlBenchDB(b, "eu")
	dir := b.TempDir()
	put, relay, apply := filepath.Join(dir, "put.sql"), filepath.Join(dir, "relay.sql"), filepath.Join(dir, "apply.sql")
	writeScript(b, put, putScript())
	writeScript(b, relay, relayScript())
	writeScript(b, apply, applyScript())
	perClient := 1000 / benchClients
	b.ResetTimer()

	out := runPgbench(b, pgbench, us, "-c", strconv.Itoa(benchClients), "-j", "2", "-T", strconv.Itoa(seconds),
		"-D", "r=0", "-D", "ids="+strconv.Itoa(perClient), "-D", "region=us",
		"-D", "fingerprint="+strings.Repeat("f", 64),
		"-D", "relaylock="+strconv.FormatInt(relayLockKey, 10), "-D", "batch="+strconv.Itoa(relayBatchSize),
		"-f", put+"@"+strconv.Itoa(sqlBenchRound), "-f", relay+"@1")
	writes, usTime := pgbenchScriptCount(b, out, 1), pgbenchTime(b, out)
	if writes == 0 {
		b.Fatalf("pgbench wrote nothing in US:\n%s", out)
	}
	// The writes after the last relay round (pgbench draws the rounds at
	// random, one per sqlBenchRound writes on average), drained as the
	// relay drains them and in the time, so that every write is published.
	backlog := sqlCount(b, us, "SELECT count(*) FROM outbox")
	if backlog > 0 {
		out = runPgbench(b, pgbench, us, "-c", "1", "-t", strconv.Itoa(backlog/relayBatchSize+1),
			"-D", "relaylock="+strconv.FormatInt(relayLockKey, 10), "-D", "batch="+strconv.Itoa(relayBatchSize), "-f", relay)
		usTime += pgbenchTime(b, out)
	}
	out = runPgbench(b, pgbench, eu, "-c", "1", "-t", strconv.Itoa((writes+sqlBenchRound-1)/sqlBenchRound),
		"-D", "n=0", "-D", "events="+strconv.Itoa(sqlBenchRound), "-D", "listings="+strconv.Itoa(benchClients*perClient),
		"-D", "peer=us", "-D", "topic=property-updates", "-D", "partitions="+strconv.Itoa(topicPartitions),
		"-D", "skew="+strconv.FormatInt(maxClockSkew.Milliseconds(), 10), "-f", apply)
	euTime := pgbenchTime(b, out)
	b.StopTimer()

	checkSQLBench(b, us, eu, writes, backlog)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(writes)/(usTime+euTime).Seconds(), "writes/s")
	b.ReportMetric(usTime.Seconds(), "us_s")
	b.ReportMetric(euTime.Seconds(), "eu_s")
	b.ReportMetric(sqlBenchRound, "round_writes")
}

// putScript is a client's PUT: the next of its listings (ids per client,
// consecutive from 1 + client_id * ids), from the version its last write
// of it left (every listing starts at 1), with a fresh request id. r counts
// the client's writes. Bedrooms, bathrooms and If-Match are null, as in
// BenchmarkPutProperty's bodies.
func putScript() string {
	return `\set r :r + 1
\set id 1 + :client_id * :ids + (:r - 1) % :ids
\set version 1 + (:r - 1) / :ids
\set price 100000 + :r % 900000
\set request 100000000000000000 * (:client_id + 1) + :r
` + pgbenchSQL(updatePropertySQL, ":request", ":fingerprint", ":id", ":version", ":price", "NULL", "NULL", ":region", "NULL") + ";\n"
}

// relayScript is one relay round: the lock, and if it is this round's, the
// oldest batch of the outbox read and deleted (relay.publishRound; the
// seqs the read returns are gathered into the delete's array).
func relayScript() string {
	return "BEGIN;\n" +
		pgbenchSQL(lockRelaySQL, ":relaylock") + ` \gset
\if :pg_try_advisory_xact_lock
SELECT coalesce(array_agg(seq), '{}') AS seqs FROM (` + pgbenchSQL(readOutboxSQL, ":batch") + `) AS round \gset
` + pgbenchSQL(deleteOutboxSQL, ":seqs") + `;
\endif
COMMIT;
`
}

// applyScript is one batch of the other region's events, as
// consumer.apply runs it: events updates of consecutive listings (wrapping
// at listings), each with a request id of its own, across the topic's
// partitions, with a watermark for one of them. The first query makes the
// batch; the transaction is the apply's.
func applyScript() string {
	return `\set n :n + 1
\set first :n * :events
\set partition :n % :partitions
SELECT array_agg(1 + (:first::bigint + g) % :listings::bigint) AS ids,
       array_agg(100000.00 + g) AS prices,
       array_agg(2) AS bedrooms,
       array_agg(1) AS bathrooms,
       array_agg(:peer::text) AS regions,
       array_agg(:n::bigint + 1) AS versions,
       array_agg(now()) AS times,
       array_agg(false) AS deleted,
       array_agg('apply-' || :n::text || '-' || g) AS requests,
       array_agg(repeat('f', 64)) AS fingerprints,
       array_agg(:n::text || '-' || :peer::text) AS parents,
       (SELECT array_agg(p) FROM generate_series(0, :partitions::int - 1) AS p) AS parts,
       (SELECT array_agg(:first::bigint) FROM generate_series(1, :partitions::int)) AS offsets,
       now() AS stamp
FROM generate_series(0, :events - 1) AS g \gset
BEGIN;
` + pgbenchSQL(checkPositionsSQL, ":topic", ":parts") + `;
` + pgbenchSQL(lockForApplySQL, ":ids") + `;
` + pgbenchSQL(replayedRequestsSQL, ":requests") + `;
` + pgbenchSQL(upsertPropertiesSQL, ":ids", ":prices", ":bedrooms", ":bathrooms", ":regions", ":versions", ":times", ":deleted", ":requests", ":parents") + `;
` + pgbenchSQL(recordReplicatedRequestsSQL, ":requests", ":fingerprints", ":ids", ":prices", ":bedrooms", ":bathrooms", ":regions", ":versions", ":times", ":deleted", ":parents") + `;
` + pgbenchSQL(saveWatermarkSQL, ":peer", ":partition", ":partitions", ":stamp", ":skew", ":stamp", ":stamp", ":stamp") + `;
` + pgbenchSQL(savePositionsSQL, ":topic", ":parts", ":offsets", ":offsets") + `;
COMMIT;
`
}

var placeholder = regexp.MustCompile(`\$(\d+)`)

// pgbenchSQL returns query with each placeholder $n replaced by args[n-1]:
// a pgbench variable (:name), which pgbench sends as a parameter, or SQL
// text (NULL). It panics unless args names every placeholder and no more,
// so that a statement that gains a parameter stops the benchmark rather
// than running something else.
func pgbenchSQL(query string, args ...string) string {
	highest := 0
	out := placeholder.ReplaceAllStringFunc(query, func(m string) string {
		n, _ := strconv.Atoi(m[1:])
		highest = max(highest, n)
		if n > len(args) {
			panic(fmt.Sprintf("pgbenchSQL: $%d without an argument in %q", n, query))
		}
		return args[n-1]
	})
	if highest != len(args) {
		panic(fmt.Sprintf("pgbenchSQL: %d arguments for %d placeholders in %q", len(args), highest, query))
	}
	return strings.TrimSpace(out)
}

// pgbenchPath finds pgbench: on the PATH, or else in the newest of
// Debian's PostgreSQL installations.
func pgbenchPath(b *testing.B) string {
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	if len(found) == 0 {
		b.Fatal("no pgbench: install PostgreSQL's client programs (Debian: postgresql-client), or put pgbench on the PATH")
	}
	major := func(path string) int { // /usr/lib/postgresql/15/bin/pgbench: 15
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
		return n
	}
	return slices.MaxFunc(found, func(x, y string) int { return major(x) - major(y) })
}

// sqlBenchDB makes a scratch database, with the schema and the seeds, on
// the server of the stack's database of region, and returns its URL. It is
// dropped when the benchmark ends.
func sqlBenchDB(b *testing.B, region string) string {
	b.Helper()
	name := "sqlbench_" + region
	stackURL := stackURL(b, region)
	admin, err := replaceDBName(stackURL, "postgres")
	if err != nil {
		b.Fatal(err)
	}
	if db, err := openDB(admin, 1, sessionLimits{}); err == nil {
		db.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)") // a run that was killed
		db.Close()
	}
	url, drop, err := createScratchDB(admin, name)
	if err != nil {
		b.Fatalf("scratch database %s: %v", name, err)
	}
	b.Cleanup(drop)
	// As many request records as the stack's database holds, so that each
	// write's two index inserts work on indexes of the same size; at least
	// sqlBenchMinRecords.
	ctx := context.Background()
	stackDB, err := openDB(stackURL, 1, sessionLimits{})
	if err != nil {
		b.Fatal(err)
	}
	defer stackDB.Close()
	var records int64
	if err := stackDB.QueryRowContext(ctx, "SELECT count(*) FROM processed_requests").Scan(&records); err != nil {
		b.Fatal(err)
	}
	db, err := openDB(url, 1, sessionLimits{})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, fillRequestsSQL, max(records, sqlBenchMinRecords)); err != nil {
		b.Fatalf("fill %s: %v", name, err)
	}
	// Then what autovacuum would do, and a checkpoint, so that the fill's
	// pages are not written out during the measurement.
	for _, stmt := range []string{"VACUUM ANALYZE", "CHECKPOINT"} {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			b.Fatalf("%s in %s: %v", stmt, name, err)
		}
	}
	return url
}

// sqlBenchMinRecords is the fewest request records a scratch database
// starts with. Analyzed nearly empty, the table gets plans that read it
// whole (EU's look-up of a batch's request ids), which the run outgrows
// long before autovacuum looks again: on a fresh stack the EU part took
// six times as long per batch.
const sqlBenchMinRecords = 100_000

// fillRequestsSQL adds $1 request records like the PUT benchmark's, of
// past runs (an hour old: none expires during the run).
const fillRequestsSQL = `
INSERT INTO processed_requests (request_id, fingerprint, property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, processed_at)
SELECT 'bench-' || (1700000000000000000 + g / 10000 * 7919) || '-' || g % 32 || '-' || g % 10000, md5(g::text) || md5(g::text),
       1 + g % 1000, 100000, 2, 1, 'us', 2 + g / 1000, now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(1, $1::bigint) AS g`

func writeScript(b *testing.B, path, script string) {
	b.Helper()
	if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
		b.Fatal(err)
	}
}

// runPgbench runs pgbench on database url, prepared statements as the
// service's driver caches them, and returns what it printed. Any failed
// or aborted transaction fails the benchmark.
func runPgbench(b *testing.B, pgbench, url string, args ...string) string {
	b.Helper()
	cmd := exec.Command(pgbench, append(append([]string{"-n", "-M", "prepared"}, args...), url)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		b.Fatalf("%s: %v\n%s", cmd, err, out.String())
	}
	if m := regexp.MustCompile(`number of failed transactions: (\d+)`).FindStringSubmatch(out.String()); m != nil && m[1] != "0" {
		b.Fatalf("pgbench: failed transactions:\n%s", out.String())
	}
	return out.String()
}

// pgbenchTime is how long pgbench's transactions took: their count over
// its rate (which leaves out the connections' setup).
func pgbenchTime(b *testing.B, out string) time.Duration {
	b.Helper()
	n := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindStringSubmatch(out)
	tps := regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`).FindStringSubmatch(out)
	if n == nil || tps == nil {
		b.Fatalf("pgbench printed no rate:\n%s", out)
	}
	count, _ := strconv.Atoi(n[1])
	rate, _ := strconv.ParseFloat(tps[1], 64)
	return time.Duration(float64(count) / rate * float64(time.Second))
}

// pgbenchScriptCount is how many transactions the script-th script ran.
func pgbenchScriptCount(b *testing.B, out string, script int) int {
	b.Helper()
	m := regexp.MustCompile(fmt.Sprintf(`SQL script %d: .*\n - weight: .*\n - (\d+) transactions`, script)).FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("pgbench printed no count for script %d:\n%s", script, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// checkSQLBench checks that the scripts did the work they were timed for:
// in US, every write moved its listing's version on and left a request
// record, the relay's rounds kept the outbox short while the writes ran
// (backlog, what they left, at most a tenth of the writes) and the drain
// after them emptied it; in EU, every event left a request record. A write
// whose version check failed would have updated nothing, silently, and been
// counted; a relay that never took its lock would have left every event to
// the drain.
func checkSQLBench(b *testing.B, us, eu string, writes, backlog int) {
	b.Helper()
	// pgbench counts a transaction that -T's end interrupted after its
	// commit, if at all, as not done: up to one per client more.
	if got := sqlCount(b, us, "SELECT sum(version - 1) FROM properties"); got < writes || got > writes+benchClients {
		b.Errorf("US: the versions moved on %d times for %d writes", got, writes)
	}
	if got := sqlCount(b, us, "SELECT count(*) FROM processed_requests WHERE request_id NOT LIKE 'bench-%'"); got < writes || got > writes+benchClients {
		b.Errorf("US: %d request records for %d writes", got, writes)
	}
	if backlog > writes/10 {
		b.Errorf("US: the relay's rounds left %d events of %d writes in the outbox", backlog, writes)
	}
	if left := sqlCount(b, us, "SELECT count(*) FROM outbox"); left > 0 {
		b.Errorf("US: %d events in the outbox after the drain", left)
	}
	if got, want := sqlCount(b, eu, "SELECT count(*) FROM processed_requests WHERE request_id LIKE 'apply-%'"), (writes+sqlBenchRound-1)/sqlBenchRound*sqlBenchRound; got != want {
		b.Errorf("EU: %d request records for %d events applied", got, want)
	}
}

// sqlCount runs query, which counts, in the database at url.
func sqlCount(b *testing.B, url, query string) int {
	b.Helper()
	db, err := openDB(url, 1, sessionLimits{})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRowContext(context.Background(), query).Scan(&n); err != nil {
		b.Fatalf("%s: %v", query, err)
	}
	return n
}
