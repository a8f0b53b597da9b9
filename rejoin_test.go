//go:build integration

package main

// Rejoining (rejoin.go): a region whose database went back in time finds
// out and rebuilds its copy from the other region by itself. Each test
// takes EU's database back in a way an operator would (a restore from a
// backup, a new empty database, a rebuild asked for), then checks that EU
// rejoined: both regions identical, listing by listing and request record
// by request record, and a POST in EU answered 201 with an id nobody held.
//
// The backup is logical, as pg_dump's would be, and taken and restored in
// SQL as the superuser, so that the tests run against either stack: each
// table copied into a schema of its own, with the sequences' values, and
// copied back in one transaction.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgconn"
)

// The tables and sequences a region's database holds (init.sql).
var (
	regionTables    = []string{"properties", "processed_requests", "outbox", "outbox_published", "replication_watermarks", "replication_positions", "conflicts", "rejoin"}
	regionSequences = []string{"outbox_seq_seq", "property_ids_us", "property_ids_eu", "conflicts_seq_seq"}
)

// backupDB copies db's tables and sequences into the schema backup_test,
// and drops it when the test ends.
func backupDB(t *testing.T, db *sql.DB) {
	t.Helper()
	stmts := []string{`DROP SCHEMA IF EXISTS backup_test CASCADE`, `CREATE SCHEMA backup_test`,
		`CREATE TABLE backup_test.sequences (name TEXT, last_value BIGINT, is_called BOOLEAN)`}
	for _, table := range regionTables {
		stmts = append(stmts, fmt.Sprintf(`CREATE TABLE backup_test.%s AS TABLE public.%[1]s`, table))
	}
	for _, seq := range regionSequences {
		stmts = append(stmts, fmt.Sprintf(`INSERT INTO backup_test.sequences SELECT '%s', last_value, is_called FROM %[1]s`, seq))
	}
	execAll(t, db, stmts)
	t.Cleanup(func() { db.Exec(`DROP SCHEMA IF EXISTS backup_test CASCADE`) })
}

// restoreDB puts db's tables and sequences back as backupDB copied them, in
// one transaction. A sequence resumes 32 values past the last it had handed
// out, as PostgreSQL's does after a restore: it logs a sequence that far
// ahead, and recovery takes the logged value.
func restoreDB(t *testing.T, db *sql.DB) {
	t.Helper()
	stmts := []string{`TRUNCATE ` + strings.Join(regionTables, ", ")}
	for _, table := range regionTables {
		stmts = append(stmts, fmt.Sprintf(`INSERT INTO public.%s SELECT * FROM backup_test.%[1]s`, table))
	}
	for _, seq := range regionSequences {
		stmts = append(stmts, fmt.Sprintf(`SELECT setval('%s', last_value + CASE WHEN is_called THEN 32 ELSE 0 END, is_called)
FROM backup_test.sequences WHERE name = '%[1]s'`, seq))
	}
	execAll(t, db, stmts)
}

// emptyDB makes db what a new database is: the schema and the seeds only.
func emptyDB(t *testing.T, db *sql.DB) {
	t.Helper()
	stmts := []string{`TRUNCATE ` + strings.Join(regionTables, ", ")}
	for _, seq := range regionSequences {
		stmts = append(stmts, `ALTER SEQUENCE `+seq+` RESTART`)
	}
	for _, seed := range []string{"us_seed.sql", "eu_seed.sql"} {
		b, err := os.ReadFile(seed)
		if err != nil {
			t.Fatal(err)
		}
		stmts = append(stmts, string(b))
	}
	execAll(t, db, stmts)
}

// execAll runs stmts in one transaction. Its TRUNCATE takes each table's
// lock in turn under a running backend, whose relay and consumer take some
// of the same locks in another order, and PostgreSQL may then end the
// transaction as a deadlock's victim: it is run again, as a whole.
func execAll(t *testing.T, db *sql.DB, stmts []string) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		err := execAllOnce(db, stmts)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "40P01" && attempt < 5 {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		return
	}
}

func execAllOnce(db *sql.DB, stmts []string) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, stmt := range stmts {
		if _, err := tx.Exec(stmt); err != nil {
			return fmt.Errorf("%.80s: %w", stmt, err)
		}
	}
	return tx.Commit()
}

// heldRequest is a request record as both regions must hold it.
type heldRequest struct {
	RequestID, Fingerprint string
	Write                  Property
	Parent                 string
}

