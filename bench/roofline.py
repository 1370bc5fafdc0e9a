#!/usr/bin/env python3
"""roofline.py: the floors of the forward, its pieces and the training step, from this host's measured ceilings.

The one definition of the floor (bench/README.md "The machine and its floor"):
for a piece of work with F FLOP, S streamed bytes and R bytes of random rows per
token, run on t threads,

    floor = max(F / fma_f32(t), S / stream_read(t), R / random_rows(t, row size))

with the ceilings measured on the same host by bench/ceilings (best of its
runs).  The compute floor is F / fma_f32(t) alone; the issue 15 target is
measured time <= compute floor / 0.6.  Selection work (compares, the candidate
sums) has no FMA; each vector-lane operation counts as two FLOP, the share of
an FMA port slot it takes, so it meets the same f32 roof.

Usage:
  build/bin/ceilings --json ceilings.json
  build/bin/bench_pieces --benchmark_out=pieces.json --benchmark_out_format=json
  build/bin/bench_forward --benchmark_filter='(forward|train_step)/ref/' \\
      --benchmark_out=forward.json --benchmark_out_format=json
  python3 bench/roofline.py ceilings.json pieces.json forward.json [--png bench/roofline.png]

Prints a markdown table (per token: FLOP, bytes, floor, measured, fraction of
floor); with --png also draws the roofline picture with gnuplot (Debian's
gnuplot package).  bench/tables.py uses floor_of() for its floor columns.
Python standard library only.  Not run by CI.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import load, parse_name  # noqa: E402


class Ceilings:
    """bench/ceilings' JSON: rates in FLOP/s and bytes/s for a thread count."""

    def __init__(self, path):
        with open(path) as f:
            self.raw = json.load(f)
        self.cpu, self.isa = self.raw.get("cpu", "?"), self.raw.get("isa", "?")

    def _get(self, key, threads):
        v = self.raw.get(f"{key}_t{threads}")
        if v is None:  # thread count not measured: scale the single-thread ceiling
            v = self.raw[f"{key}_t1"] * threads
        return v * 1e9

    def fma(self, threads):
        return self._get("fma_f32_gflops", threads)

    def bf16(self, threads):
        return self._get("dot_bf16_gflops", threads) if "dot_bf16_gflops_t1" in self.raw else None

    def stream(self, threads):
        return self._get("stream_read_gbs", threads)

    def random_rows(self, threads, row_bytes):
        """Random-row bytes/s for the measured row size nearest (in log) to row_bytes."""
        sizes = sorted(int(k[len("random_row"):].split("_")[0]) for k in self.raw
                       if k.startswith("random_row") and k.endswith("_gbs_t1"))
        size = min(sizes, key=lambda s: abs(math.log(s / row_bytes)))
        return self._get(f"random_row{size}_gbs", threads)


class Cost:
    """Work per token: FLOP, streamed bytes, random-row bytes and their row size."""

    def __init__(self, flop, stream=0.0, rows=0.0, row_bytes=2048):
        self.flop, self.stream, self.rows, self.row_bytes = flop, stream, rows, row_bytes

    def bytes(self):
        return self.stream + self.rows


def floor_of(cost, ceil, threads):
    """(floor seconds per token, bound, compute floor seconds) on `threads` threads."""
    parts = {"compute": cost.flop / ceil.fma(threads), "stream": cost.stream / ceil.stream(threads)}
    if cost.rows:
        parts["random rows"] = cost.rows / ceil.random_rows(threads, cost.row_bytes)
    bound = max(parts, key=parts.get)
    return parts[bound], bound, parts["compute"]


def step_cost(r):
    """A bench_forward result's per-token cost, from its counters (bench/common.h counts)."""
    tps = r["tokens/s"]
    return Cost(2.0 * r["MAC/s"] / tps, r.get("stream_B/s", 0.0) / tps, r.get("expert_B/s", 0.0) / tps,
                r.get("row_B", 2048))


