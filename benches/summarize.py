#!/usr/bin/env python3
"""Print the markdown tables of BENCHMARKS.md from the last bench run.

Reads criterion's target/criterion/**/new/{benchmark,estimates}.json (per_chunk,
per_request, span_cost) and the plain benches' target/tether-bench/*.json
(cancel_latency, in_flight_memory). Stdlib only.

Usage: python3 benches/summarize.py [--target DIR] [--stat median|mean]
"""

import argparse
import glob
import json
import os
import sys

RUNTIMES = ["tokio_ct", "tokio_mt", "smol"]


def load_criterion(target, stat):
    """{(group, function_id, value_str): ns per element} from criterion's files."""
    out = {}
    for bench_path in glob.glob(os.path.join(target, "criterion", "**", "new", "benchmark.json"), recursive=True):
        est_path = os.path.join(os.path.dirname(bench_path), "estimates.json")
        if not os.path.exists(est_path):
            continue
        with open(bench_path) as f:
            bench = json.load(f)
        with open(est_path) as f:
            est = json.load(f)
        per_iter = est[stat]["point_estimate"]
        elements = (bench.get("throughput") or {}).get("Elements", 1)
        key = (bench["group_id"], bench["function_id"], bench.get("value_str") or "")
        out[key] = per_iter / elements
    return out


