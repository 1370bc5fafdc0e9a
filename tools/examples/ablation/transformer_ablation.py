"""A small causal transformer whose feed-forward slots hold PEER, a dense MLP
or a top-2 MoE, trained on local text: the paper's expert-count ablation at
laptop scale.

  python transformer_ablation.py --out runs/ [--data FILE] [--experts 32^2,64^2,128^2]

Text: --data FILE, or by default the sources of Python's standard library (on
every machine), read as bytes (vocabulary 256).  Models, at equal active
parameters in the FFN slots (H*k hidden neurons per token):
  peer      PEER with n^2 experts for each n of --experts, with and without
            query batch norm (peerlayer.nn.PEER);
  dense     an MLP with H*k hidden units;
  moe       --moe-experts MLPs of H*k/2 hidden units, top-2 routing with a
            capacity factor and the Switch load-balancing loss (plain torch).
Reports per run: validation loss and perplexity, expert usage and unevenness
(peerlayer.usage_metrics, PEER.md's metrics; for MoE over its experts),
training tokens/s, active and total parameters; as a table on stdout,
results.csv and results.json in --out, and a gnuplot PNG when gnuplot is
installed.  Finished runs are kept in results.json and skipped on a rerun
(resume after an interruption by running the same command)."""

import argparse
import csv
import glob
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import peerlayer
import peerlayer.optim
from peerlayer.nn import PEER


def load_text(path, limit):
    if path:
        with open(path, "rb") as f:
            data = f.read(limit)
    else:
        root = os.path.dirname(os.__file__)
        parts, size = [], 0
        for p in sorted(glob.glob(os.path.join(root, "*.py"))):
            with open(p, "rb") as f:
                parts.append(f.read())
            size += len(parts[-1])
            if size >= limit:
                break
        data = b"".join(parts)[:limit]
    a = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(0.9 * len(a))
    return a[:split], a[split:]


