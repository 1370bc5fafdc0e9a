#!/usr/bin/env python3
"""bench/cuda_model.py: a per-kernel cost model of the CUDA backend (a MODEL,
not a measurement: no GPU has run these kernels).

For every kernel of the forward and of the training step (forward_train +
backward; the optimizer step is a separate table) it counts the HBM bytes it
must move and the FLOPs it does at the reference config (d=512, H=8, k=k'=16,
d_key=256, n=1024, per-head keys, query batch norm as in the paper), names
the bound (bandwidth, FLOPs, or a latency/serial term the code structure
imposes), and predicts a time on H100 SXM and H200 from the stated
efficiencies.  "before" is the code as it was at 9e0a324; "after" is the
design of issue 13 (see the notes per kernel; `--design` prints them).  The
floor is the bytes the step cannot avoid (x, y, dy, dx, the expert rows, the
gradient rows, the weights once) over peak HBM bandwidth.

    python3 bench/cuda_model.py            # markdown tables for kernels/README.md
    python3 bench/cuda_model.py --design   # the per-kernel assumptions
    python3 bench/cuda_model.py --summary  # sums against the floor, every T and dtype
    python3 bench/cuda_model.py --chunks   # the chunked forward against its chunk count

Every number comes from the formulas below; change an assumption here, not
in the README.
"""
import math
import sys

GPUS = {
    # peak HBM bytes/s, f32 non-tensor FLOP/s, SMs, clock (Hz), L2 bytes
    # (tc: dense bf16 tensor-core FLOP/s; l2bw: L2 read bandwidth, an
    # assumption: about 5.5 TB/s reported by microbenchmarks on H100)
    "H100": dict(bw=3.35e12, flops=67e12, sms=132, clock=1.98e9, l2=50e6, tc=989e12, l2bw=5.5e12),
    "H200": dict(bw=4.8e12, flops=67e12, sms=132, clock=1.98e9, l2=50e6, tc=989e12, l2bw=5.5e12),
}
# Efficiencies (assumptions, stated once): streaming kernels reach 85% of peak
# HBM, random 1-2 KiB rows 70%, cuBLAS SGEMM (pedantic, no TF32) 75% of f32
# peak; a kernel boundary costs 2 us (drain and fill of the GPU).
EFF_STREAM, EFF_GATHER, EFF_GEMM, LAUNCH_S = 0.85, 0.70, 0.75, 2e-6
LATENCY_S = 700e-9  # one dependent global load (HBM miss), for serial chains
# The bf16 GemmEx of the sub-key scores: 50% of the dense bf16 tensor-core
# peak (K = d_key/2 = 128 is short: each output tile does few MMAs per byte
# it writes); it is HBM-bound on writing S anyway.
EFF_TC = 0.50
# Exact re-scores per selection row on the bf16 path, random rows at the
# reference config (test_cuda emu/bf16_rescore_work, emulated truncating
# tensor-core sums): 19.7, no fallbacks.
RESCORED_PER_ROW = 19.7

CFG = dict(d=512, H=8, k=16, kp=16, dk=256, n=1024)


def distinct(draws, N):
    """Expected number of distinct experts among `draws` uniform draws."""
    return N * (1.0 - math.exp(-draws / N))


