//go:build integration

package main

// Exposure: what the service can reach and do beyond its job. The backends
// connect to PostgreSQL as a role of their own, which may read and write the
// service's tables and nothing more (service_role.sql). And only NGINX's
// client ports listen beyond loopback.

import (
	"bufio"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestServiceRoleCanOnlyReadAndWrite(t *testing.T) {
	newStack(t)
	for _, region := range []string{"us", "eu"} {
		t.Run(region, func(t *testing.T) {
			admin, service := stackDB(t, region), serviceDB(t, region)
			user := setting("SERVICE_DB_USER", "")
			var connected int
			if err := admin.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()`, user).Scan(&connected); err != nil {
				t.Fatal(err)
			}
			if connected == 0 {
				t.Errorf("no session of %s in %s's database: the backend does not connect as its own role", user, region)
			}
			var super bool
			if err := service.QueryRow(`SELECT rolsuper FROM pg_roles WHERE rolname = current_user`).Scan(&super); err != nil || super {
				t.Errorf("%s is a superuser (%v, %v)", user, super, err)
			}
			// What it needs, inside a transaction rolled back at once.
			tx, err := service.Begin()
			if err != nil {
				t.Fatal(err)
			}
			for _, stmt := range []string{
				`SELECT count(*) FROM properties`,
				`UPDATE properties SET price = price WHERE id = 1`,
				`DELETE FROM outbox WHERE seq < 0`,
				`SELECT count(*) FROM processed_requests`,
				`SELECT count(*) FROM replication_watermarks`,
			} {
				if _, err := tx.Exec(stmt); err != nil {
					t.Errorf("%s may not %q: %v", user, stmt, err)
				}
			}
			tx.Rollback()
			// And nothing more.
			for _, stmt := range []string{
				`CREATE TABLE intruder (id int)`,
				`DROP TABLE outbox`,
				`ALTER TABLE properties ADD COLUMN intruder int`,
				`TRUNCATE properties`,
				`CREATE ROLE intruder SUPERUSER`,
				`CREATE DATABASE intruder`,
			} {
				_, err := service.Exec(stmt)
				var pgErr *pgconn.PgError
				if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
					t.Errorf("%s may %q (%v), want insufficient privilege (42501)", user, stmt, err)
				}
			}
		})
	}
}

// TestStackListensOnLoopbackOnly lists every listening TCP socket of the
// local stack's processes (those whose command line names its state
// directory, .stack) and fails on any bound beyond loopback but NGINX's
// client ports: a backend, database, broker or Prometheus reachable from
// another host would be reachable without NGINX's limits. (The compose
// stack publishes its ports on 127.0.0.1 in docker-compose.yml.)
func TestStackListensOnLoopbackOnly(t *testing.T) {
	newStack(t)
	// STACK_STATE is in .stack/stack.env, which ./stack.sh up writes.
	state := setting("STACK_STATE", "")
	if state == "" {
		t.Skip("not the local stack (no STACK_STATE): the compose stack's published ports are checked in .ci/check_compose.py")
	}
	owners := stackSockets(t, state)
	nginxPorts := map[int]bool{8080: true, 8443: true}
	seen := map[int]bool{}
	for _, l := range listeningSockets(t) {
		owner, ok := owners[l.inode]
		if !ok {
			continue
		}
		seen[l.port] = true
		if !l.ip.IsLoopback() && !nginxPorts[l.port] {
			t.Errorf("%s listens on %s, beyond loopback", owner, net.JoinHostPort(l.ip.String(), strconv.Itoa(l.port)))
		}
	}
	// Not a vacuous pass: the two databases, a broker, a backend and NGINX
	// were among the sockets looked at.
	for _, port := range []int{5433, 5434, 9092, 8002, 8080} {
		if !seen[port] {
			t.Errorf("no stack process listens on port %d: the test did not find the stack's sockets", port)
		}
	}
}

// stackSockets maps the inode of every socket a process of the local stack
// holds to the process's command line.
func stackSockets(t *testing.T, state string) map[string]string {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*")
	owners := map[string]string{}
	for _, proc := range procs {
		cmdline, err := os.ReadFile(filepath.Join(proc, "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), state+"/") {
			continue // gone, or not the stack's
		}
		fds, _ := os.ReadDir(filepath.Join(proc, "fd"))
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(proc, "fd", fd.Name()))
			if inode, ok := strings.CutPrefix(link, "socket:["); err == nil && ok {
				owners[strings.TrimSuffix(inode, "]")] = strings.ReplaceAll(string(cmdline[:min(len(cmdline), 80)]), "\x00", " ")
			}
		}
	}
	return owners
}

// listener is one listening TCP socket of /proc/net/tcp or tcp6.
type listener struct {
	ip    net.IP
	port  int
	inode string
}

// listeningSockets reads the host's listening TCP sockets from
// /proc/net/tcp and /proc/net/tcp6, whose addresses are hexadecimal, each
// 32-bit word in the host's (little-endian) byte order.
func listeningSockets(t *testing.T) []listener {
	t.Helper()
	var out []listener
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // the header
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" { // 0A: LISTEN
				continue
			}
			hexIP, hexPort, _ := strings.Cut(fields[1], ":")
			raw, err1 := hex.DecodeString(hexIP)
			port, err2 := strconv.ParseUint(hexPort, 16, 16)
			if err1 != nil || err2 != nil || len(raw)%4 != 0 {
				t.Fatalf("%s: cannot read %q", file, fields[1])
			}
			for i := 0; i < len(raw); i += 4 {
				raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
			}
			out = append(out, listener{ip: net.IP(raw), port: int(port), inode: fields[9]})
		}
		f.Close()
	}
	return out
}
