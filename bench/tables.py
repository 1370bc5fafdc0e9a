#!/usr/bin/env python3
"""tables.py: markdown tables from the JSON of bench_forward, bench_pieces, bench_retrieval and bench_cuda.

Usage:
  build/bin/bench_forward --benchmark_out=forward.json --benchmark_out_format=json
  build/bin/bench_retrieval --benchmark_out=retrieval.json --benchmark_out_format=json
  build/bin/bench_cuda --benchmark_out=cuda.json --benchmark_out_format=json   # with a GPU
  python3 bench/tables.py forward.json retrieval.json cuda.json
  python3 bench/tables.py --ceilings ceilings.json forward.json   # with floor columns

The CPU floor columns need this host's ceilings (build/bin/ceilings --json
ceilings.json); the floor is bench/roofline.py's floor_of.

The CUDA tables appear only when CUDA results are given (bench_cuda writes no
JSON without a device).

With --benchmark_repetitions the median aggregate of each benchmark is used;
without, the (lower) median of its plain runs by real time.  Python standard library only.
"""
import argparse
import json
import sys


def parse_name(run_name):
    """'retrieve/pk/n:1024/H:8/...' -> ('retrieve', ['pk'], {'n': '1024', ...})."""
    parts = run_name.split("/")
    words, fields = [], {}
    for part in parts[1:]:
        if ":" in part:
            key, value = part.split(":", 1)
            fields[key] = value
        elif part not in ("real_time", "manual_time"):
            words.append(part)
    return parts[0], words, fields


def load(paths):
    """run_name -> dict of the values of its median run (counters included),
    plus "cv" (coefficient of variation of the real time) with repetitions."""
    runs = {}
    medians = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            name = b.get("run_name", b["name"])
            if b.get("error_occurred"):
                medians[name] = {"error": b.get("error_message", "error")}
            elif b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    medians.setdefault(name, {}).update(b)
                elif b.get("aggregate_name") == "cv":
                    medians.setdefault(name, {})["cv"] = b["real_time"]
            else:
                runs.setdefault(name, []).append(b)
    for name, entries in runs.items():
        if name not in medians:
            entries.sort(key=lambda e: e["real_time"])
            medians[name] = entries[(len(entries) - 1) // 2]  # lower median
    return medians


def fmt(x):
    """Three significant digits with a k / M / G suffix."""
    if x is None:
        return "-"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:#.3g}".rstrip(".") + suffix
    return f"{x:#.3g}".rstrip(".")


def retrieval_tables(results, out):
    cases = {}
    for name, r in results.items():
        kind, words, f = parse_name(name)
        if kind != "retrieve" or not words:
            continue
        key = (int(f["n"]), int(f["H"]), int(f["d_key"]), int(f["k"]), int(f["threads"]))
        cases.setdefault(key, {})[words[0]] = r
    if not cases:
        return
    out.write("### Retrieval: product keys vs brute force (tokens/s, d_model = 64)\n\n")
    out.write("| N | n | H | d_key | k | threads | product keys | brute force | ratio |\n")
    out.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    # k = 16 single-thread sweep first, then the k and thread variants.
    order = sorted(cases, key=lambda c: (c[3] != 16 or c[4] != 1, c[4], c[3], c[1], c[2], c[0]))
    for key in order:
        n, H, dk, k, threads = key
        pk = cases[key].get("pk", {}).get("tokens/s")
        br = cases[key].get("brute", {}).get("tokens/s")
        ratio = f"{pk / br:#.3g}".rstrip(".") + "x" if pk and br else "-"
        out.write(f"| {n * n:,} | {n} | {H} | {dk} | {k} | {threads} | {fmt(pk)} | {fmt(br)} | {ratio} |\n")
    out.write("\n")


SHAPES = "ref: d=512, n=1024 (N=1M); small: d=256, n=256; n512: d=512, n=512; d256: d=256, n=1024; all H=8, k=16, d_key=256"


def step_tables(results, out, kind, title, ceil=None):
    """Forward or training-step rows of bench_forward; floor columns from the
    ceilings (roofline.Ceilings) when given, else "-"."""
    if ceil:
        from roofline import floor_of, step_cost
    rows = []
    for name, r in results.items():
        k, words, f = parse_name(name)
        if k != kind or len(words) < 2:
            continue
        rows.append(((words[0] != "ref", words[0], words[1] != "f32", words[1], int(f["threads"]), -int(f["batch"])), r))
    if not rows:
        return
    train = kind == "train_step"
    out.write(f"### {title} ({SHAPES})\n\n")
    out.write("| config | dtype | threads | batch | ms / call (cv) | tokens/s | floor tokens/s | floor frac"
              + (" | context KiB/token |\n" if train else " | expert GB/s | GMAC/s |\n"))
    out.write("|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|\n" if train else "---:|---:|\n"))
    for (_, cfg, _, dtype, threads, neg_batch), r in sorted(rows, key=lambda x: x[0]):
        if "error" in r:
            out.write(f"| {cfg} | {dtype} | {threads} | {-neg_batch} | error: {r['error']} |||||\n")
            continue
        tps = r.get("tokens/s")
        floor = 1.0 / floor_of(step_cost(r), ceil, threads)[0] if ceil and tps else None
        frac = f"{tps / floor:.2f}" if floor else "-"
        ms = r["real_time"] * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[r.get("time_unit", "ns")]
        cv = f" ({100 * r['cv']:.0f}%)" if "cv" in r else ""
        tail = (f" | {r.get('ctx_KiB/token', 0):.1f} |" if train else
                f" | {r.get('expert_B/s', 0) / 1e9:.2f} | {r.get('MAC/s', 0) / 1e9:.1f} |")
        out.write(f"| {cfg} | {dtype} | {threads} | {-neg_batch} | {ms:.3g}{cv} | {fmt(tps)} | {fmt(floor)}"
                  f" | {frac}{tail}\n")
    out.write("\n")


