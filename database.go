package main

// The database connections: a region's two pools, one for requests and one
// for replication, and the limits PostgreSQL holds each statement to. The
// SQL itself lives with the concept it serves (property.go, idempotency.go,
// relay.go, consume.go, conflict.go, lag.go).

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// replicationConns is the size of the replication's own pool: the relay's
// round, the consumer's batch and the purge's round (retention.go) hold one
// connection each, and the lag report reads with a fourth.
const replicationConns = 4

// sessionLimits bound, on every connection of a pool, how long a statement
// may wait for a row lock (lock_timeout) and how long it may run in all
// (statement_timeout). Zero is no bound.
type sessionLimits struct {
	lock, statement time.Duration
}

// The limits of the two pools. A request's are below its own deadline
// (dbTimeout, 3s): a PUT stuck behind a row lock must fail in the database,
// having changed nothing, before its context runs out. Past the deadline the
// client has its 503 and NGINX replays the PUT in the other region; a
// statement that went on waiting could then still commit here, and the one
// request would be written twice. Replication's are below its attempts'
// deadlines (relayRoundTimeout, applyAttemptTimeout) for the same reason.
var (
	requestLimits     = sessionLimits{lock: time.Second, statement: 2 * time.Second}
	replicationLimits = sessionLimits{lock: 2 * time.Second, statement: 4 * time.Second}
)

// openPools opens a region's two connection pools on dsn, a PostgreSQL URL:
// one for requests, of requestConns connections, and a small one for
// replication (replicationConns). Apart, neither can starve the other:
// requests queued on a locked row cannot hold back the other region's
// writes, and a relay waiting on a slow Kafka with its transaction open
// cannot take a connection from a request.
//
// admit, if not nil, vets every new connection of the request pool before
// a request uses it (rejoin.go).
func openPools(dsn string, requestConns int, admit func(context.Context, *pgx.Conn) error) (requests, replication *sql.DB, err error) {
	var opts []stdlib.OptionOpenDB
	if admit != nil {
		opts = append(opts, stdlib.OptionAfterConnect(admit))
	}
	if requests, err = openDB(dsn, requestConns, requestLimits, opts...); err != nil {
		return nil, nil, err
	}
	if replication, err = openDB(dsn, replicationConns, replicationLimits); err != nil {
		requests.Close()
		return nil, nil, err
	}
	return requests, replication, nil
}

// openDB opens a pool of at most maxConns connections with the given limits.
// It does not wait for the database: the service starts and answers 503
// until the database is reachable.
func openDB(dsn string, maxConns int, limits sessionLimits, opts ...stdlib.OptionOpenDB) (*sql.DB, error) {
	pgcfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("DATABASE_URL is not a valid PostgreSQL connection string")
	}
	if pgcfg.ConnectTimeout == 0 {
		// A database host that is down should cost a request a moment, not
		// the operating system's TCP connect timeout of minutes.
		pgcfg.ConnectTimeout = 2 * time.Second
	}
	for name, d := range map[string]time.Duration{"lock_timeout": limits.lock, "statement_timeout": limits.statement} {
		if d > 0 {
			pgcfg.RuntimeParams[name] = strconv.FormatInt(d.Milliseconds(), 10)
		}
	}
	db := stdlib.OpenDB(*pgcfg, opts...)
	// A bounded pool: enough connections to keep two cores busy while some wait
	// on commits, few enough that the region's database (PostgreSQL's
	// default max_connections is 100) holds the request and replication
	// pools of both of the region's instances in the HA topology, 2 × (16 +
	// 4), with room to spare for an operator and the tests.
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	db.SetConnMaxLifetime(30 * time.Minute)
	return db, nil
}
