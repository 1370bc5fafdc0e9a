"""peerlayer.nn.PEER(..., process_group=pg): the sharded torch module, two gloo
processes on this machine.  Each rank runs the sharded module beside an
unsharded nn.PEER made from the same seed, on the same data: expert ids
identical; y, x's gradient and every gradient (the rank's columns of the
expert tables) within 1e-6 relative; parameters after steps of torch's SGD,
Adam, SparseAdam, peerlayer.optim.AdamW and the library's optimizer
(layer_optimizer); state_dict per rank, unsharded state_dicts and weight
files sliced in, full_state_dict and merged shard files back out; the
refusals (d_model not divisible by the world size, configs or seeds that
differ between ranks, CUDA from a library without it, moves, pickling).

The two ranks are spawned once (module fixture); each scenario's failures
are written per rank and asserted by its own test."""

import datetime
import json
import os
import time
import traceback

import numpy as np
import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import peerlayer  # noqa: E402
import peerlayer.optim  # noqa: E402
import peerlayer.shard  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402

WORLD, TOL, STEPS = 2, 1e-6, 3
BASE = "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4"
# (batch norm makes query.bias's gradient zero up to rounding: no bias with it)
CONFIGS = [BASE + ",query_norm=batchnorm",
           "d_model=32,n_heads=3,d_key=8,n_subkeys=8,top_k=3,subkey_top_k=5,shared_keys=1,"
           "query_bias=1,activation=relu,gate=sigmoid"]
BF16 = BASE + ",weight_dtype=bf16,activation=silu,gate=relu"
SCENARIOS = ["matches_unsharded", "optimizers", "state_dict", "refusals", "module"]


def rel(a, b):
    a, b = (np.asarray(t.detach().cpu().double().numpy() if torch.is_tensor(t) else t,
                       np.float64) for t in (a, b))
    scale = np.abs(b).max() if b.size else 0.0
    diff = np.abs(a - b).max() if b.size else 0.0
    return diff / scale if scale > 0 else diff


def dense(t):
    return t.to_dense() if t.is_sparse else t