def pieces_tables(results, out):
    """bench_pieces: us/token of each piece of retrieval, per n."""
    cases = {}
    for name, r in results.items():
        kind, words, f = parse_name(name)
        if kind != "pieces" or not words:
            continue
        cases.setdefault(int(f["n"]), {})[words[0]] = r.get("us/token")
    if not cases:
        return
    names = ["query_projection", "subkey_scores", "half_topk", "candidate_topk"]
    experts = ["experts_f32", "experts_bf16"]
    out.write("### Pieces of the forward (us/token, 1 thread, batch 512, d=512, H=8, d_key=256, k=k'=16)\n\n")
    out.write("total = the four retrieval pieces; the expert phase (gather, dot, activation, gate, accumulate) follows them.\n\n")
    out.write("| N | n | " + " | ".join(names) + " | total | " + " | ".join(experts) + " |\n|---:|---:|"
              + "---:|" * (len(names) + 1 + len(experts)) + "\n")
    for n in sorted(cases):
        v = [cases[n].get(p) for p in names]
        e = [cases[n].get(p) for p in experts]
        total = f"{sum(v):.1f}" if all(v) else "-"  # only when every piece ran
        out.write(f"| {n * n:,} | {n} | " + " | ".join(f"{x:.1f}" if x else "-" for x in v) + f" | {total} | "
                  + " | ".join(f"{x:.1f}" if x else "-" for x in e) + " |\n")
    out.write("\n")


def call_ms(r):
    """Time per call in milliseconds (real time, or manual time for CUDA)."""
    return r["real_time"] * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[r.get("time_unit", "ns")]


def cuda_devices(paths):
    """The "cuda_device" context entries bench_cuda writes (one per GPU model)."""
    names = []
    for path in paths:
        with open(path) as f:
            name = json.load(f).get("context", {}).get("cuda_device")
        if name and name not in names:
            names.append(name)
    return names


