#!/usr/bin/env python3
"""Medians of `tools/uring-bench.sh` output, as the markdown table in BENCHMARKS.md.

    tools/uring-bench-summary.py target/relay-bench-uring/final.txt [measured seconds]

"Mpps per relay CPU-s" divides what the relay forwarded by the CPU time it used: for
WraithGate, packets forwarded over the relay's life over its worker thread's CPU time (both
from its own log); for the naive relay, the harness's Mpps times the measured seconds over
the process's CPU time (which also covers warm-up and handshakes, so it flatters WraithGate
by at most ~10 %). On a machine shared with other work, raw Gb/s says how much CPU the
relay was given; this says what it did with it.
"""
import re
import statistics
import sys
from collections import defaultdict

path = sys.argv[1]
duration = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
line_re = re.compile(
    r"\[(\w+) run \d+/\d+\]\s+(\S+)\s+(\S+)\s+([\d.]+) Gb/s\s+([\d.]+) Mpps loss\s+([\d.]+)% p99\s+(\d+) µs"
    r".*relay_cpu_s=([\d.]+) worker_cpu_s=(\S+) forwarded=(\S+)"
)
rows = defaultdict(list)
for line in open(path, encoding="utf-8"):
    m = line_re.search(line)
    if not m:
        continue
    topo, scen, cont, gbps, mpps, loss, p99, cpu, wcpu, fwd = m.groups()
    gbps, mpps, loss, p99, cpu = map(float, (gbps, mpps, loss, p99, cpu))
    if wcpu != "-" and fwd != "-" and float(wcpu) > 0:
        eff = float(fwd) / float(wcpu) / 1e6
    elif cpu > 0:
        eff = mpps * duration / cpu
    else:
        eff = float("nan")
    rows[(topo, scen, cont)].append((gbps, mpps, loss, p99, eff))

def med(xs):
    return statistics.median(xs) if xs else float("nan")

print("| topology | scenario | relay | runs | Gb/s | Mpps | loss % | p99 µs | Mpps per relay CPU-s | vs portable | vs naive |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
effs = {}
for key, vals in rows.items():
    effs[key] = med([v[4] for v in vals])
for (topo, scen, cont), vals in sorted(rows.items()):
    g, mp, lo, p, e = (med([v[i] for v in vals]) for i in range(5))
    port = effs.get((topo, scen, "wraithgate-portable"))
    naive = effs.get((topo, scen, "naive-tokio"))
    vs_p = f"{e / port:.2f}×" if port else "-"
    vs_n = f"{e / naive:.2f}×" if naive else "-"
    print(f"| {topo} | {scen} | {cont} | {len(vals)} | {g:.3f} | {mp:.3f} | {lo:.1f} | {p:.0f} | {e:.3f} | {vs_p} | {vs_n} |")
