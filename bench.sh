#!/usr/bin/env bash
# bench.sh measures the stack: pgbench on db-us's cluster next to the
# service's benchmarks through NGINX (bench_test.go), with the same client
# count, and prints a table of figure, value, ratio and target. The table also
# replaces its section of docs/benchmarks.md, so that the document shows what
# was measured, never typed by hand. `./stack.sh bench` runs it.
#
#   BENCH_ROUNDS   rounds of the paired comparisons (default 5)
#   BENCH_SECONDS  how long each pgbench run lasts (default 8)
#
# The machine is shared and noisy: a figure taken once can be off by a third.
# So each comparison runs in rounds, pgbench and then the service right after
# it, and the table shows medians of the rounds and each round's ratio.
set -euo pipefail

# The stack's own functions and settings (sourcing stack.sh runs nothing).
# shellcheck source=stack.sh
. "$(cd "$(dirname "$0")" && pwd)/stack.sh"

clients=32
# The topology's own results and section of docs/benchmarks.md: "bench" for the single
# one, "bench-ha" for three brokers and two instances per region.
section=bench
[ "$(topology)" = single ] || section=bench-$(topology)
out="$state/$section"
secs=${BENCH_SECONDS:-8}
rounds=${BENCH_ROUNDS:-5}
pg=(-h 127.0.0.1 -p "$(port_of db-us)" -U "$POSTGRES_USER")
# The list benchmark's filter, as listFilter in bench_test.go.
list_filter="min_bedrooms=2&max_price=750000&limit=50"
export PGPASSWORD="$POSTGRES_PASSWORD"

# ------------------------------------------------------------- measuring

init_pgbench() {
	if ! "$pgbin/psql" "${pg[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'pgbench'" | grep -q 1; then
		log "initialising pgbench (scale 10) on db-us"
		"$pgbin/psql" "${pg[@]}" -d postgres -qc "CREATE DATABASE pgbench"
		"$pgbin/pgbench" "${pg[@]}" -i -q -s 10 pgbench >"$out/pgbench-init.log" 2>&1
	fi
}

# checkpoint starts each measurement from a checkpointed database, so that
# one run's dirty pages and autovacuum do not land on the next.
checkpoint() {
	"$pgbin/psql" "${pg[@]}" -d postgres -qc "CHECKPOINT"
	sleep 2
}

# gotest PATTERN COUNT: the benchmarks matching PATTERN, COUNT requests each.
# The load generator shares the cores with the stack: it collects garbage as
# rarely as the service does (defaultGCPercent in main.go).
gotest() {
	BENCH_SECONDS=$secs GOGC=${GOGC:-400} go test -tags=integration -run '^$' -bench "$1" -benchtime="$2" -count=1 .
}

# gobench NAME COUNT: one benchmark, its lines appended to go-bench.log.
gobench() {
	checkpoint
	log "go test -bench $1 -benchtime=$2"
	gotest "^Benchmark$1\$" "$2" | tee -a "$out/go-bench.log" | grep '^Benchmark' >&2
}

# wrk_get ROUND: GETs of random listings, as BenchmarkGetProperty sends
# them, by wrk: a load generator in C on epoll, as lean as pgbench's client,
# where the Go benchmark's client costs the shared cores two to four times
# as much per request (docs/benchmarks.md, "The HTTP tier's ceiling"). The
# two lines side by side say how much of the gap to pgbench is the load
# generator's.
wrk_get() {
	checkpoint
	log "wrk GET, $clients connections, ${secs}s (round $1)"
	cat >"$out/get.lua" <<-'EOF'
		request = function()
		  return wrk.format("GET", "/us/properties/" .. math.random(1, 1000))
		end
	EOF
	wrk -t2 -c"$clients" -d"${secs}s" --latency -s "$out/get.lua" "http://127.0.0.1:$(port_of nginx)" >"$out/wrk.$1.log" 2>&1
}

# pgbench_run MODE ROUND
pgbench_run() {
	checkpoint
	log "pgbench $1, $clients clients, ${secs}s (round $2)"
	"$pgbin/pgbench" "${pg[@]}" -n "$1" -c "$clients" -j 2 -T "$secs" pgbench >"$out/pgbench$1.$2.log" 2>&1
}

