"""pytorch_baseline.py: peer against lucidrains' PEER-pytorch on the CPU.

Run through bench/baselines/run.sh, which makes the virtual environment
(bench/baselines/.venv) with the pinned packages of requirements.txt.  Steps:

1. weights: `peer init` writes a peer weight file per config and
   `peer convert --to peer-pytorch` writes the same layer in PEER-pytorch's
   layout (so the converter is part of what is checked);
2. equivalence: both layers on the same x and dy: expert ids, y, dx and every
   parameter gradient, within tolerance (tokens whose ids differ because of a
   near-tie are reported, checked to be near-ties, and left out of the rest);
3. timing: forward and forward+backward, each side in its own subprocess
   (same threads: torch.set_num_threads and peer's n_threads), median of
   several runs over a rotating pool of input batches; peak memory is the
   process's resident high-water mark (VmHWM) during the timed phase, reset
   after loading with /proc/self/clear_refs, next to the resident size after
   loading (VmRSS), so loading spikes do not count.

peer is called in-process through the repository's binding, peerlayer
(tools/python), on the libpeer.so given by --lib.  PEER-pytorch is configured as PEER.md's layer:
softmax gates (non_competing_scores=False), top-k per head, no pre-norm, no
dropout, GELU, product_key_topk = k (peer's subkey_top_k default).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CONFIGS = {
    # name: (d_model, n_heads, d_key, n_subkeys, top_k)
    "ref": (512, 8, 256, 1024, 16),
    "small": (256, 8, 256, 256, 16),
    "tiny": (64, 4, 32, 32, 8),  # equivalence only, quick
}

# ------------------------------------------------------- peer (peerlayer)


def load_peerlayer(lib_path):
    """The repository's Python binding (tools/python/peerlayer) over lib_path;
    it checks the library's version and struct sizes when it loads it."""
    os.environ["PEER_LIBRARY"] = lib_path
    sys.path.insert(0, os.path.join(ROOT, "tools", "python"))
    import peerlayer
    return peerlayer


class Peer:
    """A peer layer loaded from a weight file, with a training context and
    sparse gradient buffers for up to max_tokens tokens (allocated once, so
    the timed steps allocate nothing but what the binding's calls do)."""

    def __init__(self, lib_path, weights, threads, max_tokens):
        peerlayer = load_peerlayer(lib_path)
        self.layer = peerlayer.Layer.load(weights, threads=threads)
        self.ctx = self.layer.context(max_tokens)
        self.grads = self.layer.grads(max_tokens)

    def close(self):
        self.ctx = self.grads = None
        self.layer.close()

    def forward(self, x, y, ids=None):
        self.layer.forward(x, out=y, indices=False if ids is None else ids)

    def forward_backward(self, x, y, dy, dx):
        self.layer.forward_train(self.ctx, x, out=y)
        self.layer.backward(self.ctx, dy, self.grads, dx=dx)

    def expert_grads(self):
        g = self.grads
        return g.expert_rows, g.experts_down, g.experts_up


# ------------------------------------------------------------- PEER-pytorch


def torch_layer(cfg, pt_weights, threads):
    """PEER-pytorch's PEER configured as PEER.md's layer, weights from the
    converted file (built on the meta device, so the weights are held once)."""
    import torch
    from PEER_pytorch import PEER
    from safetensors.torch import load_file
    torch.set_num_threads(threads)
    d, H, dkey, n, k = cfg
    with torch.device("meta"):
        m = PEER(d, heads=H, num_experts=n * n, num_experts_per_head=k, dim_key=dkey // 2,
                 product_key_topk=k, non_competing_scores=False, pre_rmsnorm=False, dropout=0.0)
    # Cloned: the tensors safetensors returns may map the file lazily, which
    # would hide the weights from the resident size measured after loading.
    state = {name: t.clone() for name, t in load_file(pt_weights).items()}
    m.load_state_dict(state, assign=True, strict=True)
    return m


# ------------------------------------------------------------------ helpers


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        sys.exit("pytorch_baseline: %s failed: %s" % (" ".join(args), r.stderr.strip()))
    return r.stdout


def prepare(cli, workdir, name):
    """peer weight file and its PEER-pytorch conversion for config `name`."""
    d, H, dkey, n, k = CONFIGS[name]
    w = os.path.join(workdir, name + ".peer.safetensors")
    pt = os.path.join(workdir, name + ".pytorch.safetensors")
    if not (os.path.exists(w) and os.path.exists(pt)):
        sh(cli, "init", "--config", "d_model=%d,n_heads=%d,d_key=%d,n_subkeys=%d,top_k=%d"
           % (d, H, dkey, n, k), "--seed", "7", "--out", w)
        sh(cli, "convert", "--to", "peer-pytorch", w, "--out", pt)
    return w, pt


