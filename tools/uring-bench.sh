#!/usr/bin/env bash
# io_uring vs portable vs a naive tokio relay, one relay worker, 1420-byte packets, with the
# relay-bench harness; adds what the harness cannot see on a shared machine: the relay's
# own CPU time, so that throughput can be compared per CPU-second of the relay.
#
#   tools/uring-bench.sh [relay-bench binary] [wraithgate binary] [topologies]
#   (environment: RUNS=3 DURATION=5 RATE=1.0 (Gb/s of the paced scenario) SCENARIOS=...)
#
# Needs root (namespaces). Prints one line per run: harness figures, relay CPU seconds and
# packets forwarded over the relay's life, and packets per relay CPU-second.
set -euo pipefail
BENCH=${1:-target/release/relay-bench}
WG=${2:-target/release/wraithgate}
TOPOS=${3:-loopback,netns}
WD=${WD:-target/relay-bench-uring}
DURATION=${DURATION:-5}
RUNS=${RUNS:-3}
RATE=${RATE:-1.0}
SCENARIOS=${SCENARIOS:-1flow-1420B-unpaced 1000flow-1420B-unpaced 1flow-1420B-paced}
mkdir -p "$WD"
WD=$(cd "$WD" && pwd)
REAL_WG=$(realpath "$WG")
# The node keeps state in a directory (default /var/lib/wraithgate) that would outlive a
# run and seed the next one: every start gets a fresh one.
WRAP="$WD/wraithgate-fresh-state"
printf '#!/bin/sh\nd=$(mktemp -d "%s/state.XXXXXX")\nexec "%s" "$@" --state-dir "$d"\n' \
    "$WD" "$REAL_WG" > "$WRAP"
chmod +x "$WRAP"

# Total CPU seconds (utime+stime of every thread) of the newest process matching $1,
# sampled until it exits; prints the last sample.
cpu_of() {
    local pattern=$1 pid="" last=0 tck
    tck=$(getconf CLK_TCK)
    for _ in $(seq 1 200); do
        pid=$(pgrep -n -f "$pattern" || true)
        [ -n "$pid" ] && break
        sleep 0.05
    done
    [ -z "$pid" ] && { echo 0; return; }
    while [ -r "/proc/$pid/stat" ]; do
        local t
        t=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || true)
        [ -n "$t" ] && last=$t
        sleep 0.1
    done
    awk -v t="$last" -v h="$tck" 'BEGIN{printf "%.3f", t/h}'
}

for run in $(seq 1 "$RUNS"); do
  for topo in ${TOPOS//,/ }; do
    for sc in $SCENARIOS; do
      for c in wraithgate-uring wraithgate-portable naive-tokio; do
        case $c in
          naive-tokio) pat="relay-bench naive-relay" ;;
          *) pat="$REAL_WG run --config" ;;
        esac
        cpu_file=$(mktemp)
        (cpu_of "$pat" > "$cpu_file") &
        sampler=$!
        line=$("$BENCH" --quick --runs 1 --duration "$DURATION" --topology "$topo" \
            --contenders "$c" --scenarios "$sc" --no-e2e --wraithgate "$WRAP" --rate-gbps "$RATE" \
            --prefix ru --workdir "$WD" --svg "$WD/last.svg" 2>&1 >/dev/null \
            | grep -E "^\[$topo run" || true)
        wait "$sampler" || true
        cpu=$(cat "$cpu_file"); rm -f "$cpu_file"
        pkts="-"; wcpu="-"
        if [ "$c" != naive-tokio ] && [ -f "$WD/$c.log" ]; then
            stop=$(sed 's/\x1b\[[0-9;]*m//g' "$WD/$c.log" | grep "stopping" | tail -1)
            pkts=$(sed -n 's/.*to_exit_packets=\([0-9]*\).*/\1/p' <<<"$stop")
            wcpu=$(sed -n 's/.*worker_cpu_seconds=\([0-9.]*\).*/\1/p' <<<"$stop")
        fi
        echo "run=$run $line | relay_cpu_s=$cpu worker_cpu_s=$wcpu forwarded=$pkts"
      done
    done
  done
done