def pair(config, seed, **kw):
    """(unsharded, sharded) modules made from one seed.  The batch norm's
    bias starts at zero: it is given values of the other parameters' size,
    so that comparisons relative to its size are not relative to one step."""
    full = PEER(config, seed=seed, threads=1, **kw)
    shard = PEER(config, seed=seed, threads=1, process_group=None, **kw)
    if full.config["query_norm"] == "batchnorm":
        bias = torch.rand(full.query.norm.bias.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for m in (full, shard):
                m.query.norm.bias.copy_(bias - 0.5)
    return full, shard


def compare_params(full, shard, expect, what, tol=TOL):
    cols = slice(shard.columns.start, shard.columns.stop)
    theirs = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        ref = theirs[name][:, cols] if name.startswith("experts.") else theirs[name]
        expect(rel(p.float(), ref.float()) <= tol,
               f"{what}: {name} differs by {rel(p.float(), ref.float()):.3g}")


def compare_grads(full, shard, expect, what):
    cols = slice(shard.columns.start, shard.columns.stop)
    theirs = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        ref = theirs[name].grad
        if name.startswith("experts."):
            if ref.is_sparse:
                expect(p.grad.is_sparse, f"{what}: {name}.grad is not sparse")
                expect(torch.equal(p.grad.coalesce().indices(), ref.coalesce().indices()),
                       f"{what}: {name}: the gradient's rows differ")
            ref = dense(ref)[:, cols]
        expect(p.grad is not None and rel(dense(p.grad).float(), ref.float()) <= TOL,
               f"{what}: {name}.grad differs")


def scenario_matches_unsharded(rank, expect, out_dir):
    g = torch.Generator().manual_seed(5)  # the same stream on both ranks
    for config in CONFIGS + [BF16]:
        for sparse in (True, False):
            full, shard = pair(config, 3, sparse_grads=sparse)
            what = f"{config} sparse={sparse}"
            expect(isinstance(shard, PEER) and type(shard).__name__ == "ShardedPEER",
                   f"{what}: PEER(process_group=) made {type(shard)}")
            expect(shard.experts.down.shape == (full.experts.down.shape[0], 32 // WORLD),
                   f"{what}: expert shape {tuple(shard.experts.down.shape)}")
            x = torch.randn(2, 12, 32, generator=g)
            w = torch.randn(2, 12, 32, generator=g)
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ys = [m(xx) for m, xx in zip((full, shard), xs)]
            expect(rel(ys[1], ys[0]) <= TOL, f"{what}: y differs by {rel(ys[1], ys[0]):.3g}")
            for y in ys:
                (y * w).sum().backward()
            expect(rel(xs[1].grad, xs[0].grad) <= TOL,
                   f"{what}: dx differs by {rel(xs[1].grad, xs[0].grad):.3g}")
            compare_grads(full, shard, expect, what)
            for (name, a), (_, b) in zip(shard.named_buffers(), full.named_buffers()):
                expect(torch.equal(a, b), f"{what}: running statistic {name} differs")
            full.eval(), shard.eval()
            x2 = torch.randn(16, 32, generator=g)
            _, id_full, _ = full.layer.forward(x2.numpy(), indices=True)
            _, id_shard = shard.layer.forward(x2.numpy(), indices=True)
            expect((id_full == id_shard).all(), f"{what}: expert ids differ")
            with torch.no_grad():
                expect(rel(shard(x2), full(x2)) <= TOL, f"{what}: eval y differs")


# Adam's step is lr * m / (sqrt(v) + eps): near g = 0 a change d of the
# gradient moves the parameter by lr * d / eps, and with torch's eps = 1e-8 a
# gradient element that is zero up to rounding (keys' elements whose terms
# cancel: 1e-8 of the largest) steps by +-lr, its sign set by the summation
# order.  The sharded sums run in another order than the unsharded ones
# (rounding d ~ 1e-7 of the largest gradient, ~1), so eps = 1e-3 keeps that
# at lr * 1e-4 = 1e-7, below 1e-6 of the parameters' size (~0.2).
EPS = 1e-3


def sgd(m):
    return [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)]


def adam(m):
    return [torch.optim.Adam(m.parameters(), lr=1e-3, eps=EPS)]


def sparse_adam(m):
    return [torch.optim.Adam(m.dense_parameters(), lr=1e-3, eps=EPS),
            torch.optim.SparseAdam(m.sparse_parameters(), lr=1e-3, eps=EPS)]


def adamw(m):
    return [peerlayer.optim.AdamW(m, lr=1e-3, eps=EPS, weight_decay=0.1)]


def library(m):
    return [m.layer_optimizer(kind="adam", expert_kind="adam", lr=1e-3, eps=EPS)]


# (optimizers of a module, sparse expert gradients) that the scenarios step
OPTIMIZERS = ((sgd, True), (adam, False), (sparse_adam, True), (adamw, True), (library, True),
              (library, False))


def scenario_optimizers(rank, expect, out_dir):
    g = torch.Generator().manual_seed(9)
    config = CONFIGS[0]
    for make, sparse in OPTIMIZERS:
        full, shard = pair(config, 4, sparse_grads=sparse)
        opts = [make(full), make(shard)]
        for step in range(STEPS):
            x, w = torch.randn(20, 32, generator=g), torch.randn(20, 32, generator=g)
            for m, os_ in zip((full, shard), opts):
                for o in os_:
                    o.zero_grad()
                (m(x) * w).sum().backward()
                for o in os_:
                    o.step()
            compare_params(full, shard, expect, f"{make.__name__} step {step}")
        expect_replicated(shard, expect, make.__name__)


def expect_replicated(shard, expect, what):
    """The replicated parameters hold the same bits on every rank."""
    for name, p in shard.named_parameters():
        if name.startswith("experts."):
            continue
        got = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(got, p.detach().contiguous())
        expect(all(torch.equal(t, got[0]) for t in got), f"{what}: {name} differs between ranks")


def scenario_state_dict(rank, expect, out_dir):
    config = CONFIGS[0]
    g = torch.Generator().manual_seed(11)
    full, shard = pair(config, 6)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (full, shard)]
    for _ in range(2):
        x, w = torch.randn(20, 32, generator=g), torch.randn(20, 32, generator=g)
        for m, o in zip((full, shard), opts):
            o.zero_grad()
            (m(x) * w).sum().backward()
            o.step()
    path = os.path.join(out_dir, f"sd{rank}.pt")
    torch.save(shard.state_dict(), path)
    dist.barrier()

    other = PEER(config, seed=99, threads=1, process_group=None)
    expect_state_dicts(shard, other, torch.randn(8, 32, generator=g), rank, out_dir, expect)

    expect_sliced_in(other, full, expect)
    cols = slice(shard.columns.start, shard.columns.stop)

    # and back out: full_state_dict on rank 0, loadable by nn.PEER
    whole = shard.full_state_dict()
    expect((whole is None) == (rank != 0), "full_state_dict: returned on the wrong ranks")
    if rank == 0:
        ref, own = full.state_dict(), shard.state_dict()
        expect(set(whole) == set(ref), f"full_state_dict keys {sorted(whole)}")
        for name, t in whole.items():
            if name.startswith("experts."):  # the other rank's columns too
                expect(rel(t, ref[name]) <= TOL, f"full_state_dict: {name} differs")
                t = t[:, cols]
            expect(torch.equal(t, own[name]), f"full_state_dict: {name} is not this shard's")
        plain = PEER(config, seed=1, threads=1)
        plain.load_state_dict(whole)
        expect(torch.equal(plain.experts.up[:, cols], shard.experts.up), "full_state_dict: up")

    # files: this rank's shard file, merged into one unsharded file, and an
    # unsharded file sliced in
    shard.save(os.path.join(out_dir, f"w-{rank}.safetensors"))
    other.load(os.path.join(out_dir, f"w-{rank}.safetensors"))
    expect(torch.equal(other.experts.down, shard.experts.down), "load(shard file)")
    dist.barrier()
    merged = os.path.join(out_dir, "merged.safetensors")
    if rank == 0:
        from peerlayer.shard import merge
        merge([os.path.join(out_dir, f"w-{r}.safetensors") for r in range(WORLD)], merged)
        back = PEER.from_file(merged, threads=1)
        for name, t in back.state_dict().items():
            expect(torch.equal(t, whole[name]), f"merged file: {name} differs")
        full.save(os.path.join(out_dir, "full.safetensors"))
    dist.barrier()
    from_file = type(shard).from_file(os.path.join(out_dir, "full.safetensors"), threads=1)
    for name, t in full.state_dict().items():
        expect(torch.equal(from_file.state_dict()[name],
                           t[:, cols] if name.startswith("experts.") else t),
               f"from_file(unsharded): {name}")