// requestRecords reads db's request records whose ids begin with prefix,
// by request id.
func requestRecords(t *testing.T, db *sql.DB, prefix string) []heldRequest {
	t.Helper()
	rows, err := db.Query(`
SELECT property_id, price, bedrooms, bathrooms, region_origin, version, updated_at, deleted, request_id, fingerprint, coalesce(parent, '')
FROM processed_requests WHERE starts_with(request_id, $1) ORDER BY request_id`, prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var records []heldRequest
	for rows.Next() {
		var r heldRequest
		if r.Write, err = scanProperty(rows, &r.RequestID, &r.Fingerprint, &r.Parent); err != nil {
			t.Fatal(err)
		}
		r.Write.UpdatedAt = r.Write.UpdatedAt.UTC()
		records = append(records, r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return records
}

// waitRejoined waits until the regions are identical, listings and the
// request records whose ids begin with prefix, and then creates a listing
// in region, which must get an id of its own that neither database held
// before. (Other tests leave records in one region alone on purpose:
// TestTombstoneOutlivesOldEvents sends events in US's name that US never
// wrote. A region restored from a backup keeps its own; one rebuilt from
// nothing has exactly the other's, all of them.)
func waitRejoined(t *testing.T, s *stack, us, eu *sql.DB, region, prefix string) (created int64) {
	t.Helper()
	waitIdentical(t, us, eu, 60*time.Second)
	var diff string
	defer func() {
		if diff != "" {
			t.Logf("the last difference of the request records (-us +eu):\n%s", diff)
		}
	}()
	waitFor(t, 30*time.Second, "identical request records in both regions", func() bool {
		diff = cmp.Diff(requestRecords(t, us, prefix), requestRecords(t, eu, prefix))
		return diff == ""
	})
	waitFor(t, 30*time.Second, region+" serving again", func() bool {
		status, servedBy, _, err := s.do("GET", "/"+region+"/health", "", "")
		return err == nil && status == http.StatusOK && servedBy == region
	})
	held := map[int64]bool{}
	parity := map[string]int64{"us": 1, "eu": 0}[region]
	var highest int64 // the greatest id of the region's that either holds
	for _, db := range []*sql.DB{us, eu} {
		for _, p := range allProperties(t, db) {
			held[p.ID] = true
			if p.ID%2 == parity {
				highest = max(highest, p.ID)
			}
		}
	}
	status, servedBy, got := s.mustDo(t, "POST", "/"+region+"/properties", newRequestID("after-rejoin"), `{"price": 123.45}`)
	if status != http.StatusCreated || servedBy != region {
		t.Fatalf("POST /%s/properties after the rejoin = %d from %s %+v, want 201 from %s", region, status, servedBy, got, region)
	}
	if held[got.ID] || got.ID%2 != parity {
		t.Errorf("POST /%s/properties after the rejoin created id %d: held already %v, or not %s's", region, got.ID, held[got.ID], region)
	}
	// Past the ids its lost database may have handed out too: those
	// nobody holds (rejoin.go, lostIDsAtMost).
	if got.ID <= highest+2*lostIDsAtMost {
		t.Errorf("POST /%s/properties after the rejoin created id %d, within %d ids of the greatest held (%d): a create lost with the database may have had it",
			region, got.ID, lostIDsAtMost, highest)
	}
	s.caughtUp(t, 30*time.Second) // before a cleanup deletes it in both
	return got.ID
}

// writeSome makes n updates of listings from first on and creates creates
// listings, through region's prefix, and returns the ids created.
func writeSome(t *testing.T, s *stack, region string, first int64, n, creates int) []int64 {
	t.Helper()
	for i := range n {
		id := first + int64(i)
		if status, got := s.put(t, region, id, newRequestID("rejoin-"+region), Money(1000_00+i)); status != http.StatusOK {
			t.Fatalf("PUT /%s/properties/%d = %d %+v", region, id, status, got)
		}
	}
	var ids []int64
	for range creates {
		status, _, got := s.mustDo(t, "POST", "/"+region+"/properties", newRequestID("rejoin-create-"+region), `{"price": 77, "bedrooms": 2}`)
		if status != http.StatusCreated {
			t.Fatalf("POST /%s/properties = %d %+v", region, status, got)
		}
		ids = append(ids, got.ID)
	}
	return ids
}

// TestRejoinAfterRestoreFromBackup restores EU's database from a backup
// taken before 25 writes and 3 creates in each region, as an operator
// would: EU's backend stopped, the backup restored, the backend started.
// EU's own writes after the backup are then only in US and in the topic,
// its position and its id sequence are behind. Without rejoining, EU never
// gets its own writes back, and its next POST takes an id US holds.
func TestRejoinAfterRestoreFromBackup(t *testing.T) {
	restoreAndRejoin(t, func(s *stack) []int64 {
		writeSome(t, s, "us", 301, 25, 3)
		return writeSome(t, s, "eu", 331, 25, 3)
	})
}

// TestRejoinAfterRestoreLosingFewWrites restores EU from a backup older
// than a handful of its published writes, fewer than the 32 values its
// outbox sequence resumes past them: the sequence cannot tell them lost,
// what the database holds of them can (outbox_published in init.sql).
func TestRejoinAfterRestoreLosingFewWrites(t *testing.T) {
	restoreAndRejoin(t, func(s *stack) []int64 {
		return writeSome(t, s, "eu", 395, 3, 1)
	})
}

// restoreAndRejoin backs EU's database up, makes the writes of write (which
// returns the listings EU created), stops EU's backend, restores the
// backup, starts the backend, and waits for EU to have rejoined.
func restoreAndRejoin(t *testing.T, write func(*stack) []int64) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	backupDB(t, eu)

	created := write(s)
	s.caughtUp(t, 30*time.Second)

	s.stop(t, "backend-eu", false)
	restoreDB(t, eu)
	if _, err := getProperty(context.Background(), eu, created[0]); err == nil {
		t.Fatalf("listing %d, created after the backup, is in EU's restored database: the restore did not take it back", created[0])
	}
	s.start(t, "backend-eu")
	waitRejoined(t, s, us, eu, "eu", "rejoin-")
	if !strings.Contains(s.control(t, "logs", "backend-eu"), "rejoin: done; serving again") {
		t.Error("eu's log does not say it rejoined")
	}
}

// TestRejoinSkipsLostCreatesIDs loses a create with EU's database: EU
// answers it 201 while Kafka is stopped, so that it never leaves EU's
// outbox, and then EU's database is restored from a backup older than it.
// (Stopped, not frozen: a frozen broker's socket would keep the relay's
// produce request and append it when thawed.)
// Nothing but its client knows its id now. Before the restore, EU created
// more listings than the 16 ids its sequence resumes past the backup's
// (restoreDB), and published them: the peer holds them, and the lost id
// comes right after. A rejoin that moved the sequence only past the ids
// held would hand the lost id out again, to a listing its client would
// take for the one it created.
func TestRejoinSkipsLostCreatesIDs(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	s.caughtUp(t, 30*time.Second)
	backupDB(t, eu)
	writeSome(t, s, "eu", 331, 3, 20)
	s.caughtUp(t, 30*time.Second)

	s.stop(t, "kafka", false)
	status, servedBy, lost := s.mustDo(t, "POST", "/eu/properties", newRequestID("lost-create"), `{"price": 55.5}`)
	if status != http.StatusCreated || servedBy != "eu" {
		t.Fatalf("POST /eu/properties with Kafka stopped = %d from %s %+v, want 201 from eu", status, servedBy, lost)
	}
	s.stop(t, "backend-eu", false)
	restoreDB(t, eu)
	s.control(t, "start", "kafka")
	if _, err := getProperty(context.Background(), eu, lost.ID); err == nil {
		t.Fatalf("listing %d, created after the backup, is in EU's restored database: the restore did not take it back", lost.ID)
	}
	s.start(t, "backend-eu")
	if _, err := getProperty(context.Background(), us, lost.ID); err == nil {
		t.Fatalf("listing %d reached US: its create was not lost, and the test proves nothing", lost.ID)
	}
	if created := waitRejoined(t, s, us, eu, "eu", "rejoin-"); created == lost.ID {
		t.Errorf("EU handed out id %d again after the rejoin: its create, lost with the database, was answered 201", lost.ID)
	}
}

// TestRejoinFromNothing replaces EU's database by a new one, holding the
// schema and the seeds only, under its running backend.
func TestRejoinFromNothing(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	writeSome(t, s, "eu", 361, 5, 2)
	writeSome(t, s, "us", 366, 5, 2)
	s.caughtUp(t, 30*time.Second)

	emptyDB(t, eu)
	waitRejoined(t, s, us, eu, "eu", "")
}

// TestRejoinUnderLoad rebuilds EU from nothing, asked for with the
// service's own command, while clients keep writing and reading through
// both prefixes. No request fails: US serves its own, and EU's while EU
// rebuilds (NGINX sends them over on EU's 503). PUTs and GETs only: NGINX
// does not send a POST to the other region after a 503 (docs/decisions.md).
func TestRejoinUnderLoad(t *testing.T) {
	s := newStack(t)
	us, eu := stackDB(t, "us"), stackDB(t, "eu")
	// Enough listings for the rebuild to take a while.
	bulk := addListings(t, 50_000, us, eu)
	s.caughtUp(t, 30*time.Second)

	var sent, failed atomic.Int64
	var failures sync.Map
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w, region := range []string{"us", "us", "eu"} {
		wg.Go(func() {
			id := int64(401 + w)
			path := fmt.Sprintf("/%s/properties/%d", region, id)
			var version int64
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				method, reqID, body := "GET", "", ""
				if i%2 == 1 {
					method, reqID = "PUT", newRequestID("load")
					body = fmt.Sprintf(`{"price": %d, "version": %d}`, 500+i, version)
				}
				status, _, got, err := s.do(method, path, reqID, body)
				sent.Add(1)
				version = got.Version
				// A 409 names a version this client read from a copy that
				// had not caught up with its own last write (a read
				// through the other region): the client's to retry, and
				// no failure of the service.
				if err != nil || status != http.StatusOK && status != http.StatusConflict {
					failed.Add(1)
					failures.Store(fmt.Sprintf("%s %s", method, path), fmt.Sprintf("%d %v %+v", status, err, got))
				}
			}
		})
	}
	time.Sleep(time.Second)
	start := time.Now()
	out := s.rejoin(t, "eu", "--from-nothing")
	took := time.Since(start)
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	t.Logf("rebuilt EU (%d listings) in %v under %d requests; the command said:\n%s", 1000+bulk, took.Round(time.Millisecond), sent.Load(), out)
	if n := failed.Load(); n > 0 {
		failures.Range(func(k, v any) bool { t.Errorf("%s: %s", k, v); return true })
		t.Fatalf("%d of %d requests failed while EU rebuilt", n, sent.Load())
	}
	waitRejoined(t, s, us, eu, "eu", "")
}

// rejoin runs the service's rejoin command for region and returns what
// it printed.
func (s *stack) rejoin(t *testing.T, region string, args ...string) string {
	t.Helper()
	out, err := rejoinCmd(s, region, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("rejoin %s %v: %v\n%s", region, args, err, out)
	}
	return string(out)
}

// rejoinCmd is the service's rejoin command for region: ./stack.sh
// rejoin, or the binary in the region's container.
func rejoinCmd(s *stack, region string, args ...string) *exec.Cmd {
	if strings.HasSuffix(s.cmd[0], "stack.sh") {
		return exec.Command(s.cmd[0], append(append(s.cmd[1:], "rejoin", region), args...)...)
	}
	return exec.Command(s.cmd[0], append(append(s.cmd[1:], "exec", "-T", "backend-"+region, "property-listing", "rejoin"), args...)...)
}

// addListings adds n listings, with ids from 10,000,001 on, to every one
// of dbs alike, as the seeds would, and deletes them, and any listing
// created above them, when the test ends. A rebuild moves a region's id sequence past the highest id it copied:
// the cleanup puts the sequences back too, or every later POST would get
// an id among the ones the benchmarks generate. It returns n.
func addListings(t *testing.T, n int, dbs ...*sql.DB) int {
	t.Helper()
	const first = 10_000_001
	for _, db := range dbs {
		for _, seq := range []string{"property_ids_us", "property_ids_eu"} {
			var last int64
			var called bool
			if err := db.QueryRow(`SELECT last_value, is_called FROM `+seq).Scan(&last, &called); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Exec(`SELECT setval($1, $2, $3)`, seq, last, called) })
		}
		if _, err := db.Exec(`
INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at)
SELECT i, 100 + i % 1000, i % 5, i % 3, 'us', 1, '2026-01-01T00:00:00Z'
FROM generate_series($1::bigint, $1::bigint + $2 - 1) AS i
ON CONFLICT (id) DO NOTHING`, first, n); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, db := range dbs {
			// And the listings a test created after them.
			db.Exec(`DELETE FROM properties WHERE id >= $1`, first)
		}
	})
	return n
}