def sort_clocks(p, registers):
    """SM clocks of one warp bitonic sort of p keys (8 bytes each), issue
    bound: shared-memory accesses and shuffles at one warp instruction per
    clock per SM, other instructions at 4.  A shared access of 32 keys at
    consecutive or 32-aligned places is 2 wavefronts (the least for 256
    bytes), counted 1; partners under 16 apart put the 32 keys of an
    access on 8 of the 16 eight-byte bank pairs: 4 wavefronts, counted 2.
    registers False: every stage through shared memory (2 loads, 2 stores
    and about 6 instructions per pair); True (kernels/retrieval.cu now):
    stages 32 or more apart as before, the stages under 32 that follow
    them in registers, per 32 keys one load, one store, and per stage one
    shuffle and about 4 instructions."""
    clocks, blocks = 0.0, max(1, p // 32)
    k = 2
    while k <= p:
        j = k // 2
        while j >= 1:
            if registers and j < 32:
                clocks += blocks * (1 + 4 / 4) * int(math.log2(j) + 1) + blocks * 2
                break
            clocks += max(1, p // 64) * (4 * (2 if j < 16 else 1) + 6 / 4)
            j //= 2
        k *= 2
    return clocks


def kernels(T, wbytes, design, train):
    """The kernels of one inference forward (train False) or one training
    step (forward_train + backward), each a dict: bytes, flops, kind
    ('stream', 'gather' or 'gemm': which efficiency applies), serial (a
    function of the GPU giving a latency or issue bound in seconds), note."""
    d, H, k, kp, dk, n = (CFG[x] for x in ("d", "H", "k", "kp", "dk", "n"))
    N, f = n * n, 4
    after = design == "after"
    rows = 2 * T * H  # (token, head, half) selection rows
    out = []

    def add(phase, name, nbytes, flops=0.0, kind="stream", serial=lambda g: 0.0, note="",
            absent=False):
        out.append(dict(phase=phase, name=name, bytes=nbytes, flops=flops, kind=kind,
                        serial=serial, note=note, absent=absent))

    add("fwd", "query GEMM (cuBLAS)", f * (T * d + H * dk * d + T * H * dk),
        2.0 * T * d * H * dk, "gemm")
    # Batch norm statistics: q read for the mean, read for the centred
    # variance, read again and qhat and q written: 5 passes over [T, H*dk]
    # (before and after).  Before: dq/32 = 64 blocks of 32
    # features x 8 token lanes, each lane walking T/8 tokens with one load in
    # flight: Little's law gives 64 blocks * 8 warps * 128 B / latency.
    bn_bytes = 5 * f * T * H * dk
    if not train:
        add("fwd", "bias_norm (running statistics)", 2 * f * T * H * dk,
            note="elementwise, grid-strided")
    elif after:
        add("fwd", "batch_norm_train", bn_bytes, note="two-level: many blocks, fixed-order partials")
    else:
        add("fwd", "batch_norm_train", bn_bytes,
            serial=lambda g: bn_bytes / (64 * 8 * 128 / LATENCY_S),
            note="64 blocks, one load in flight per warp")
    s_bytes = f * T * H * 2 * n  # the [T, H, 2, n] score matrix
    m = dk // 2
    # After: the bf16 first pass (kernels/README.md "bf16 sub-key scores").
    # keys16 (the keys' bf16 copy and norms, remade when the keys change:
    # every training step, so counted per call) and query16 (q to bf16, per
    # row the bound's 4 coefficients); then cuBLAS GemmEx on tensor cores,
    # f32 output (bf16 output would halve S but widen every bracket by the
    # output's rounding, about as much as the inputs' already cost).
    add("fwd", "keys16 + query16 (bf16 copies, norms)",
        f * H * n * dk + 2 * H * n * dk + 3 * f * H * 2 * n + f * T * H * dk + 2 * T * H * dk
        + 16 * rows, absent=not after, note="warp per row, sums of squares in double")
    if after:
        add("fwd", "sub-key GEMMs (cuBLAS GemmEx, bf16)", 2 * (T * H * dk + H * n * dk) + s_bytes,
            2.0 * T * H * n * dk, "tc", note="tensor cores, f32 accumulate and output")
    else:
        add("fwd", "sub-key GEMMs (cuBLAS)", f * (T * H * dk + H * n * dk) + s_bytes,
            2.0 * T * H * n * dk, "gemm")
    # Selection.  Before: per lane a sorted shared-memory list of up to 16;
    # on random rows each lane inserts sum_{i<=32} min(1, 16/i) = 26.8 of its
    # 32 scores; a warp step runs the shift loop to the longest lane (about
    # 16 iterations of 3 loads + 3 stores of 4-byte words), shared memory
    # issuing one warp instruction per clock per SM; plus k' pop rounds of
    # 5 shuffles.  After (kernels/retrieval.cu): a warp-wide threshold (the
    # k'-th best kept) filters each chunk of 32 scores; candidates are
    # ballot-compacted into a shared buffer of 64 keys, and a full buffer is
    # bitonic-sorted (21 stages of 2 shared loads and 2 stores per lane) down
    # to k'.  Counted under emulation (test_cuda emu/topk_selection_work),
    # random rows at n = 1024, k' = 16: 152 candidates and 207 keys sorted
    # (3.2 sorts) per row.  Chunk steps (about 15 instructions) issue at
    # 4 warp instructions per clock per SM; a sort costs sort_clocks.
    # After, subkey_topk_bf16 (kernels/retrieval.cu): pass 1 is the same
    # selection over the lower ends s16 - e (e: 3 FMAs and 3 loads of key
    # norms per key, from L1/L2); a count of the survivors s16 + e >= tau
    # (32 chunks of ~12 instructions) and pass 2 (32 chunks of ~14: the
    # same test, ballot compaction of survivors); per 32 survivors one round
    # of exact chains (per lane m FMAs, m/4 16-byte loads of the key row
    # from L2, m shared loads of q: ~2.5 m instructions) and one sort of 64.
    # The key rows come from L2 (8 MiB of keys stay there): survivors * m * 4
    # bytes per row.
    if after:
        sort64 = sort_clocks(64, registers=True)
        per_row_ops = (32 * 15 / 4 + 3.2 * sort64 + 3 * 32 * 6 / 4 + 32 * 12 / 4 + 32 * 14 / 4
                       + math.ceil(RESCORED_PER_ROW / 32) * (2.5 * m / 4 + sort64))
        l2_bytes = rows * RESCORED_PER_ROW * m * f
        add("fwd", "subkey_topk_bf16 (bound, exact re-score)", s_bytes + rows * kp * 12,
            serial=lambda g: max(rows * per_row_ops / (g["sms"] * g["clock"]),
                                 l2_bytes / g["l2bw"]),
            note=f"two passes over the row, {RESCORED_PER_ROW} exact chains per row; issue bound")
    else:
        per_row_smem = 32 * 16 * 6 + kp * (5 + 6)
        add("fwd", "subkey_topk", s_bytes + rows * kp * 12,
            serial=lambda g: rows * per_row_smem / (g["sms"] * g["clock"]),
            note="per-lane shared lists; shared-memory issue bound")
    add("fwd", "merge", rows * kp * 8 + T * H * k * 16, note="thread per (t, h)")
    add("fwd", "experts (forward" + (", z kept)" if train else ")"),
        2 * T * H * k * d * wbytes + 2 * f * T * d + T * H * k * (20 if train else 16),
        4.0 * T * H * k * d, "gather")
    if not train:
        return out
    add("fwd", "running_update", 4 * f * H * dk)

    dense_rows = 2 * T * H * k * d * wbytes
    if after or wbytes == 4:
        add("bwd", "experts (backward)", dense_rows + 3 * f * T * d + T * H * k * 20,
            4.0 * T * H * k * d, "gather")
    else:
        # bf16 backward with 2-byte scalar loads: 64 B per warp load; about 16
        # warps per SM with 2 loads in flight each.
        inflight = GPUS["H100"]["sms"] * 16 * 2 * 64
        add("bwd", "experts (backward)", dense_rows + 3 * f * T * d + T * H * k * 20,
            4.0 * T * H * k * d, "gather",
            serial=lambda g: dense_rows / (g["sms"] * 16 * 2 * 64 / LATENCY_S),
            note=f"2-byte loads: {inflight / 1e3:.0f} KB in flight")
    for what, items, bits in (("expert", T * H * k, math.ceil(math.log2(N))),
                              ("sub-key", 2 * T * H * k, math.ceil(math.log2(H * 2 * n)))):
        passes = math.ceil(bits / 8)
        add("bwd", f"{what} keys + radix sort (CUB)", items * (8 + passes * 16 + 8))
        if after:
            add("bwd", f"{what} run starts", items * 8, note="grid-wide: flags, scan, scatter")
        else:
            tiles = math.ceil(items / 1024)
            add("bwd", f"{what} run starts", items * 8,
                serial=lambda g, tiles=tiles: tiles * (LATENCY_S + 300 / g["clock"] * 1.5),
                note=f"one block, {tiles} serial tiles")
    runs = distinct(T * H * k, N)
    # expert_grads: x and dy rows per entry (from L2 while [T, d] fits), two
    # gradient rows of f32 written per distinct expert.
    xdy = 2 * f * T * d
    reread = 0 if 2 * xdy < GPUS["H100"]["l2"] else 2 * f * T * H * k * d
    add("bwd", "expert_grads (sparse rows)", 2 * f * runs * d + xdy + reread,
        4.0 * T * H * k * d, "gather", note=f"{runs / 1e3:.0f} k distinct rows")
    add("bwd", "query_grad", f * T * H * dk + T * H * k * 12, 2.0 * T * H * k * dk)
    krows = min(distinct(2 * T * H * k, H * 2 * n), H * 2 * n)
    add("bwd", "keys_grad", f * krows * dk // 2 + f * T * H * dk, 2.0 * T * H * k * dk)
    # Norm backward (g and qhat read for the sums, read again, dq written)
    # and the bias's column sums (dq read): 6 passes.
    nb_bytes = 6 * f * T * H * dk
    if after:
        add("bwd", "norm_backward + column_sums", nb_bytes, note="two-level")
    else:
        add("bwd", "norm_backward + column_sums", nb_bytes,
            serial=lambda g: nb_bytes / (64 * 8 * 128 / LATENCY_S), note="64 blocks")
    add("bwd", "dWq, dx GEMMs (cuBLAS)", f * (2 * T * H * dk + 2 * T * d + 2 * H * dk * d),
        4.0 * T * d * H * dk, "gemm")
    return out


def optimizer(T, wbytes):
    """Adam step: dense Wq and keys (p, g, m, v read; p, m, v written), the
    distinct expert rows of both tables (lazy: the same per element)."""
    d, H, k, dk, n = (CFG[x] for x in ("d", "H", "k", "dk", "n"))
    dense = H * dk * d + H * 2 * n * dk // 2
    runs = distinct(T * H * k, n * n)
    return dense * 28 + 2 * runs * d * (2 * wbytes + 4 * 5)


def demand(kern, g):
    """A kernel's time bound by HBM, by FLOPs, and by its latency or issue
    term, alone on the GPU (all 0 for a kernel the design lacks)."""
    if kern["absent"]:
        return 0.0, 0.0, 0.0
    eff = {"stream": EFF_STREAM, "gather": EFF_GATHER, "gemm": EFF_STREAM,
           "tc": EFF_STREAM}[kern["kind"]]
    t_bytes = kern["bytes"] / (g["bw"] * eff)
    t_flops = kern["flops"] / (g["flops"] * EFF_GEMM) if kern["kind"] == "gemm" else \
        kern["flops"] / (g["tc"] * EFF_TC) if kern["kind"] == "tc" else kern["flops"] / g["flops"]
    return t_bytes, t_flops, kern["serial"](g)


def predict(kern, g):
    if kern["absent"]:
        return 0.0, "-"
    t_bytes, t_flops, t_serial = demand(kern, g)
    t = max(t_bytes, t_flops, t_serial) + LAUNCH_S
    bound = max((t_bytes, "HBM"), (t_flops, "FLOP"), (t_serial, "latency/issue"))[1]
    return t, bound


# The chunked forward (kernels/backend.c run_chunks): chunk c+1's retrieval
# (query GEMM, bias/norm, sub-key GEMMs, subkey_topk, merge) on one stream
# beside chunk c's expert kernel on another.  Assumptions, stated once: the
# two share the SMs and HBM, so a pair takes the longest of either stream
# alone, their HBM-bound times added, and their SM-bound (FLOP or issue)
# times added, plus OVERLAP_LOSS of the shorter stream (imperfect sharing:
# SM partitioning, L2 and issue contention; a guess, to be measured); chunks
# of 512 tokens or more keep the GEMMs' efficiency.  The first retrieval
# (fill) and the last experts (drain) run alone.  Each chunk is counted as a
# call of its size, so the keys' bf16 copy (made once per call by the code)
# is counted per chunk: about 4 us (H100) too much per extra chunk.
OVERLAP_LOSS = 0.25


def auto_chunks(T):
    """backend.c chunk_count: one chunk per 1024 tokens, at most 8."""
    return max(1, min(8, T // 1024))


def stream_demand(kerns, g):
    """Kernels in order on one stream: duration alone (launches included),
    HBM-bound time, SM-bound time."""
    dur = mem = sm = 0.0
    for kern in kerns:
        t_bytes, t_flops, t_serial = demand(kern, g)
        dur += max(t_bytes, t_flops, t_serial) + LAUNCH_S
        mem += t_bytes
        sm += max(t_flops, t_serial)
    return dur, mem, sm


def pipelined(T, wbytes, g, chunks=None):
    """Predicted inference forward in `chunks` chunks (auto_chunks when None)."""
    c = chunks or auto_chunks(T)
    ks = kernels(T // c, wbytes, "after", False)
    experts = [k for k in ks if k["name"].startswith("experts")]
    dr, mr, sr = stream_demand([k for k in ks if k not in experts], g)
    de, me, se = stream_demand(experts, g)
    pair = max(dr, de, mr + me, sr + se) + OVERLAP_LOSS * min(dr, de)
    return dr + (c - 1) * pair + de


def floor_bytes(T, wbytes, train):
    d, H, k, dk, n = (CFG[x] for x in ("d", "H", "k", "dk", "n"))
    f = 4
    weights = f * (H * dk * d + H * n * dk)
    b = weights + 2 * f * T * d + 2 * T * H * k * d * wbytes
    if train:
        runs = distinct(T * H * k, n * n)
        b += 2 * f * T * d + 2 * T * H * k * d * wbytes + 2 * f * runs * d + weights
    return b


def table(T, wbytes, phase_set, label):
    lines = [f"#### {label}, T = {T}, {'f32' if wbytes == 4 else 'bf16'} expert tables",
             "",
             "| kernel | MB moved | GFLOP | bound before / after | before H100 / H200 (us) "
             "| after H100 / H200 (us) |",
             "|---|---|---|---|---|---|"]
    tot = {("before", "H100"): 0, ("before", "H200"): 0, ("after", "H100"): 0, ("after", "H200"): 0}
    train = "bwd" in phase_set
    before = kernels(T, wbytes, "before", train)
    after = kernels(T, wbytes, "after", train)
    for kb, ka in zip(before, after):
        cells, bounds = [], []
        for design, kern in (("before", kb), ("after", ka)):
            ts = []
            for gname in ("H100", "H200"):
                t, bound = predict(kern, GPUS[gname])
                tot[(design, gname)] += t
                ts.append(t)
                if gname == "H100":
                    bounds.append(bound)
            cells.append(f"{ts[0] * 1e6:,.0f} / {ts[1] * 1e6:,.0f}")
        name = kb["name"] if kb["name"] == ka["name"] else f"{kb['name']} / {ka['name']}"
        lines.append(f"| {name} | {ka['bytes'] / 1e6:,.1f} | {ka['flops'] / 1e9:,.1f} | "
                     f"{' / '.join(bounds)} | {cells[0]} | {cells[1]} |")
    fb = floor_bytes(T, wbytes, train)
    fl = [fb / GPUS[g]["bw"] for g in ("H100", "H200")]
    lines.append(f"| **sum** | | | | {tot[('before', 'H100')] * 1e6:,.0f} / "
                 f"{tot[('before', 'H200')] * 1e6:,.0f} | {tot[('after', 'H100')] * 1e6:,.0f} / "
                 f"{tot[('after', 'H200')] * 1e6:,.0f} |")
    if not train:
        for gname in ("H100", "H200"):
            tot[("after", gname)] = pipelined(T, wbytes, GPUS[gname])
        lines.append(f"| **in {auto_chunks(T)} chunks** (retrieval beside experts) | | | | | "
                     f"{tot[('after', 'H100')] * 1e6:,.0f} / {tot[('after', 'H200')] * 1e6:,.0f} |")
    lines.append(f"| **HBM floor** ({fb / 1e6:,.0f} MB) | | | | {fl[0] * 1e6:,.0f} / "
                 f"{fl[1] * 1e6:,.0f} | |")
    lines.append(f"| **sum / floor** | | | | {tot[('before', 'H100')] / fl[0]:.2f} / "
                 f"{tot[('before', 'H200')] / fl[1]:.2f} | {tot[('after', 'H100')] / fl[0]:.2f} / "
                 f"{tot[('after', 'H200')] / fl[1]:.2f} |")
    return "\n".join(lines)


def summary():
    """One line per (step, T, tables): predicted sums before and after, the
    HBM floor, and their ratios, H100 / H200."""
    print("| step | T | tables | before (us) | after (us) | HBM floor (us) "
          "| after / floor |")
    print("|---|---|---|---|---|---|---|")
    for train in (False, True):
        for T in (4096, 32768):
            for wbytes in (4, 2):
                tot = {}
                for design in ("before", "after"):
                    for gname in ("H100", "H200"):
                        tot[design, gname] = sum(predict(k, GPUS[gname])[0]
                                                 for k in kernels(T, wbytes, design, train))
                        if design == "after" and not train:
                            tot[design, gname] = pipelined(T, wbytes, GPUS[gname])
                fl = {g: floor_bytes(T, wbytes, train) / GPUS[g]["bw"] for g in ("H100", "H200")}
                cell = lambda f: " / ".join(f"{f(g):,.0f}" for g in ("H100", "H200"))
                ratio = lambda t, f: " / ".join(f"{t['after', g] / f[g]:.2f}"
                                                for g in ("H100", "H200"))
                print(f"| {'training step' if train else 'forward'} | {T} | "
                      f"{'f32' if wbytes == 4 else 'bf16'} | "
                      f"{cell(lambda g: tot['before', g] * 1e6)} | "
                      f"{cell(lambda g: tot['after', g] * 1e6)} | {cell(lambda g: fl[g] * 1e6)} | "
                      f"{ratio(tot, fl)} |")


def chunk_table():
    """The chunked forward against its chunk count, T = 4096 and 32768."""
    print("| T | tables | " + " | ".join(f"{c} chunk{'s' if c > 1 else ''}" for c in CHUNKS)
          + " |")
    print("|---|---|" + "---|" * len(CHUNKS))
    for T in (4096, 32768):
        for wbytes in (4, 2):
            cells = [" / ".join(f"{pipelined(T, wbytes, GPUS[g], c) * 1e6:,.0f}"
                                for g in ("H100", "H200")) for c in CHUNKS]
            print(f"| {T} | {'f32' if wbytes == 4 else 'bf16'} | " + " | ".join(cells) + " |")


CHUNKS = (1, 2, 4, 8, 16)


def main():
    if "--summary" in sys.argv:
        summary()
        return
    if "--chunks" in sys.argv:
        chunk_table()
        return
    if "--design" in sys.argv:
        for kern in kernels(4096, 4, "before", True):
            print(f"before {kern['name']}: {kern['note']}")
        for kern in kernels(4096, 4, "after", True):
            print(f"after  {kern['name']}: {kern['note']}")
        return
    for T in (4096, 32768):
        for wbytes in (4, 2):
            print(table(T, wbytes, {"fwd"}, "Forward (inference)"))
            print()
            print(table(T, wbytes, {"fwd", "bwd"}, "Training step (forward_train + backward)"))
            print()
    print("#### Adam step (dense Wq and keys, distinct expert rows of both tables)")
    print()
    print("| T | tables | MB moved | H100 / H200 (us) |")
    print("|---|---|---|---|")
    for T in (4096, 32768):
        for wbytes in (4, 2):
            b = optimizer(T, wbytes)
            ts = [b / (GPUS[g]["bw"] * EFF_GATHER) * 1e6 for g in ("H100", "H200")]
            print(f"| {T} | {'f32' if wbytes == 4 else 'bf16'} | {b / 1e6:,.0f} | "
                  f"{ts[0]:,.0f} / {ts[1]:,.0f} |")


if __name__ == "__main__":
    main()
