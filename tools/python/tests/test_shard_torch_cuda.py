"""peerlayer.nn.PEER(..., process_group=pg, device="cuda"): the sharded torch
module on the CUDA backend, two processes, each against the unsharded CPU
nn.PEER on the same weights and data: expert ids identical; y, x's gradient
and every gradient (the rank's columns of the expert tables; bf16 tables'
gradients to bf16's rounding) within 1e-5 relative to the largest value;
batch norm's running statistics; parameters after steps of torch's SGD,
Adam, SparseAdam, peerlayer.optim.AdamW and the library's optimizer
(layer_optimizer, device steps); state_dict per rank, unsharded state_dicts
and weight files sliced in, full_state_dict, shard files merged, a shard
checkpoint with optimizer state; the refusals.  Batches are drawn free of
near-ties (test_torch_cuda_emu.clear_x): there the CPU and CUDA backends may
rightly keep different experts.

The same scenarios run in two harnesses:
- test_emulated: the EMULATED library (cmake -DPEER_CUDA=EMU; device memory
  is host memory, torch has no GPU), gloo.  Each process replaces
  peerlayer.nn._TorchCuda, which every CUDA call of the module gets its
  buffers, tensor views and stream from (the communicator's callbacks
  included), with EmuTorchCuda: buffers carved from emulated device memory
  (test_torch_cuda_emu.EmuDevice), CPU tensors over it, the legacy stream;
  every other line run is the module's own.  The module's tensors are then
  CPU tensors over emulated device memory, and what the library reads (x,
  autograd's dy, gradients) is staged there by EmuTorchCuda.operand.
  Skipped unless the loaded libpeer is the emulated build (PEER_REQUIRE_EMU:
  a failure instead).
- test_nccl: a CUDA build of libpeer and 2 GPUs: NCCL, one GPU per process
  (tools/gpu-check runs it).  Skipped, with the reason, otherwise;
  PEER_REQUIRE_CUDA turns every reason but a GPU count under 2 into a
  failure, PEER_REQUIRE_NCCL every reason.

Each harness spawns its two ranks once; each scenario's failures are
written per rank and asserted by its own test."""

import contextlib
import datetime
import os

import numpy as np
import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
import torch.distributed as dist  # noqa: E402

import peerlayer  # noqa: E402
from peerlayer import nn as pnn  # noqa: E402
from peerlayer import shard as pshard  # noqa: E402
from peerlayer.core import lib  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402
# The CPU module's test: its configs, optimizers (Adam's eps: see its EPS)
# and harness (ranks spawned once, per-rank reports of each scenario).
from test_shard_torch import (BASE, BF16, CONFIGS, EPS, OPTIMIZERS, SCENARIOS, STEPS,  # noqa: E402
                              WORLD, assert_clean, compare_params, dense, expect_replicated,
                              expect_sliced_in, expect_state_dicts, refused, rel, run_scenarios,
                              spawn_ranks)
from test_torch_cuda_emu import EmuDevice, clear_x, emulated_library  # noqa: E402

TOL, T = 1e-5, 24


def _why_not_emulated():
    if not emulated_library():
        return f"{lib.path} is not the emulated CUDA build (cmake -DPEER_CUDA=EMU)"
    if not pshard.HAS_CUDA:
        return f"{lib.path} has no CUDA sharded layer"
    return None


def _why_not_nccl():
    """(reason, whether PEER_REQUIRE_CUDA may let it skip)"""
    if not lib.has_cuda:
        return f"{lib.path} was built without the CUDA backend (cmake -DPEER_CUDA=ON)", False
    if emulated_library():
        return f"{lib.path} is the emulated CUDA build (test_emulated covers it)", False
    if not dist.is_nccl_available():
        return f"torch {torch.__version__} has no NCCL", False
    n = torch.cuda.device_count()
    if n < WORLD:
        return f"needs {WORLD} GPUs, torch sees {n}", True
    return None, False