measure() {
	: >"$out/go-bench.log"
	# A warm-up nobody measures: a fresh stack's first seconds of load go to
	# the broker's JIT compiler and to cold caches, which pgbench, touching
	# only PostgreSQL, does not pay.
	log "warm-up, not measured: 10000 GETs and 10000 PUTs"
	gotest '^Benchmark(GetProperty|PutProperty)$' 10000x >"$out/warm-up.log" 2>&1 ||
		die "the warm-up failed: see $out/warm-up.log"
	# Request counts are sized to run about as long as pgbench.
	local r
	for r in $(seq 1 "$rounds"); do
		pgbench_run -S "$r"
		gobench GetProperty 100000x
		gobench GetRejected 100000x
		wrk_get "$r"
		gobench ServiceSQL 1x
		pgbench_run -N "$r"
		gobench PutProperty 30000x
		gobench PutRejected 30000x
		gobench CreateProperty 15000x
	done
	gobench Mixed 60000x
	gobench GetPaced1000 30000x
	gobench ReplicationDelay 3000x
	gobench PutDuringPurge 20000x
	gobench RelayDrain 1x
	list_pages
}

# sql_in REGION SQL: run SQL in that region's database, as the superuser.
sql_in() {
	"$pgbin/psql" -h 127.0.0.1 -p "$(port_of "db-$1")" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -qv ON_ERROR_STOP=1 -c "$2"
}

# listings FROM TO: generate listings FROM to TO (counted from the
# benchmark's first id, listFirstID in bench_test.go) in both regions
# alike, straight into the databases, as a bulk import would; their values
# spread over the list's filters.
listings() {
	local region
	for region in us eu; do
		sql_in "$region" "
			INSERT INTO properties (id, price, bedrooms, bathrooms, region_origin, version, updated_at)
			SELECT 10000000 + g, (50000 + g::bigint * 7919 % 950000)::numeric, g % 6, 1 + g % 4,
			       CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 1, '2026-01-01T00:00:00Z'
			FROM generate_series($1, $2) g
			ON CONFLICT (id) DO NOTHING"
		# As a bulk import would be followed by: hint bits set and the
		# statistics fresh, so that autovacuum does not run during the
		# measurement.
		sql_in "$region" "VACUUM ANALYZE properties"
	done
}

# list_pages: the list benchmark at ten thousand and at one million
# generated listings, then the generated listings removed again (in both
# regions alike), so that the stack is as it was.
list_pages() {
	local started region
	listings 1 10000
	gobench ListPage 2000x
	gobench Rejoin 1x
	log "generating 990,000 more listings in each region"
	started=$(date +%s)
	listings 10001 1000000
	echo "$(($(date +%s) - started))" >"$out/generate-seconds"
	gobench ListPage 2000x
	gobench Rejoin 1x
	for region in us eu; do
		sql_in "$region" "DELETE FROM properties WHERE id > 10000000 AND id <= 11000000"
		sql_in "$region" "VACUUM ANALYZE properties"
	done
}

# ------------------------------------------------------------- reporting

# metric BENCH UNIT: the values a benchmark reported for a unit, one per run.
metric() {
	awk -v b="Benchmark$1-" -v u="$2" 'index($1, b) == 1 { for (i = 3; i < NF; i += 2) if ($(i+1) == u) print $i }' "$out/go-bench.log"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
m() { metric "$1" "$2" | median; }
iterations() { awk -v b="Benchmark$1-" 'index($1, b) == 1 { print $2 }' "$out/go-bench.log" | head -n 1; }
lat() { printf 'p50 %s ms, p99 %s ms, max %s ms' "$(m "$1" p50_ms)" "$(m "$1" p99_ms)" "$(m "$1" max_ms)"; }

# pgbench_tps MODE: each round's tps, in round order.
pgbench_tps() {
	local r
	for r in $(seq 1 "$rounds"); do
		sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out/pgbench$1.$r.log"
	done
}

# wrk_figure FIELD: each round's figure from wrk's output: "rps" the
# requests per second, "p50" and "p99" in ms, "errors" the answers other
# than 2xx and 3xx and the socket errors.
wrk_figure() {
	local r
	for r in $(seq 1 "$rounds"); do
		awk -v f="$1" '
			function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
			$1 == "Requests/sec:" { rps = $2 }
			$1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
			/Non-2xx or 3xx responses:/ { errors += $NF }
			/Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) errors += $i + 0 }
			END { print f == "rps" ? rps : f == "p50" ? p50 : f == "p99" ? p99 : errors + 0 }' "$out/wrk.$r.log"
	done
}

