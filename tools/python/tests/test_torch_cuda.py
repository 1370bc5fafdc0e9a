"""peerlayer.nn.PEER on CUDA tensors against the CPU module on the same
weights and data: the training forward, every gradient (sparse and dense
expert gradients), the expert ids, batch norm's running statistics, a few
optimizer steps (torch's SparseAdam and Adam, peerlayer.optim.AdamW), on the
default and on a side stream, and saving and loading a CUDA module.

Needs a GPU: skipped, with the reason, when torch has no CUDA device or
libpeer was built without the CUDA backend (or is the emulated build, which
test_torch_cuda_emu.py covers).  tools/gpu-check runs these with
PEER_REQUIRE_CUDA=1, which turns that skip into a failure.

Batches compared with the CPU are drawn free of near-ties (clear_x): where
two candidate scores differ by rounding only, the two backends may rightly
keep different experts.  Tolerances: the CUDA kernels sum in other orders than the CPU ones (and
cuBLAS's products); forward and gradients agree to rtol 1e-5 / atol 1e-5
(relative to values of order 1), parameters after three Adam steps to
rtol 1e-4 / atol 1e-5.  Ids are compared exactly."""

import copy
import ctypes
import os

import numpy as np
import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")

import peerlayer  # noqa: E402
import peerlayer.optim  # noqa: E402
from peerlayer.core import PeerError, lib  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402
from test_torch_cuda_emu import clear_x, emulated_library  # noqa: E402


def _why_not():
    if not lib.has_cuda:
        return f"{lib.path} was built without the CUDA backend (cmake -DPEER_CUDA=ON)"
    if emulated_library():
        return f"{lib.path} is the emulated CUDA build (test_torch_cuda_emu.py covers it)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