class MoE(nn.Module):
    """Top-2 mixture of MLP experts (Switch/GShard style): each token goes to
    its two best experts, weighted by the renormalised router probabilities;
    an expert takes at most capacity = cf * 2 * T / E tokens (the rest of its
    assignments are dropped); aux = E * sum_i f_i * P_i."""

    def __init__(self, d, n_experts, hidden, capacity_factor):
        super().__init__()
        self.router = nn.Linear(d, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(n_experts, d, hidden) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, d) / math.sqrt(hidden))
        self.E, self.cf = n_experts, capacity_factor
        self.aux = torch.zeros(())
        self.mass = torch.zeros(n_experts, dtype=torch.float64)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T = x.shape[0]
        probs = self.router(x).softmax(-1)
        top_p, top_i = probs.topk(2, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        capacity = max(1, int(self.cf * 2 * T / self.E))
        y = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            tok, slot = tok[:capacity], slot[:capacity]
            if tok.numel() == 0:
                continue
            h = F.gelu(x[tok] @ self.w1[e]) @ self.w2[e]
            y.index_add_(0, tok, h * top_p[tok, slot].unsqueeze(-1))
        f = F.one_hot(top_i[:, 0], self.E).float().mean(0)
        self.aux = self.E * (f * probs.mean(0)).sum()
        if not self.training:
            self.mass += torch.zeros(self.E, dtype=torch.float64).index_add_(
                0, top_i.reshape(-1), top_p.reshape(-1).double())
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, d, n_head, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n_head, self.ffn = n_head, ffn

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, d))
        return x + self.ffn(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, d, n_layer, n_head, context, make_ffn):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, n_head, make_ffn()) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def ffn_factory(kind, args, n=None, batchnorm=False):
    d, H, k = args.d_model, args.heads, args.top_k
    if kind == "peer":
        cfg = (f"d_model={d},n_heads={H},d_key={args.d_key},n_subkeys={n},top_k={k},"
               f"query_norm={'batchnorm' if batchnorm else 'none'}")
        return lambda: PEER(cfg, threads=args.threads)
    if kind == "dense":
        return lambda: nn.Sequential(nn.Linear(d, H * k), nn.GELU(), nn.Linear(H * k, d))
    return lambda: MoE(d, args.moe_experts, max(1, H * k // 2), args.capacity_factor)


def count_params(model, kind, args):
    total = sum(p.numel() for p in model.parameters())
    active = total
    for m in model.modules():
        if isinstance(m, PEER):
            active += m.n_active_parameters() - m.n_parameters()
        elif isinstance(m, MoE):
            per_expert = m.w1[0].numel() + m.w2[0].numel()
            active -= (m.E - 2) * per_expert
    return active, total


def batch(data, args, gen):
    i = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
    x = torch.stack([data[j:j + args.context] for j in i])
    y = torch.stack([data[j + 1:j + 1 + args.context] for j in i])
    return x, y


def evaluate(model, val, args):
    model.eval()
    peers = [m for m in model.modules() if isinstance(m, PEER)]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        m.mass.zero_()
    z = [np.zeros(p.layer.n_experts) for p in peers]
    hooks = []
    for p, zz in zip(peers, z):
        def hook(mod, inp, out, zz=zz):
            x = inp[0].reshape(-1, mod.layer.config["d_model"]).float().numpy()
            ids, _, gates = mod.layer.retrieve(x)
            np.add.at(zz, ids.ravel(), gates.ravel().astype(np.float64))
        hooks.append(p.register_forward_hook(hook))
    gen = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y = batch(val, args, gen)
            losses.append(F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item())
    for h in hooks:
        h.remove()
    model.train()
    metrics = [peerlayer.usage_metrics(zz) for zz in z] + \
              [peerlayer.usage_metrics(m.mass.numpy()) for m in moes]
    usage = float(np.mean([u for u, _ in metrics])) if metrics else float("nan")
    uneven = float(np.mean([e for _, e in metrics])) if metrics else float("nan")
    return float(np.mean(losses)), usage, uneven


def run_one(name, kind, make_ffn, train, val, args):
    torch.manual_seed(args.seed)
    model = GPT(args.d_model, args.layers, args.attn_heads, args.context, make_ffn)
    opt = peerlayer.optim.AdamW(model, lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        for g in opt.param_groups:  # linear warmup, cosine decay
            w = min(1.0, (step + 1) / max(1, args.steps // 10))
            g["lr"] = args.lr * w * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        x, y = batch(train, args, gen)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        aux = sum(m.aux for m in model.modules() if isinstance(m, MoE))
        opt.zero_grad()
        (loss + args.aux_weight * aux).backward()
        opt.step()
        tokens += x.numel()
    tok_s = tokens / (time.perf_counter() - t0)
    val_loss, usage, uneven = evaluate(model, val, args)
    active, total = count_params(model, kind, args)
    return {"run": name, "model": kind, "val_loss": round(val_loss, 4),
            "ppl": round(math.exp(val_loss), 3), "usage": round(usage, 4),
            "unevenness": round(uneven, 4), "tokens_per_s": round(tok_s, 1),
            "active_params": active, "total_params": total}


def plot(out, rows):
    peer = [r for r in rows if r["model"] == "peer"]
    if not peer or subprocess.run(["which", "gnuplot"], capture_output=True).returncode:
        return
    dat = os.path.join(out, "plot.dat")
    with open(dat, "w") as f:
        for bn in ("none", "bn"):
            for r in peer:
                if r["run"].endswith("-" + bn):
                    f.write(f"{r['total_params']} {r['val_loss']}\n")
            f.write("\n\n")
    others = "".join(f", {r['val_loss']} title '{r['run']}'" for r in rows if r["model"] != "peer")
    script = (f"set terminal png size 800,500; set output '{os.path.join(out, 'plot.png')}';"
              "set logscale x; set xlabel 'total parameters'; set ylabel 'val loss (nats per byte)';"
              f"plot '{dat}' index 0 with linespoints title 'PEER', "
              f"'{dat}' index 1 with linespoints title 'PEER + query BN'{others}")
    subprocess.run(["gnuplot", "-e", script], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ablation-out")
    ap.add_argument("--data", default=None, help="text file (default: Python's stdlib sources)")
    ap.add_argument("--chars", type=int, default=4_000_000)
    ap.add_argument("--experts", default="32^2,64^2,128^2")
    ap.add_argument("--models", default="peer,dense,moe")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attn-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--heads", type=int, default=4, help="PEER retrieval heads H")
    ap.add_argument("--top-k", type=int, default=8, help="PEER experts per head k")
    ap.add_argument("--d-key", type=int, default=64)
    ap.add_argument("--moe-experts", type=int, default=8)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    train, val = load_text(args.data, args.chars)
    kinds = args.models.split(",")
    plan = []
    if "peer" in kinds:
        for spec in args.experts.split(","):
            n = int(spec.split("^")[0]) if "^" in spec else math.isqrt(int(spec))
            for bn in (False, True):
                plan.append((f"peer-{n}^2-{'bn' if bn else 'none'}", "peer",
                             ffn_factory("peer", args, n, bn)))
    if "dense" in kinds:
        plan.append(("dense", "dense", ffn_factory("dense", args)))
    if "moe" in kinds:
        plan.append((f"moe-{args.moe_experts}x2", "moe", ffn_factory("moe", args)))
    for name, kind, make in plan:
        if name in done:
            print(f"{name}: done (results.json), skipped", file=sys.stderr)
            continue
        print(f"{name}: training {args.steps} steps", file=sys.stderr)
        done[name] = run_one(name, kind, make, train, val, args)
        with open(path + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(path + ".tmp", path)
    rows = [done[n] for n, _, _ in plan]
    cols = list(rows[0])
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    plot(args.out, rows)


if __name__ == "__main__":
    main()