def piece_costs(n, H=8, dk=256, k=16, kp=16, d=512, T=512):
    """Per-token cost of bench_pieces' pieces (PEER.md "Cost per token"; the
    bench's layouts: queries and scores in memory, one head's keys in L2)."""
    return {
        "query_projection": Cost(2.0 * d * H * dk, 4.0 * (d + H * dk) + 4.0 * H * dk * d / T),
        "subkey_scores": Cost(2.0 * H * n * dk, 4.0 * H * dk + 4.0 * H * n * dk / T),
        "half_topk": Cost(2.0 * 2 * H * n, 4.0 * 2 * H * n),  # one compare per score
        "candidate_topk": Cost(2.0 * 2 * H * kp * kp, 2.0 * H * kp * 12),  # a sum and a compare per pair
        "experts_f32": Cost(4.0 * H * k * d, 8.0 * d, 2.0 * H * k * d * 4, 4 * d),
        "experts_bf16": Cost(4.0 * H * k * d, 8.0 * d, 2.0 * H * k * d * 2, 2 * d),
    }


UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def rows_of(results, cpu_time=False):
    """(label, cost, threads, measured seconds per token) for every piece and
    reference step.  cpu_time: the benchmark's CPU time instead of wall time,
    for one thread only (on a loaded machine, the time the thread ran)."""
    out = []
    for name, r in sorted(results.items()):
        if "error" in r:
            continue
        kind, words, f = parse_name(name)
        threads = int(f.get("threads", 1))
        if cpu_time and threads != 1:
            continue
        if kind == "pieces" and words and int(f.get("n", 0)) == 1024:
            cost = piece_costs(int(f["n"]), int(f["H"]), int(f["d_key"]), int(f["k"]))[words[0]]
            sec = r["us/token"] * 1e-6
        elif kind in ("forward", "train_step") and len(words) >= 2 and words[0] == "ref":
            cost = step_cost(r)
            sec = 1.0 / r["tokens/s"]
            words = [f"{'forward' if kind == 'forward' else 'training step'} {words[1]} batch {f['batch']}"]
        else:
            continue
        if cpu_time:
            sec = r["cpu_time"] * UNIT[r.get("time_unit", "ns")] / int(f["batch"])
        out.append((words[0], cost, threads, sec))
    pieces = list(piece_costs(1024))
    return sorted(out, key=lambda r: (pieces.index(r[0]) if r[0] in pieces else len(pieces), r[0], r[2]))


