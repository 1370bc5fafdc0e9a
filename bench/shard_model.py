#!/usr/bin/env python3
"""bench/shard_model.py: a model (not a measurement) of the d-sharded layer
(README "Sharding") at P = 8..64 ranks, per token and per rank, forward pass:

  experts   2*H*k*(d/P)*bytes random row reads, at the memory bandwidth
  retrieval query d*H*d_key + sub-keys H*n*d_key multiply-adds, replicated
            on every rank (it does not shrink with P), at the FP32 peak
  comm      ring all-reduce of H*k floats (2(P-1)/P of it sent per rank) and
            all-gather of y (d floats: (P-1)/P of it received per rank), at
            the link bandwidth; latency is per batch, not per token, and is
            left out (batches of thousands of tokens)

A training step moves twice that (the backward all-reduces H*k floats and
gathers dx) and reads the rows twice more.  Prints markdown tables.

  python3 bench/shard_model.py [--d 2048] [--H 8] [--k 16] [--d_key 256]
"""
import argparse

GPU = {"H100": (3.35e12, 67e12), "H200": (4.8e12, 67e12)}  # HBM B/s, FP32 FLOP/s
LINKS = {  # per-rank bandwidth one way, bytes/s
    "NVLink 4 (450 GB/s)": 450e9,
    "400 Gb/s": 50e9,
    "200 Gb/s": 25e9,
    "100 Gb/s": 12.5e9,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--d_key", type=int, default=256)
    ap.add_argument("--bytes", type=int, default=4, help="bytes per expert weight (4 f32, 2 bf16)")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPU))
    a = ap.parse_args()
    hbm, flops = GPU[a.gpu]
    hk = a.H * a.k
    print(f"d={a.d}, H={a.H}, k={a.k}, d_key={a.d_key}, {a.bytes}-byte weights, {a.gpu} "
          f"({hbm / 1e12:.2f} TB/s, {flops / 1e12:.0f} TFLOP/s FP32); ns per token per rank, forward\n")
    for n in (1024, 2048, 4096):
        N = n * n
        table = 2 * N * a.d * a.bytes
        retr = 2 * (a.d * a.H * a.d_key + a.H * n * a.d_key) / flops * 1e9
        print(f"### N = {n}^2 = {N:,} experts: tables {table / 2**30:.0f} GiB in all; "
              f"replicated retrieval {retr:.0f} ns/token\n")
        head = "| P | tables per rank | experts | " + " | ".join(f"comm, {l}" for l in LINKS) + " | bound |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for P in (1, 8, 16, 32, 64):
            exp = 2 * hk * (a.d / P) * a.bytes / hbm * 1e9
            comm_bytes = 2 * (P - 1) / P * hk * 4 + (P - 1) / P * a.d * 4
            comms = {l: comm_bytes / bw * 1e9 for l, bw in LINKS.items()}
            parts = {"retrieval": retr, "experts": exp}
            by = {}
            for l, c in comms.items():
                worst = max(list(parts.items()) + [("comm", c)], key=lambda kv: kv[1])[0]
                by.setdefault(worst, []).append(l.split(" (")[0].replace("NVLink 4", "NVLink"))
            bound = [f"{w} ({', '.join(ls)})" for w, ls in by.items()]
            print(f"| {P} | {table / P / 2**30:.2f} GiB | {exp:.1f} | "
                  + " | ".join(f"{c:.1f}" for c in comms.values())
                  + " | " + "; ".join(bound) + " |")
        print()
    bytes_tok = lambda P: 2 * (P - 1) / P * hk * 4 + (P - 1) / P * a.d * 4
    print(f"Bytes each rank sends per token (forward; a training step twice): "
          f"P=8 {bytes_tok(8):.0f}, P=64 {bytes_tok(64):.0f}, against "
          f"{2 * hk * a.d * a.bytes:,} bytes of expert rows read per token in all.")


if __name__ == "__main__":
    main()