EMU_REASON = _why_not_emulated()
if EMU_REASON and os.environ.get("PEER_REQUIRE_EMU"):  # tools/test: it must run
    raise RuntimeError(f"PEER_REQUIRE_EMU is set, but {EMU_REASON}")
NCCL_REASON, NCCL_MAY_SKIP = _why_not_nccl()
if NCCL_REASON and os.environ.get("PEER_REQUIRE_NCCL"):
    raise RuntimeError(f"PEER_REQUIRE_NCCL is set, but {NCCL_REASON}")
if NCCL_REASON and not NCCL_MAY_SKIP and os.environ.get("PEER_REQUIRE_CUDA"):
    raise RuntimeError(f"PEER_REQUIRE_CUDA is set, but {NCCL_REASON}")


class EmuTorchCuda(EmuDevice):
    """What nn._TorchCuda(device) gives the module in an emulated process:
    one arena of emulated device memory for every call (EmuDevice: 0xff-filled
    buffers with guard bytes), CPU tensor views of it, no stream."""

    device = torch.device("cpu")

    def __call__(self, device):
        return self

    def operand(self, t):
        """t where the emulated library may read it: t itself when it lies in
        the arena, else a copy there (x, autograd's dy, torch's gradients:
        host memory, which the emulator refuses as device memory)."""
        t = t.contiguous()
        inside = self.base <= t.data_ptr() < self.base + self.size
        return t if inside else self.put(t)

    @staticmethod
    def on_stream(stream):
        return contextlib.nullcontext()


class Env:
    """Where a scenario's sharded modules live: `device` for PEER(...,
    device=), to() moves a reference input there, dev() is what the module's
    calls get (nn._TorchCuda)."""

    def __init__(self, rank, emulated):
        self.rank, self.emulated = rank, emulated
        self.device = "cuda" if emulated else f"cuda:{rank}"

    def to(self, t):
        return t if self.emulated else t.to(self.device)

    def dev(self):
        return pnn._TorchCuda(torch.device(self.device))