def load_plain(target, name):
    path = os.path.join(target, "tether-bench", name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


def verdict(ok):
    return "–" if ok is None else ("met" if ok else "**missed**")


def per_chunk(c):
    print("### per_chunk (ns per chunk, 1 000 single-token chunks; target: tether ≤ 1.25× minimal)\n")
    print("| runtime | raw | minimal | tether | tether / minimal | tether − raw (ns) | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for rt in RUNTIMES:
        raw = c.get(("per_chunk", "raw", rt))
        mini = c.get(("per_chunk", "minimal", rt))
        tet = c.get(("per_chunk", "tether", rt))
        if raw is None and mini is None and tet is None:
            continue
        ratio = tet / mini if tet and mini else None
        added = tet - raw if tet is not None and raw is not None else None
        ok = None if ratio is None else ratio <= 1.25
        print(f"| {rt} | {fmt(raw)} | {fmt(mini)} | {fmt(tet)} | {fmt(ratio, 2)}× | {fmt(added)} | {verdict(ok)} |")
    print()


def per_request(c):
    print("### per_request (ns per request: generate, read one chunk, finish; "
          "target: tether ≥ 10× cheaper than baseline, flat from 1 to 4 096 in flight)\n")
    print("| runtime | in flight | raw | minimal | tether | baseline | baseline / tether | "
          "added over raw: baseline / tether | target 10× |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    flat = {}
    for rt in RUNTIMES:
        for n in ["1", "256", "4096"]:
            raw = c.get(("per_request", f"raw/{rt}", n))
            mini = c.get(("per_request", f"minimal/{rt}", n))
            tet = c.get(("per_request", f"tether/{rt}", n))
            base = c.get(("per_request", f"baseline/{rt}", n))
            if raw is None and tet is None and base is None:
                continue
            ratio = base / tet if base and tet else None
            added = None
            if None not in (raw, tet, base) and tet > raw:
                added = (base - raw) / (tet - raw)
            ok = None if ratio is None else ratio >= 10
            print(f"| {rt} | {n} | {fmt(raw)} | {fmt(mini)} | {fmt(tet)} | {fmt(base)} | {fmt(ratio, 2)}× | "
                  f"{fmt(added, 2)}× | {verdict(ok)} |")
            flat.setdefault(rt, {})[n] = (tet, base)
    print()
    print("Growth with the number in flight (ns/request at 4 096 ÷ at 1; target for tether: flat, "
          "read here as ≤ 1.2×):\n")
    print("| runtime | tether at 1 | at 256 | at 4 096 | tether 4 096 / 1 | baseline 4 096 / 1 | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for rt, row in flat.items():
        a, m, b = (row.get(n, (None, None))[0] for n in ("1", "256", "4096"))
        ba, bb = row.get("1", (None, None))[1], row.get("4096", (None, None))[1]
        g = b / a if a and b else None
        gb = bb / ba if ba and bb else None
        print(f"| {rt} | {fmt(a)} | {fmt(m)} | {fmt(b)} | {fmt(g, 2)}× | {fmt(gb, 2)}× | "
              f"{verdict(None if g is None else g <= 1.2)} |")
    print()


def span_cost(c):
    if not any(k[0] == "span_cost" for k in c):
        return
    print("### span_cost (ns per request, one in flight; no target)\n")
    print("| runtime | spans_off | no_subscriber | subscriber | subscriber − spans_off (ns) |")
    print("|---|---:|---:|---:|---:|")
    for rt in RUNTIMES:
        off = c.get(("span_cost", "spans_off", rt))
        none = c.get(("span_cost", "no_subscriber", rt))
        sub = c.get(("span_cost", "subscriber", rt))
        if off is None and none is None and sub is None:
            continue
        d = sub - off if sub is not None and off is not None else None
        print(f"| {rt} | {fmt(off)} | {fmt(none)} | {fmt(sub)} | {fmt(d)} |")
    print()


def cancel_latency(rows):
    if not rows:
        return
    print("### cancel_latency (ns from context.stop() on another task to engine abort() entered; "
          "target: tether p50 ≤ 5 000 ns on tokio multi-thread)\n")
    print("| runtime | variant | samples | p50 | p99 | mean | max | target |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ok = None
        if r["variant"] == "tether" and r["runtime"] == "tokio_mt":
            ok = r["p50_ns"] <= 5000
        print(f"| {r['runtime']} | {r['variant']} | {r['samples']:,} | {r['p50_ns']:,} | {r['p99_ns']:,} | "
              f"{r['mean_ns']:,} | {r['max_ns']:,} | {verdict(ok)} |")
    print()


def in_flight_memory(rows):
    if not rows:
        return
    print("### in_flight_memory (heap bytes per idle in-flight request; "
          "target: tether ≤ 512 B of adapter state, 1 000 000 fit in 24 GiB)\n")
    print("| runtime | variant | requests | B/request | B over raw (adapter state) | allocations/request | target |")
    print("|---|---|---:|---:|---:|---:|---|")
    lin = {}
    for r in rows:
        ok = None
        if r["variant"] == "tether":
            ok = r["bytes_over_raw"] <= 512
        allocs = r.get("allocations_per_request")
        print(f"| {r['runtime']} | {r['variant']} | {r['requests']:,} | {r['bytes_per_request']:,.1f} | "
              f"{r['bytes_over_raw']:,.1f} | {fmt(allocs, 2)} | {verdict(ok)} |")
        lin.setdefault((r["runtime"], r["variant"]), []).append((r["requests"], r["bytes_per_request"]))
    print()
    print("Linearity (B/request at the largest count ÷ at the smallest; 1.00 = exactly linear) "
          "and the projected total at 1 000 000:\n")
    print("| runtime | variant | smallest → largest | ratio | at 1 000 000 (MiB) |")
    print("|---|---|---|---:|---:|")
    for (rt, var), pts in lin.items():
        pts.sort()
        (n0, b0), (n1, b1) = pts[0], pts[-1]
        print(f"| {rt} | {var} | {n0:,} → {n1:,} | {b1 / b0:.3f} | {b1 * 1_000_000 / 2**20:,.0f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--target", default=os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")))
    ap.add_argument("--stat", default="median", choices=["median", "mean"])
    args = ap.parse_args()
    c = load_criterion(args.target, args.stat)
    if not c and not os.path.isdir(os.path.join(args.target, "tether-bench")):
        print(f"no bench results under {args.target}: run benches/run.sh first", file=sys.stderr)
        return 1
    print(f"<!-- generated by benches/summarize.py (criterion statistic: {args.stat}) -->\n")
    per_chunk(c)
    per_request(c)
    cancel_latency(load_plain(args.target, "cancel_latency"))
    in_flight_memory(load_plain(args.target, "in_flight_memory"))
    span_cost(c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