REASON = _why_not()
if REASON and os.environ.get("PEER_REQUIRE_CUDA"):
    raise RuntimeError(f"PEER_REQUIRE_CUDA is set, but {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

BASE = "d_model=32,n_heads=2,d_key=8,n_subkeys=12,top_k=4,subkey_top_k=6"
CONFIGS = [BASE + ",query_norm=batchnorm,query_bias=1",
           BASE + ",shared_keys=1,activation=relu,gate=sigmoid",
           "d_model=32,n_heads=4,d_key=6,n_subkeys=5,top_k=3,gate=relu,activation=silu"]
TOL = dict(rtol=1e-5, atol=1e-5)
STEP_TOL = dict(rtol=1e-4, atol=1e-5)


def pair(config, sparse=True, bf16=False, seed=7):
    cpu = PEER(config, seed=seed, sparse_grads=sparse)
    if bf16:
        cpu = cpu.to(torch.bfloat16)
    gpu = PEER(config, seed=seed + 1, sparse_grads=sparse, device="cuda")
    if bf16:
        gpu = gpu.to(torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def step(m, x, dy):
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(dy)
    return y.detach(), x.grad


def assert_same_grads(cpu, gpu):
    for (n, p), (n2, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert n == n2 and q.grad is not None and q.grad.is_cuda, n
        g, h = p.grad, q.grad.cpu()
        assert g.is_sparse == h.is_sparse and h.dtype == p.dtype, n
        if g.is_sparse:
            g, h = g.coalesce(), h.coalesce()
            assert torch.equal(g.indices(), h.indices()), f"{n}: expert rows differ"
            g, h = g.values(), h.values()
        # bf16 expert gradients: f32 sums in other orders may round to
        # neighbouring bf16 values (torch's default bf16 tolerance).
        tol = dict(rtol=1.6e-2, atol=1e-5) if h.dtype == torch.bfloat16 else TOL
        torch.testing.assert_close(h.float(), g.float(), **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sparse", [True, False])
def test_training_step_matches_cpu(config, sparse):
    cpu, gpu = pair(config, sparse)
    g = torch.Generator().manual_seed(1)
    for t in (40, 17):  # a smaller batch after a larger one reuses context and scratch
        x, dy = clear_x(cpu, t, g), torch.randn(t, 32, generator=g)
        y_c, dx_c = step(cpu, x, dy)
        y_g, dx_g = step(gpu, x.cuda(), dy.cuda())
        torch.testing.assert_close(y_g.cpu(), y_c, **TOL)
        torch.testing.assert_close(dx_g.cpu(), dx_c, **TOL)
        assert_same_grads(cpu, gpu)
        for (n, b), (_, c) in zip(cpu.named_buffers(), gpu.named_buffers()):
            torch.testing.assert_close(c.cpu(), b, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    gpu.check()


def test_bf16_tables_train_as_on_cpu():
    cpu, gpu = pair(CONFIGS[0], bf16=True)
    g = torch.Generator().manual_seed(3)
    x, dy = clear_x(cpu, 24, g), torch.randn(24, 32, generator=g)
    y_c, dx_c = step(cpu, x, dy)
    y_g, dx_g = step(gpu, x.cuda(), dy.cuda())
    torch.testing.assert_close(y_g.cpu(), y_c, **TOL)
    torch.testing.assert_close(dx_g.cpu(), dx_c, **TOL)
    assert_same_grads(cpu, gpu)


def test_ids_identical_to_cpu():
    cpu, gpu = pair(CONFIGS[0])
    x = clear_x(cpu, 300, torch.Generator().manual_seed(4), training=False)
    ids_c, _, _ = cpu.layer.retrieve(x.numpy())
    ids = torch.empty(ids_c.shape, dtype=torch.int64, device="cuda")
    xd = x.cuda()
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    gpu.layer._call(lib.peer_cuda_retrieve, 300, xd.data_ptr(), ids.data_ptr(), None, None,
                    stream)
    gpu.check()
    assert np.array_equal(ids.cpu().numpy(), ids_c)


def adam_pair(m, sparse):
    opt = torch.optim.SparseAdam if sparse else torch.optim.Adam
    return [opt(m.sparse_parameters(), lr=1e-2), torch.optim.Adam(m.dense_parameters(), lr=1e-2)]


@pytest.mark.parametrize("optimizer", ["torch", "peerlayer"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("side_stream", [False, True])
def test_optimizer_steps_match_cpu(optimizer, sparse, side_stream):
    # No query bias: under batch norm its gradient is rounding noise, which
    # Adam scales up to steps of lr in either direction.
    cpu, gpu = pair(BASE + ",query_norm=batchnorm", sparse)
    if optimizer == "torch":
        opt_c, opt_g = adam_pair(cpu, sparse), adam_pair(gpu, sparse)
    else:
        opt_c = [peerlayer.optim.AdamW(cpu, lr=1e-2, weight_decay=0.1)]
        opt_g = [peerlayer.optim.AdamW(gpu, lr=1e-2, weight_decay=0.1)]
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        x, dy = clear_x(cpu, 32, g), torch.randn(32, 32, generator=g)
        step(cpu, x, dy)
        for o in opt_c:
            o.step()
        xd, dyd = x.cuda(), dy.cuda()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(gpu, xd, dyd)
            for o in opt_g:
                o.step()
        torch.cuda.current_stream().wait_stream(stream)
        for (n, p), (_, q) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
            torch.testing.assert_close(q.cpu().float(), p.float(), **STEP_TOL,
                                       msg=lambda m, n=n, i=i: f"step {i}: {n}: {m}")


def test_backward_twice_with_retain_graph():
    cpu, gpu = pair(CONFIGS[0])
    x, dy = torch.randn(20, 32).cuda(), torch.randn(20, 32).cuda()
    running = [b.clone() for b in gpu.buffers()]
    y = gpu(x)
    after = [b.clone() for b in gpu.buffers()]
    y.backward(dy, retain_graph=True)
    first = {n: p.grad.to_dense().clone() for n, p in gpu.named_parameters()}
    y.backward(dy)
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.to_dense(), 2 * first[n], **TOL)
    for a, b in zip(after, gpu.buffers()):
        assert torch.equal(a, b)  # the redone forward put the running statistics back
    assert not all(torch.equal(a, b) for a, b in zip(running, after))


def test_steady_training_makes_torch_wait_for_nothing():
    """After a warm-up step (contexts, scratch, optimizer state allocated),
    a training step queues its work and returns: torch's sync debug mode
    raises on any synchronising torch call in our path.  (Calls inside libpeer
    are covered by the emulated runtime's counters, kernels/README.md.)"""
    for sparse in (True, False):
        _, gpu = pair(CONFIGS[0], sparse)
        x, dy = torch.randn(64, 32).cuda(), torch.randn(64, 32).cuda()
        step(gpu, x, dy)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(gpu, x, dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_nonfinite_input_is_reported_by_check():
    _, gpu = pair(CONFIGS[1])
    x = torch.randn(8, 32).cuda()
    x[3, 5] = float("nan")
    step(gpu, x, torch.ones(8, 32).cuda())  # queued; nothing waited for
    with pytest.raises(PeerError, match="NONFINITE|non-finite|NaN"):
        gpu.check()
    gpu.check()  # the record was cleared


def test_state_dict_save_and_load(tmp_path):
    cpu, gpu = pair(CONFIGS[0])
    step(gpu, torch.randn(16, 32).cuda(), torch.randn(16, 32).cuda())  # running stats move
    path = tmp_path / "gpu.safetensors"
    gpu.save(path)
    again = PEER.from_file(path, device="cuda")
    on_cpu = PEER.from_file(path)
    sd = gpu.state_dict()
    assert list(sd) == list(again.state_dict()) == list(on_cpu.state_dict())
    for n, v in sd.items():
        assert v.is_cuda
        assert torch.equal(again.state_dict()[n], v)
        assert torch.equal(on_cpu.state_dict()[n], v.cpu())
    fresh = PEER(CONFIGS[0], seed=99, device="cuda")
    fresh.load_state_dict(torch.load(_saved(tmp_path, sd), weights_only=True))
    for n, v in sd.items():
        assert torch.equal(fresh.state_dict()[n], v)
    moved = gpu.cpu()  # a move rebuilds the layer on the CPU, values kept
    for n, v in moved.state_dict().items():
        assert torch.equal(v, sd[n].cpu())


def _saved(tmp_path, sd):
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]])
def test_opcheck_on_cuda(config):
    m = PEER(config, seed=4, device="cuda")
    params = m._params()
    running = [getattr(owner, attr) for owner, attr in m._running]
    x = torch.randn(7, 32, device="cuda", requires_grad=True)
    for sparse in (True, False):
        torch.library.opcheck(torch.ops.peerlayer.forward_train.default,
                              (m._key, x, params, running, sparse))
    torch.library.opcheck(torch.ops.peerlayer.forward.default,
                          (m._key, x.detach(), [p.detach() for p in params]))


def test_compile_fullgraph_on_cuda_trains_as_eager_does():
    from test_torch_ops import grads_of, two_block_model
    torch.manual_seed(0)
    eager = two_block_model().cuda()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    opts = [peerlayer.optim.AdamW(m, lr=1e-2, weight_decay=0.1) for m in (eager, compiled_model)]
    tokens = torch.randint(0, 11, (3, 5), device="cuda")
    for _ in range(2):
        y_e, y_c = eager(tokens), compiled(tokens)
        torch.testing.assert_close(y_c, y_e, **TOL)
        y_e.square().mean().backward()
        y_c.square().mean().backward()
        ge, gc = grads_of(eager), grads_of(compiled_model)
        assert ge.keys() == gc.keys() and "1.ffn.experts.down" in ge
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n: f"{n}: {m}")
        for o in opts:
            o.step()
            o.zero_grad()
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), eager(tokens), **TOL)