def cuda_tables(results, devices, out):
    """bench_cuda: forward and training step, then retrieval (product keys vs
    brute force).  Nothing when no CUDA result was given."""
    steps, retrieval = [], {}
    for name, r in results.items():
        kind, words, f = parse_name(name)
        if kind in ("cuda_forward", "cuda_train_step") and len(words) >= 2:
            step = "forward" if kind == "cuda_forward" else "train step"
            steps.append(((kind, words[0] != "ref", words[0], words[1] != "f32", words[1], int(f["batch"])),
                          step, r))
        elif kind == "cuda_retrieve" and words:
            retrieval.setdefault(int(f["n"]), {})[words[0]] = (int(f["batch"]), r)
    if not steps and not retrieval:
        return
    device = "; ".join(devices) if devices else "device not recorded"
    out.write(f"### CUDA ({device})\n\n")
    out.write("Floors from H100 ceilings: 3.35 TB/s HBM, 60 TFLOP/s fp32. ref: d=512, H=8, k=16, d_key=256, "
              "n=1024 (N=1M). Time per call from CUDA events, L2 flushed before each call.\n\n")
    if steps:
        out.write("| step | config | dtype | batch | ms / call (cv) | tokens/s | floor tokens/s | floor frac | HBM frac"
                  " | expert GB/s | expert rows/token |\n")
        out.write("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for (_, _, cfg, _, dtype, batch), step, r in sorted(steps, key=lambda x: x[0]):
            if "error" in r:
                out.write(f"| {step} | {cfg} | {dtype} | {batch} | error: {r['error']} |||||||\n")
                continue
            tps, frac = r.get("tokens/s"), r.get("floor_frac")
            floor = tps / frac if tps and frac else None
            cv = f" ({100 * r['cv']:.0f}%)" if "cv" in r else ""
            expert = r.get("expert_B/s")
            rows = r.get("expert_rows/token")
            out.write(f"| {step} | {cfg} | {dtype} | {batch} | {call_ms(r):.3g}{cv} | {fmt(tps)} | {fmt(floor)}"
                      f" | {frac:.2f} | {r.get('HBM_frac', 0):.2f}"
                      f" | {expert / 1e9 if expert else 0:.0f} | {f'{rows:.1f}' if rows else '-'} |\n")
        out.write("\n")
    if retrieval:
        out.write("| N | n | product keys tokens/s (batch) | floor frac | brute force tokens/s (batch) | ratio |\n")
        out.write("|---:|---:|---:|---:|---:|---:|\n")

        def cell(entry):
            if not entry:
                return None, "-"
            batch, r = entry
            if "error" in r:
                return None, f"error: {r['error']}"
            return r.get("tokens/s"), f"{fmt(r.get('tokens/s'))} ({batch})"

        for n in sorted(retrieval):
            pk, pk_text = cell(retrieval[n].get("pk"))
            br, br_text = cell(retrieval[n].get("brute"))
            pk_entry = retrieval[n].get("pk")
            frac = pk_entry[1].get("floor_frac") if pk_entry else None
            ratio = f"{pk / br:#.3g}".rstrip(".") + "x" if pk and br else "-"
            out.write(f"| {n * n:,} | {n} | {pk_text} | {f'{frac:.2f}' if frac else '-'} | {br_text} | {ratio} |\n")
        out.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="--benchmark_out files (json format)")
    ap.add_argument("--ceilings", help="bench/ceilings --json output: floor columns of the CPU tables")
    args = ap.parse_args()
    results = load(args.json)
    ceil = None
    if args.ceilings:
        from roofline import Ceilings
        ceil = Ceilings(args.ceilings)
    step_tables(results, sys.stdout, "forward", "Forward", ceil)
    step_tables(results, sys.stdout, "train_step", "Training step (forward_train + backward)", ceil)
    pieces_tables(results, sys.stdout)
    retrieval_tables(results, sys.stdout)
    cuda_tables(results, cuda_devices(args.json), sys.stdout)


if __name__ == "__main__":
    main()