def pair(env, config, seed, **kw):
    """(unsharded CPU module, sharded CUDA module) made from one seed.  The
    batch norm's bias starts at zero: it is given values of the other
    parameters' size, so that comparisons relative to its size are not
    relative to one step."""
    full = PEER(config, seed=seed, threads=1, **kw)
    shard = PEER(config, seed=seed, process_group=None, device=env.device, **kw)
    if full.config["query_norm"] == "batchnorm":
        bias = torch.rand(full.query.norm.bias.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for m in (full, shard):
                m.query.norm.bias.copy_(env.to(bias - 0.5) if m is shard else bias - 0.5)
    return full, shard


def cols_of(shard):
    return slice(shard.columns.start, shard.columns.stop)


def compare_grads(full, shard, expect, what):
    theirs = dict(full.named_parameters())
    for name, p in shard.named_parameters():
        ref, got = theirs[name].grad, p.grad
        if got is None:
            expect(False, f"{what}: {name} has no gradient")
            continue
        tol = TOL if p.dtype == torch.float32 else 2.0 ** -7  # bf16: rounded gradients
        if name.startswith("experts."):
            expect(got.is_sparse == ref.is_sparse, f"{what}: {name}.grad sparse={got.is_sparse}")
            if ref.is_sparse:
                expect(torch.equal(got.coalesce().indices().cpu(), ref.coalesce().indices()),
                       f"{what}: {name}: the gradient's rows differ")
            ref = dense(ref)[:, cols_of(shard)]
        err = rel(dense(got).float(), ref.float())
        expect(err <= tol, f"{what}: {name}.grad differs by {err:.3g}")


def scenario_matches_unsharded(env, expect, out_dir):
    g = torch.Generator().manual_seed(5)  # the same stream on both ranks
    for config in CONFIGS + [BF16]:
        for sparse in (True, False):
            full, shard = pair(env, config, 3, sparse_grads=sparse)
            what = f"{config} sparse={sparse}"
            expect(type(shard).__name__ == "ShardedPEER" and shard.layer.backend == "cuda",
                   f"{what}: PEER(process_group=, device=cuda) made {type(shard)} "
                   f"on {shard.layer.backend}")
            expect(shard.experts.down.shape == (full.experts.down.shape[0], 32 // WORLD),
                   f"{what}: expert shape {tuple(shard.experts.down.shape)}")
            for name, p in shard.state_dict().items():  # the CPU layer's init, sliced
                ref = full.state_dict().get(name)
                if name in ("experts.down", "experts.up"):
                    ref = ref[:, cols_of(shard)]
                expect(name == "_extra_state" or torch.equal(p.cpu(), ref),
                       f"{what}: {name} after init differs from the CPU layer's")
            x = clear_x(full, T, g)
            w = torch.randn(T, 32, generator=g)
            x_full = x.clone().requires_grad_()
            x_shard = env.to(x).requires_grad_()
            y_full, y_shard = full(x_full), shard(x_shard)
            expect(rel(y_shard, y_full) <= TOL, f"{what}: y differs by {rel(y_shard, y_full):.3g}")
            (y_full * w).sum().backward()
            (y_shard * env.to(w)).sum().backward()
            expect(rel(x_shard.grad, x_full.grad) <= TOL,
                   f"{what}: dx differs by {rel(x_shard.grad, x_full.grad):.3g}")
            compare_grads(full, shard, expect, what)
            for (name, a), (_, b) in zip(shard.named_buffers(), full.named_buffers()):
                expect(rel(a, b) <= TOL, f"{what}: running statistic {name} differs")
            full.eval(), shard.eval()
            x2 = clear_x(full, 16, g, training=False)
            ids_full, _, _ = full.layer.retrieve(x2.numpy())
            ids_shard, _, _ = shard.layer.retrieve(env.to(x2), env.dev())
            expect(np.array_equal(ids_shard.cpu().numpy(), ids_full), f"{what}: expert ids differ")
            _, ids_fwd = shard.layer.forward(env.to(x2), env.dev(), indices=True)
            expect(np.array_equal(ids_fwd.cpu().numpy(), ids_full),
                   f"{what}: the forward's expert ids differ")
            with torch.no_grad():
                err = rel(shard(env.to(x2)), full(x2))
                expect(err <= TOL, f"{what}: eval y differs by {err:.3g}")


def scenario_optimizers(env, expect, out_dir):
    g = torch.Generator().manual_seed(9)
    config = CONFIGS[0]
    for make, sparse in OPTIMIZERS:
        full, shard = pair(env, config, 4, sparse_grads=sparse)
        opts = [make(full), make(shard)]
        for step in range(STEPS):
            x, w = clear_x(full, T, g), torch.randn(T, 32, generator=g)
            for m, os_ in zip((full, shard), opts):
                for o in os_:
                    o.zero_grad()
                xm, wm = (x, w) if m is full else (env.to(x), env.to(w))
                (m(xm) * wm).sum().backward()
                for o in os_:
                    o.step()
            compare_params(full, shard, expect, f"{make.__name__} sparse={sparse} step {step}",
                           tol=TOL)
        if make.__name__ == "library":
            expect(opts[1][0].step_count == STEPS, f"library: step_count {opts[1][0].step_count}")
        expect_replicated(shard, expect, make.__name__)


def scenario_state_dict(env, expect, out_dir):
    rank, config = env.rank, CONFIGS[0]
    g = torch.Generator().manual_seed(11)
    full, shard = pair(env, config, 6)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (full, shard)]
    for _ in range(2):
        x, w = clear_x(full, T, g), torch.randn(T, 32, generator=g)
        for m, o in zip((full, shard), opts):
            o.zero_grad()
            (m(x if m is full else env.to(x)) * (w if m is full else env.to(w))).sum().backward()
            o.step()
    path = os.path.join(out_dir, f"sd{rank}.pt")
    torch.save(shard.state_dict(), path)
    dist.barrier()

    other = PEER(config, seed=99, process_group=None, device=env.device)
    expect_state_dicts(shard, other, env.to(clear_x(full, 8, g)), rank, out_dir, expect)

    expect_sliced_in(other, full, expect)  # a CPU state_dict

    # and back out: full_state_dict on rank 0, loadable by nn.PEER
    whole = shard.full_state_dict()
    expect((whole is None) == (rank != 0), "full_state_dict: returned on the wrong ranks")
    if rank == 0:
        ref, own = full.state_dict(), shard.state_dict()
        expect(set(whole) == set(ref), f"full_state_dict keys {sorted(whole)}")
        for name, t in whole.items():  # (the forwards since moved the running statistics)
            expect("running" in name or rel(t, ref[name]) <= TOL,
                   f"full_state_dict: {name} differs from the CPU's")
            if name.startswith("experts."):  # the other rank's columns too
                t = t[:, cols_of(shard)]
            expect(torch.equal(t, own[name]), f"full_state_dict: {name} is not this shard's")
        whole = {name: t.cpu() for name, t in whole.items()}
        plain = PEER(config, seed=1, threads=1)
        plain.load_state_dict(whole)
        expect(torch.equal(plain.experts.up[:, cols_of(shard)], shard.experts.up.cpu()),
               "full_state_dict: up")

    # files: this rank's shard file, merged into one unsharded file, and an
    # unsharded file sliced in
    shard.save(os.path.join(out_dir, f"w-{rank}.safetensors"))
    other.load(os.path.join(out_dir, f"w-{rank}.safetensors"))
    expect(torch.equal(other.experts.down, shard.experts.down), "load(shard file)")
    dist.barrier()
    if rank == 0:
        merged = os.path.join(out_dir, "merged.safetensors")
        pshard.merge([os.path.join(out_dir, f"w-{r}.safetensors") for r in range(WORLD)],
                     merged)
        back = PEER.from_file(merged, threads=1)
        for name, t in back.state_dict().items():
            expect(torch.equal(t, whole[name]), f"merged file: {name} differs")
        full.save(os.path.join(out_dir, "full.safetensors"))
    dist.barrier()
    from_file = type(shard).from_file(os.path.join(out_dir, "full.safetensors"),
                                      device=env.device)
    expect(from_file.layer.backend == "cuda", "from_file(device=cuda): not a CUDA shard")
    for name, t in full.state_dict().items():
        expect(torch.equal(from_file.state_dict()[name].cpu(),
                           t[:, cols_of(shard)] if name.startswith("experts.") else t),
               f"from_file(unsharded): {name}")

    # a shard checkpoint with the library optimizer's state: loaded into a new
    # module, the next step is the same bits
    opt = shard.layer_optimizer(kind="adam", expert_kind="adam", lr=1e-3, eps=EPS)
    x, w = env.to(clear_x(full, T, g)), env.to(torch.randn(T, 32, generator=g))
    for _ in range(2):
        opt.zero_grad()
        (shard(x) * w).sum().backward()
        opt.step()
    ckpt = os.path.join(out_dir, f"ckpt-{rank}.safetensors")
    shard.layer.save(ckpt, opt.optimizer)
    again = PEER(config, seed=98, process_group=None, device=env.device)
    opt2 = again.layer_optimizer(kind="adam", expert_kind="adam", lr=1e-3, eps=EPS)
    again.layer.load(ckpt, opt2.optimizer)
    expect(opt2.step_count == 2, f"checkpoint: step count {opt2.step_count}")
    for m, o in ((shard, opt), (again, opt2)):
        o.zero_grad()
        (m(x) * w).sum().backward()
        o.step()
    for (name, a), (_, b) in zip(again.state_dict().items(), shard.state_dict().items()):
        expect(name == "_extra_state" or torch.equal(a, b),
               f"checkpoint: {name} differs after a step")


def scenario_refusals(env, expect, out_dir):
    def make(config, **kw):
        return lambda: PEER(config, process_group=None, device=env.device, **kw)

    refused(expect, "d_model 33 over 2 ranks", make(BASE.replace("d_model=32", "d_model=33")),
            peerlayer.PeerError, "divisible")
    refused(expect, "configs differ", make(BASE.replace("top_k=4", f"top_k={3 + env.rank}")),
            peerlayer.PeerError, "differ")
    refused(expect, "seeds differ", make(BASE, seed=env.rank), ValueError, "different seeds")
    m = make(BASE)()  # the group still works
    refused(expect, ".to(bfloat16)", lambda: m.to(torch.bfloat16), RuntimeError, "weight_dtype")
    if not env.emulated:  # (emulated, the module's tensors are CPU tensors)
        refused(expect, ".cpu()", lambda: m.cpu(), RuntimeError, "cannot move")
        refused(expect, "a CPU input", lambda: m(torch.zeros(2, 32)), RuntimeError, "input on")
    expect(m.float() is m, "a no-op move was refused")
    bad = torch.randn(6, 32)
    bad[2, 5] = float("nan")
    with torch.no_grad():
        refused(expect, "NaN in x (inference)", lambda: m.eval()(env.to(bad)),
                peerlayer.PeerError, "non-finite")


def scenario_module(env, expect, out_dir):
    full, shard = pair(env, CONFIGS[0], 2)
    n, d = full.experts.down.shape
    expect(full.n_parameters() - shard.n_parameters() == 2 * n * (d - d // WORLD),
           f"n_parameters {shard.n_parameters()} (unsharded {full.n_parameters()})")
    expect(shard.columns == range(env.rank * d // WORLD, (env.rank + 1) * d // WORLD),
           f"columns {shard.columns}")
    # seed=None: rank 0's draw, used by every rank
    torch.manual_seed(100 + env.rank)
    drawn = PEER(CONFIGS[0], process_group=None, device=env.device)
    got = [torch.empty_like(drawn.keys) for _ in range(WORLD)]
    dist.all_gather(got, drawn.keys.detach())
    expect(torch.equal(got[0], got[1]), "seed=None: the ranks' keys differ")
    # a second backward of one forward (retain_graph) gives the same gradients
    x = env.to(torch.randn(10, 32, generator=torch.Generator().manual_seed(3)))
    y = shard(x)
    y.sum().backward(retain_graph=True)
    first = dense(shard.experts.down.grad).clone()
    running = [b.clone() for b in shard.buffers()]
    shard.zero_grad()
    y.sum().backward()
    expect(torch.equal(dense(shard.experts.down.grad), first), "retain_graph: second backward")
    expect(all(torch.equal(a, b) for a, b in zip(running, shard.buffers())),
           "retain_graph: the running statistics moved")
    shard.check()


def _worker(rank, emulated, init_file, out_dir):
    torch.set_num_threads(1)
    if emulated:
        pnn._TorchCuda = arena = EmuTorchCuda()  # 4 MiB; the scenarios use 2
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if emulated else "nccl", init_method=f"file://{init_file}",
                            rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    env = Env(rank, emulated)

    def scenario(name, expect):
        globals()[f"scenario_{name}"](env, expect, out_dir)
        if emulated:
            arena.check_guards()

    run_scenarios(rank, out_dir, {name: lambda expect, name=name: scenario(name, expect)
                                  for name in SCENARIOS})
    dist.destroy_process_group()


def _run(tmp_path_factory, emulated):
    out = tmp_path_factory.mktemp("shard_torch_cuda")
    return spawn_ranks(_worker, (emulated, str(out / "init"), str(out)), out)


@pytest.fixture(scope="module")
def emulated_reports(tmp_path_factory):
    if EMU_REASON:
        pytest.skip(EMU_REASON)
    return _run(tmp_path_factory, True)


@pytest.fixture(scope="module")
def nccl_reports(tmp_path_factory):
    if NCCL_REASON:
        pytest.skip(NCCL_REASON)
    return _run(tmp_path_factory, False)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_emulated(emulated_reports, scenario):
    assert_clean(emulated_reports, scenario)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_nccl(nccl_reports, scenario):
    assert_clean(nccl_reports, scenario)