def expect_state_dicts(shard, other, x, rank, out_dir, expect):
    """The ranks' state_dicts of shard, saved as out_dir/sd{rank}.pt: this
    rank's loads into `other` (a module of the same config) and gives the
    same forward of x; another rank's is refused before anything is copied."""
    other.load_state_dict(torch.load(os.path.join(out_dir, f"sd{rank}.pt")))
    for (name, a), (_, b) in zip(other.state_dict().items(), shard.state_dict().items()):
        expect(name == "_extra_state" or torch.equal(a, b), f"load_state_dict: {name} differs")
    expect(torch.equal(other(x), shard(x)), "load_state_dict: forward differs")
    before = other.experts.down.detach().clone()
    try:
        other.load_state_dict(torch.load(os.path.join(out_dir, f"sd{1 - rank}.pt")))
        expect(False, "another rank's state_dict was loaded")
    except RuntimeError as e:
        expect("another shard's" in str(e), f"wrong refusal: {e}")
    expect(torch.equal(other.experts.down, before), "a refused load changed the experts")


def expect_sliced_in(other, full, expect):
    """An unsharded state_dict (full's) loads into the sharded module
    `other`, sliced to its columns."""
    cols = slice(other.columns.start, other.columns.stop)
    other.load_state_dict(full.state_dict())
    for name, p in full.state_dict().items():
        mine = other.state_dict()[name].cpu()
        expect(torch.equal(mine, p[:, cols] if name.startswith("experts.") else p),
               f"unsharded state_dict: {name}")


def refused(expect, what, fn, error, words):
    try:
        fn()
        expect(False, f"{what}: not refused")
    except error as e:
        expect(words in str(e), f"{what}: the message does not say {words!r}: {e}")