def rel_err(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)


def memory_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -------------------------------------------------------------- equivalence


def equivalence(args, name, tokens):
    import numpy as np
    import torch
    cfg = CONFIGS[name]
    d, H, dkey, n, k = cfg
    dk = dkey // 2
    w, pt = prepare(args.cli, args.workdir, name)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    dy = rng.standard_normal((tokens, d), dtype=np.float32)

    m = torch_layer(cfg, pt, args.threads)
    seen = {}
    m.weight_down_embed.register_forward_hook(lambda mod, inp, out: seen.update(ids=inp[0]))
    m.weight_down_embed.sparse = m.weight_up_embed.sparse = True  # same math, no N x d grads
    xt = torch.from_numpy(x).view(1, tokens, d).requires_grad_(True)
    yt = m(xt)
    ids_t = seen["ids"].reshape(tokens, H, k).numpy()

    p = Peer(args.lib, w, args.threads, tokens)
    y = np.zeros((tokens, d), np.float32)
    ids = np.zeros((tokens, H, k), np.int64)
    p.forward(x, y, ids)

    # Lists whose ids differ must be near-ties: the two id lists' exact scores
    # (float64 from the same weights) agree within 1e-5 relative.
    q = x.astype(np.float64) @ m.to_queries[0].weight.detach().numpy().astype(np.float64).T
    q = q.reshape(tokens, 2, H, dk)
    keys = m.keys.detach().numpy().astype(np.float64)  # [H, n, 2, dk]
    s = np.einsum("tphj,hapj->tpha", q, keys)  # [T, 2, H, n]

    def score(t, h, i):
        return s[t, 0, h, i // n] + s[t, 1, h, i % n]

    bad_tokens, differing, worst_gap = set(), 0, 0.0
    for t, h in zip(*np.nonzero((ids != ids_t).any(axis=2))):
        differing += 1
        bad_tokens.add(int(t))
        a = sorted(score(t, h, i) for i in ids[t, h])
        b = sorted(score(t, h, i) for i in ids_t[t, h])
        scale = max(abs(v) for v in a + b)
        worst_gap = max(worst_gap, max(abs(u - v) for u, v in zip(a, b)) / scale)
    good = np.array([t not in bad_tokens for t in range(tokens)])

    # Backward with dy zeroed on the tokens whose ids differ, so that every
    # gradient is comparable.
    dy_c = dy * good[:, None]
    yt.backward(torch.from_numpy(dy_c).view(1, tokens, d))
    dx = np.zeros_like(x)
    y2 = np.zeros_like(x)
    p.forward_backward(x, y2, dy_c, dx)

    def sparse_rows(g):
        g = g.coalesce()
        return g.indices()[0].numpy(), g.values().numpy()

    def expert_err(rows_p, vals_p, rows_t, vals_t):
        union = np.union1d(rows_p, rows_t)
        a = np.zeros((len(union), d)); b = np.zeros((len(union), d))
        a[np.searchsorted(union, rows_p)] = vals_p
        b[np.searchsorted(union, rows_t)] = vals_t
        return rel_err(a, b)

    rows_p, gdown_p, gup_p = p.expert_grads()
    # torch's query rows and keys back into peer's layout
    gq_t = m.to_queries[0].weight.grad.numpy().reshape(2, H, dk, d).transpose(1, 0, 2, 3)
    gkeys_t = m.keys.grad.numpy().transpose(0, 2, 1, 3)
    r = {
        "config": name, "tokens": tokens,
        "id_lists": tokens * H, "id_lists_differing": differing,
        "worst_near_tie_rel_gap": worst_gap,
        "y_rel_err": rel_err(y[good], yt.detach().numpy().reshape(tokens, d)[good]),
        "y_train_vs_inference_rel_err": rel_err(y2, y),
        "dx_rel_err": rel_err(dx[good], xt.grad.numpy().reshape(tokens, d)[good]),
        "query_weight_grad_rel_err": rel_err(p.grads.query_weight, gq_t.reshape(H * dkey, d)),
        "keys_grad_rel_err": rel_err(p.grads.keys, gkeys_t),
        "experts_down_grad_rel_err": expert_err(rows_p, gdown_p,
                                                *sparse_rows(m.weight_down_embed.weight.grad)),
        "experts_up_grad_rel_err": expert_err(rows_p, gup_p,
                                              *sparse_rows(m.weight_up_embed.weight.grad)),
    }
    p.close()  # the timing workers that follow get the memory back
    del m, yt, xt
    errs = [v for key, v in r.items() if key.endswith("rel_err")]
    r["ok"] = bool(max(errs) < args.tol and differing <= 0.01 * tokens * H
                   and worst_gap < 1e-5)
    return r


# ------------------------------------------------------------------- timing


def worker(args):
    """One side, one config, one mode, in its own process: JSON on stdout."""
    import numpy as np
    cfg = CONFIGS[args.config]
    d = cfg[0]
    T = args.tokens
    w, pt = prepare(args.cli, args.workdir, args.config)
    rng = np.random.default_rng(5)
    pool = [rng.standard_normal((T, d), dtype=np.float32) for _ in range(args.pool)]
    dy = rng.standard_normal((T, d), dtype=np.float32)
    if args.side == "peer":
        p = Peer(args.lib, w, args.threads, T)
        y, dx = np.zeros((T, d), np.float32), np.zeros((T, d), np.float32)
        if args.mode == "fwd":
            step = lambda x: p.forward(x, y)
        else:
            step = lambda x: p.forward_backward(x, y, dy, dx)
    else:
        import torch
        m = torch_layer(cfg, pt, args.threads)
        if args.sparse_embed:
            m.weight_down_embed.sparse = m.weight_up_embed.sparse = True
        pool = [torch.from_numpy(x).view(1, T, d) for x in pool]
        dyt = torch.from_numpy(dy).view(1, T, d)
        if args.mode == "fwd":
            def step(x):
                with torch.no_grad():
                    m(x)
        else:
            def step(x):
                m.zero_grad(set_to_none=True)
                xg = x.requires_grad_(True)
                m(xg).backward(dyt)
                xg.grad = None
    rss_loaded = memory_kib("VmRSS")
    reset_peak()
    times = []
    for r in range(args.repeats + 1):
        x = pool[r % len(pool)]
        t0 = time.perf_counter()
        step(x)
        if r:  # the first run warms up
            times.append(time.perf_counter() - t0)
    print(json.dumps({"side": args.side, "config": args.config, "mode": args.mode,
                      "ms": 1e3 * statistics.median(times),
                      "ms_all": [round(1e3 * t, 2) for t in times],
                      "rss_loaded_mib": rss_loaded / 1024, "peak_mib": memory_kib("VmHWM") / 1024}))


def run_worker(args, side, config, mode, sparse=False):
    cmd = [sys.executable, __file__, "--worker", side, "--config", config, "--mode", mode,
           "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads",
           str(args.threads), "--lib", args.lib, "--cli", args.cli, "--workdir", args.workdir]
    if sparse:
        cmd.append("--sparse-embed")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit("pytorch_baseline: worker %s %s %s failed:\n%s" % (side, config, mode, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "lib", "libpeer.so"))
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "bin", "peer"))
    ap.add_argument("--workdir", default="/tmp/peer-baseline")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="batch for timing")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--configs", default="small,ref")
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--sparse-embed", action="store_true",
                    help="also time PEER-pytorch with sparse embedding gradients")
    ap.add_argument("--worker", choices=["peer", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["fwd", "fwdbwd"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.worker:
        args.side = args.worker
        return worker(args)

    configs = args.configs.split(",")
    import torch
    import PEER_pytorch  # noqa: F401 (version check below)
    from importlib.metadata import version
    print("peer-pytorch %s, torch %s, threads %d, load average %s" % (
        version("peer-pytorch"), torch.__version__, args.threads,
        " ".join("%.2f" % v for v in os.getloadavg())))
    failed = False
    if not args.skip_equivalence:
        for name in ["tiny"] + [c for c in configs if c != "tiny"]:
            r = equivalence(args, name, 64 if name == "ref" else 256)
            failed |= not r["ok"]
            print("equivalence %s" % json.dumps(r))
    if not args.skip_timing:
        print("| config | mode | peer ms | PEER-pytorch ms | speed-up (theirs/ours) | "
              "peer peak MiB | PEER-pytorch peak MiB | after load MiB (peer / PEER-pytorch) |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for name in configs:
            for mode in ["fwd", "fwdbwd"]:
                sides = [("torch", False)] + ([("torch", True)] if args.sparse_embed
                                               and mode == "fwdbwd" else [])
                ours = run_worker(args, "peer", name, mode)
                for side, sparse in sides:
                    theirs = run_worker(args, side, name, mode, sparse)
                    label = mode + (" (sparse embedding grads)" if sparse else "")
                    print("| %s | %s | %.1f | %.1f | %.2fx | %.0f | %.0f | %.0f / %.0f |" % (
                        name, label, ours["ms"], theirs["ms"], theirs["ms"] / ours["ms"],
                        ours["peak_mib"], theirs["peak_mib"], ours["rss_loaded_mib"],
                        theirs["rss_loaded_mib"]), flush=True)
                    print("  runs (ms): peer %s; PEER-pytorch %s" % (ours["ms_all"],
                                                                    theirs["ms_all"]), flush=True)
    print("load average at the end: %s" % " ".join("%.2f" % v for v in os.getloadavg()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