# ratios BENCH MODE: each round's service figure over its pgbench figure;
# MODE "sql" is the service's own SQL run by pgbench (BenchmarkServiceSQL).
ratios() {
	local limit
	if [ "$2" = sql ]; then limit=$(metric ServiceSQL writes/s); else limit=$(pgbench_tps "$2"); fi
	paste <(if [ "$1" = wrk ]; then wrk_figure rps; else metric "$1" req/s; fi) <(echo "$limit") | awk '{ printf "%.0f%%\n", 100 * $1 / $2 }'
}
ratio_list() { ratios "$1" "$2" | paste -sd, | sed 's/,/, /g'; }
median_ratio() { ratios "$1" "$2" | sed 's/%//' | median; }

# target VALUE OP LIMIT TEXT: the target column, judged from the medians.
target() {
	awk -v v="$1" -v op="$2" -v t="$3" -v text="$4" \
		'BEGIN { ok = op == ">=" ? v + 0 >= t + 0 : op == "<=" ? v + 0 <= t + 0 : v + 0 < t + 0; print text ": " (ok ? "met" : "**missed**") }'
}

table() {
	local errors get_ratio put_ratio create_ratio sql_ratio
	errors=$(awk '/^Benchmark/ { for (i = 3; i < NF; i += 2) if ($(i+1) == "errors") n += $i } END { print n + 0 }' "$out/go-bench.log")
	errors=$((errors + $(wrk_figure errors | awk '{ n += $1 } END { print n + 0 }')))
	get_ratio=$(median_ratio GetProperty -S)
	put_ratio=$(median_ratio PutProperty -N)
	create_ratio=$(median_ratio CreateProperty -N)
	sql_ratio=$(median_ratio PutProperty sql)
	echo "Medians of $rounds rounds; the ratio column gives the median ratio, then each round's."
	echo
	echo "| figure | value | ratio | target |"
	echo "|---|---|---|---|"
	printf '| pgbench select-only (`-S`), %s clients | %.0f tps | 100%% | - |\n' "$clients" "$(pgbench_tps -S | median)"
	printf '| GET through NGINX, %s clients | %.0f req/s; %s | **%s%%** of pgbench -S (%s) | %s |\n' "$clients" "$(m GetProperty req/s)" \
		"$(lat GetProperty)" "$get_ratio" "$(ratio_list GetProperty -S)" "$(target "$get_ratio" '>=' 25 '≥ 25%')"
	printf '| the HTTP tier alone: GETs the backend rejects before its database (`/us/properties/0`, 400), %s clients (BenchmarkGetRejected) | %.0f req/s; %s | **%s%%** of pgbench -S (%s) | a ceiling on GET |\n' "$clients" \
		"$(m GetRejected req/s)" "$(lat GetRejected)" "$(median_ratio GetRejected -S)" "$(ratio_list GetRejected -S)"
	printf '| GET through NGINX by wrk (C, as lean a client as pgbench'"'"'s), %s connections | %.0f req/s; p50 %s ms, p99 %s ms | **%s%%** of pgbench -S (%s) | - |\n' "$clients" \
		"$(wrk_figure rps | median)" "$(wrk_figure p50 | median)" "$(wrk_figure p99 | median)" "$(median_ratio wrk -S)" "$(ratio_list wrk -S)"
	printf '| pgbench simple-update (`-N`), %s clients | %.0f tps | 100%% | - |\n' "$clients" "$(pgbench_tps -N | median)"
	printf '| PUT through NGINX, %s clients | %.0f req/s; %s; %s conflicts | **%s%%** of pgbench -N (%s) | %s |\n' "$clients" "$(m PutProperty req/s)" \
		"$(lat PutProperty)" "$(m PutProperty conflicts)" "$put_ratio" "$(ratio_list PutProperty -N)" "$(target "$put_ratio" '>=' 50 '≥ 50%')"
	printf '| the service'"'"'s own SQL by pgbench: a PUT'"'"'s statement in US (%s clients) with a relay round per %.0f writes, then EU applying them in batches of as many (BenchmarkServiceSQL) | %.0f writes/s (US part %.1f s, EU part %.1f s) | 100%% | - |\n' \
		"$clients" "$(m ServiceSQL round_writes)" "$(m ServiceSQL writes/s)" "$(m ServiceSQL us_s)" "$(m ServiceSQL eu_s)"
	printf '| PUT through NGINX against the service'"'"'s own SQL | | **%s%%** of it (%s) | %s |\n' \
		"$sql_ratio" "$(ratio_list PutProperty sql)" "$(target "$sql_ratio" '>=' 67 '≥ 67% (within 1.5x)')"
	printf '| the HTTP tier alone: PUTs the backend decodes and rejects before its database (version 0, 400), %s clients (BenchmarkPutRejected) | %.0f req/s; %s | **%s%%** of pgbench -N (%s); **%s%%** of the service'"'"'s own SQL (%s) | a ceiling on PUT |\n' "$clients" \
		"$(m PutRejected req/s)" "$(lat PutRejected)" "$(median_ratio PutRejected -N)" "$(ratio_list PutRejected -N)" "$(median_ratio PutRejected sql)" "$(ratio_list PutRejected sql)"
	printf '| POST through NGINX, %s clients | %.0f req/s; %s | **%s%%** of pgbench -N (%s) | %s |\n' "$clients" "$(m CreateProperty req/s)" \
		"$(lat CreateProperty)" "$create_ratio" "$(ratio_list CreateProperty -N)" "$(target "$create_ratio" '>=' 50 '≥ 50%')"
	local n page p99_small p99_large
	for n in 10000 1000000; do
		for page in first last; do
			printf '| a filtered list page (%s) at %s listings, 200 pages/s; the %s page | %s | - | %s |\n' "\`$list_filter\`" "$n" "$page" \
				"$(lat "ListPage/listings=$n/page=$page")" "$(target "$(m "ListPage/listings=$n/page=$page" p99_ms)" '<' 20 'p99 < 20 ms')"
		done
	done
	printf '| a list page whose filter (%s) matches none of 1000000 listings, 200 pages/s | %s | - | %s |\n' "\`min_price=9999999999\`" \
		"$(lat "ListPage/listings=1000000/page=empty_filter")" "$(target "$(m "ListPage/listings=1000000/page=empty_filter" p99_ms)" '<' 20 'p99 < 20 ms')"
	p99_small=$(m ListPage/listings=10000/page=last p99_ms)
	p99_large=$(m ListPage/listings=1000000/page=last p99_ms)
	printf '| list page p99, 1,000,000 against 10,000 listings (last pages) | %s | %.2f | near 1 |\n' "$p99_large ms / $p99_small ms" \
		"$(awk -v a="$p99_large" -v b="$p99_small" 'BEGIN { print a / b }')"
	printf '| generating 990,000 listings in each region (INSERT … SELECT generate_series) | %s s | - | - |\n' "$(cat "$out/generate-seconds")"
	printf '| 90/10 GET/PUT through NGINX, %s clients | %.0f req/s; %s | - | - |\n' "$clients" "$(m Mixed req/s)" "$(lat Mixed)"
	local scraped paused
	scraped=$(m GetPaced1000 p99_ms)
	paused=$(m GetPaced1000 p99_paused_ms)
	printf '| GET at a steady 1,000 req/s, Prometheus scraping the backends every 5 s (two quarters of the run) | %s | - | %s |\n' \
		"$(lat GetPaced1000)" "$(target "$scraped" '<' 10 'p99 < 10 ms')"
	printf '| the same with Prometheus paused (the two quarters between): does a scrape show in the tail? | p50 %s ms, p99 %s ms, max %s ms | p99 scraped / paused: %.2f | %s |\n' \
		"$(m GetPaced1000 p50_paused_ms)" "$paused" "$(m GetPaced1000 max_paused_ms)" "$(awk -v a="$scraped" -v b="$paused" 'BEGIN { print a / b }')" \
		"$(target "$(awk -v a="$scraped" -v b="$paused" 'BEGIN { print a / b }')" '<=' 1.5 '≤ 1.5')"
	printf '| replication delay US to EU at 200 writes/s, %s writes | %s | - | %s |\n' "$(iterations ReplicationDelay)" "$(lat ReplicationDelay)" \
		"$(target "$(m ReplicationDelay p99_ms)" '<' 250 'p99 < 250 ms')"
	printf '| PUT at a steady 500 req/s, five rounds alone and five while the purge deletes expired request ids (%s of 1,000,000 in the run), in the order alone, purge, purge, alone, … | p99 %s ms alone, %s ms while purging (medians of rounds); rank test p = %s | - | %s |\n' \
		"$(m PutDuringPurge purged)" "$(m PutDuringPurge p99_alone_ms)" "$(m PutDuringPurge p99_purge_ms)" "$(m PutDuringPurge p_value)" \
		"$(target "$(m PutDuringPurge p_value)" '>=' 0.05 'within noise: p ≥ 0.05')"
	printf '| the relay draining a backlog of 1,000,000 events (Kafka back after hours away), to a topic of its own | %.0f events/s; a write made as the drain began left the outbox after %s s (first in, first out) | - | - |\n' \
		"$(m RelayDrain events/s)" "$(m RelayDrain new_write_delay_s)"
	for n in 10000 1000000; do
		printf '| EU rebuilt from nothing (`rejoin --from-nothing`) with %s generated listings: from the command to EU serving again; US'"'"'s GET p99 at 500 req/s, before and while EU copies from it | %.1f s for %.0f listings and %.0f request records in all; p99 %s ms before, %s ms during | - | %s |\n' \
			"$n" "$(m "Rejoin/generated=$n" rejoin_s)" "$(m "Rejoin/generated=$n" listings)" "$(m "Rejoin/generated=$n" request_records)" \
			"$(m "Rejoin/generated=$n" p99_before_ms)" "$(m "Rejoin/generated=$n" p99_during_ms)" \
			"$(target "$(m "Rejoin/generated=$n" rejoin_s)" '<' "$([ "$n" = 10000 ] && echo 60 || echo 600)" "$([ "$n" = 10000 ] && echo '< 1 minute' || echo '< 10 minutes')")"
	done
	printf '| errors, all runs | %s | - | %s |\n' "$errors" "$(target "$errors" '<' 1 'none')"
}