def scenario_refusals(rank, expect, out_dir):
    def make(config, **kw):
        return lambda: PEER(config, threads=1, process_group=None, **kw)

    refused(expect, "d_model 33 over 2 ranks", make(BASE.replace("d_model=32", "d_model=33")),
            peerlayer.PeerError, "divisible")
    refused(expect, "configs differ", make(BASE.replace("top_k=4", f"top_k={3 + rank}")),
            peerlayer.PeerError, "differ")
    refused(expect, "seeds differ", make(BASE, seed=rank), ValueError, "different seeds")
    refused(expect, "one rank without a seed", make(BASE, seed=None if rank else 1), ValueError,
            "different seeds")
    if not peerlayer.shard.HAS_CUDA:  # (with CUDA: test_shard_torch_cuda.py)
        refused(expect, "cuda", make(BASE, device="cuda"), RuntimeError, "without the CUDA")
    m = PEER(BASE, threads=1, process_group=None)  # the group still works
    refused(expect, ".to(bfloat16)", lambda: m.to(torch.bfloat16), RuntimeError, "weight_dtype")
    refused(expect, "deepcopy", lambda: __import__("copy").deepcopy(m), TypeError, "state_dict")
    expect(m.to("cpu") is m and m.float() is m, "a no-op move was refused")


def scenario_module(rank, expect, out_dir):
    full, shard = pair(CONFIGS[0], 2)
    groups = {gr["name"]: gr["params"] for gr in peerlayer.optim.param_groups(shard)}
    expect(groups.get("experts") == shard.sparse_parameters(), "param_groups: experts")
    n, d = full.experts.down.shape
    expect(full.n_parameters() - shard.n_parameters() == 2 * n * (d - d // WORLD),
           f"n_parameters {shard.n_parameters()} (unsharded {full.n_parameters()})")
    expect(shard.columns == range(rank * d // WORLD, (rank + 1) * d // WORLD),
           f"columns {shard.columns}")
    # seed=None: rank 0's draw, used by every rank
    torch.manual_seed(100 + rank)
    drawn = PEER(CONFIGS[0], threads=1, process_group=None)
    got = [torch.empty_like(drawn.keys) for _ in range(WORLD)]
    dist.all_gather(got, drawn.keys.detach())
    expect(torch.equal(got[0], got[1]), "seed=None: the ranks' keys differ")
    # a second backward of one forward (retain_graph) gives the same gradients
    x = torch.randn(10, 32)
    y = shard(x)
    y.sum().backward(retain_graph=True)
    first = dense(shard.experts.down.grad).clone()
    shard.zero_grad()
    y.sum().backward()
    expect(torch.equal(dense(shard.experts.down.grad), first), "retain_graph: second backward")


def run_scenarios(rank, out_dir, scenarios):
    """Run each scenario(expect) of the dict name -> callable on this rank,
    collect what it expected in vain (and any exception) and write the
    report (name -> list of failures) that assert_clean reads."""
    report = {}
    for name, scenario in scenarios.items():
        errors = []

        def expect(ok, what, errors=errors):
            if not ok:
                errors.append(what)

        start = time.perf_counter()
        try:
            scenario(expect)
        except Exception:  # noqa: BLE001 (reported by the test of this scenario)
            errors.append(traceback.format_exc())
        report[name] = errors
        print(f"rank {rank}: {name} {time.perf_counter() - start:.1f} s", flush=True)
    with open(os.path.join(out_dir, f"report{rank}.json"), "w") as f:
        json.dump(report, f)


def spawn_ranks(worker, args, out_dir):
    """Run worker(rank, *args) in WORLD spawned processes; their reports."""
    mp.start_processes(worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((out_dir / f"report{r}.json").read_text()) for r in range(WORLD)]


def assert_clean(reports, scenario):
    for rank, report in enumerate(reports):
        assert report[scenario] == [], f"rank {rank}:\n" + "\n".join(report[scenario])


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    run_scenarios(rank, out_dir, {name: lambda expect, name=name: globals()[f"scenario_{name}"](
        rank, expect, out_dir) for name in SCENARIOS})
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard_torch")
    return spawn_ranks(_worker, (str(out / "init"), str(out)), out)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_module(reports, scenario):
    assert_clean(reports, scenario)