def table(ceil, rows, out):
    out.write(f"Ceilings ({ceil.cpu}, {ceil.isa} vectors; bench/ceilings): ")
    for t in sorted({t for *_, t, _ in rows}):
        bf = ceil.bf16(t)
        out.write(f"{t} thread(s): f32 FMA {ceil.fma(t) / 1e9:.0f} GFLOP/s"
                  + (f", bf16 dot {bf / 1e9:.0f} GFLOP/s" if bf else "")
                  + f", stream {ceil.stream(t) / 1e9:.1f} GB/s, random 2 KiB rows"
                  f" {ceil.random_rows(t, 2048) / 1e9:.1f} GB/s, 1 KiB {ceil.random_rows(t, 1024) / 1e9:.1f} GB/s. ")
    out.write("\n\n| work (reference config) | threads | MFLOP/token | KiB/token streamed + random rows | FLOP/byte"
              " | floor us/token (bound) | compute floor us | measured us/token | GFLOP/s | of floor | of compute floor |\n")
    out.write("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for label, cost, t, sec in rows:
        fl, bound, comp = floor_of(cost, ceil, t)
        out.write(f"| {label} | {t} | {cost.flop / 1e6:.3g} | {cost.stream / 1024:.3g} + {cost.rows / 1024:.3g}"
                  f" | {cost.flop / cost.bytes():.3g} | {fl * 1e6:.3g} ({bound}) | {comp * 1e6:.3g}"
                  f" | {sec * 1e6:.3g} | {cost.flop / sec / 1e9:.3g} | {fl / sec:.2f} | {comp / sec:.2f} |\n")
    out.write("\n")


def draw(ceil, rows, png):
    """Roofline: FLOP/byte against achieved GFLOP/s, one thread, log-log."""
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        sys.exit("roofline.py: --png needs gnuplot (apt-get install gnuplot-nox)")
    # One thread; at batch 1 only f32 (the bf16 points fall on the f32 ones).
    pts = [(lab, c, s) for lab, c, t, s in rows if t == 1 and not ("bf16 batch 1" in lab)]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "points.dat")
        with open(data, "w") as f:
            for i, (lab, c, s) in enumerate(sorted(pts, key=lambda p: p[1].flop / p[1].bytes())):
                up = 1.12 if i % 2 else 0.86  # neighbours' labels above and below
                f.write(f'{c.flop / c.bytes():.6g} {c.flop / s / 1e9:.6g} "{lab.replace("_", " ")}" {up}\n')
        F, S = ceil.fma(1) / 1e9, ceil.stream(1) / 1e9
        R2, R1 = ceil.random_rows(1, 2048) / 1e9, ceil.random_rows(1, 1024) / 1e9
        bf = ceil.bf16(1)
        script = f"""
set terminal pngcairo size 900,620 font ",10" noenhanced
set output "{png}"
set logscale xy
set xrange [0.1:1000]
set yrange [0.5:{2 * max(F, (bf or 0) / 1e9):.0f}]
set xlabel "arithmetic intensity (FLOP per byte from memory)"
set ylabel "GFLOP/s (one thread)"
set title "PEER reference config, 1 thread: {ceil.cpu} ({ceil.isa})" noenhanced
set key bottom right box opaque
set grid
f32(x) = {F:.6g}
stream(x) = x * {S:.6g} < f32(x) ? x * {S:.6g} : f32(x)
rows2(x) = x * {R2:.6g} < f32(x) ? x * {R2:.6g} : f32(x)
rows1(x) = x * {R1:.6g} < f32(x) ? x * {R1:.6g} : f32(x)
plot f32(x) lw 2 lc rgb "black" title "f32 FMA peak {F:.0f} GFLOP/s", \\
""" + (f'  {bf / 1e9:.6g} lw 2 dt 2 lc rgb "purple" title "bf16 dot peak {bf / 1e9:.0f} GFLOP/s (AVX512_BF16)", \\\n'
       if bf else "") + f"""  stream(x) lw 2 lc rgb "blue" title "streaming read {S:.1f} GB/s", \\
  rows2(x) lw 2 lc rgb "red" title "random 2 KiB rows {R2:.1f} GB/s", \\
  rows1(x) lw 2 dt 3 lc rgb "orange" title "random 1 KiB rows {R1:.1f} GB/s", \\
  "{data}" using 1:2 with points pt 7 ps 1.3 lc rgb "dark-green" notitle, \\
  "{data}" using ($1*1.12):($2*$4):3 with labels left font ",9" notitle
"""
        sp = os.path.join(tmp, "roofline.gp")
        with open(sp, "w") as f:
            f.write(script)
        subprocess.run([gnuplot, sp], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ceilings", help="bench/ceilings --json output")
    ap.add_argument("json", nargs="+", help="bench_pieces / bench_forward --benchmark_out files")
    ap.add_argument("--png", help="write the roofline picture here (needs gnuplot)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one-thread rows only, timed by CPU time (for a loaded machine)")
    args = ap.parse_args()
    ceil = Ceilings(args.ceilings)
    rows = rows_of(load(args.json), args.cpu_time)
    table(ceil, rows, sys.stdout)
    if args.png:
        draw(ceil, rows, args.png)


if __name__ == "__main__":
    main()