# update_doc replaces docs/benchmarks.md's section between the bench
# markers.
update_doc() {
	local machine
	machine="$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(free -g | awk '/^Mem:/ { print $2 }') GiB, whole stack on the same machine"
	{
		echo "<!-- $section:start (written by ./stack.sh bench; do not edit) -->"
		echo "Measured $(date -u +%Y-%m-%d) with \`./stack.sh up $(topology) && ./stack.sh bench\` on $machine:"
		echo
		cat "$out/table.md"
		echo "<!-- $section:end -->"
	} >"$out/section.md"
	awk -v f="$out/section.md" -v start="<!-- $section:start" -v end="<!-- $section:end -->" '
		index($0, start) == 1 { while ((getline line < f) > 0) print line; skip = 1; next }
		index($0, end) == 1 { skip = 0; next }
		!skip { print }' "$root/docs/benchmarks.md" >"$out/benchmarks.md" && cp "$out/benchmarks.md" "$root/docs/benchmarks.md"
	log "docs/benchmarks.md updated"
}

bench_main() {
	cmd_up
	test_env
	cd "$root"
	mkdir -p "$out"
	if ! command -v wrk >/dev/null; then
		[ "$(id -u)" = 0 ] || die "the benchmark needs wrk: apt-get install wrk"
		log "installing wrk with apt"
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } >&2
	fi
	init_pgbench
	measure
	[ "$(pgbench_tps -S | wc -l)" = "$rounds" ] && [ "$(pgbench_tps -N | wc -l)" = "$rounds" ] ||
		die "pgbench printed no tps: see $out/pgbench-*.log"
	table >"$out/table.md"
	cat "$out/table.md"
	update_doc
}

# Run only when executed, so that a reader (or a rerun of one step) can
# source the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	bench_main "$@"
fi
