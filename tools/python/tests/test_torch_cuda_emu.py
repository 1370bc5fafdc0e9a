"""The CUDA training path of peerlayer.nn (the ops' CUDA kernels: context pool,
workspace, peer_cuda_forward_train / peer_cuda_backward, the padded sparse
expert gradients) run against the EMULATED CUDA library (PEER_CUDA=EMU,
kernels/README.md), where torch has no GPU.

torch cannot make CUDA tensors here, so these tests call the functions the
CUDA kernels call (nn._forward_train, nn._cuda_backward) with a stand-in for
_TorchCuda: buffers carved from the emulated device memory of a CUDA layer the
test creates (public API; emulated device memory is host memory, so CPU torch
tensors can view it) and the legacy default stream.  Everything else is the
module's code.  The results are compared with the CPU module on the same
weights and data.  Skipped unless the loaded libpeer is the emulated build
(on a real GPU, test_torch_cuda.py runs the module itself)."""

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
from peerlayer import nn as pnn  # noqa: E402
from peerlayer.core import Layer, check, lib  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402


def emulated_library():
    """Whether the loaded libpeer is the emulated CUDA build."""
    if not lib.has_cuda:
        return False
    with open(lib.path, "rb") as f:  # the emulator's device name (kernels/emu/runtime.cc)
        return b"PEER_CUDA=EMU" in f.read()


REASON = None if emulated_library() else (f"{lib.path} is not the emulated CUDA build (cmake "
                                   "-DPEER_CUDA=EMU): these tests view device memory from the host")
if REASON and os.environ.get("PEER_REQUIRE_EMU"):  # tools/test: they must run
    raise RuntimeError(f"PEER_REQUIRE_EMU is set, but {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

def clear_x(m, t, g, training=True, near=1e-4):
    """A random batch x [t, d] (from generator g) on which two backends that
    round differently must keep the same experts for module m's weights: in
    float64, every (token, head) has its k-th best candidate score above the
    (k+1)-th by more than `near` (relative), and no kept score (relu gate) or
    kept expert's u . x (relu activation) within `near` of relu's kink.  f32
    rounding (about 1e-6 of the scale) cannot change a choice then.  Batch
    norm on the batch's statistics (training) or the running ones.  As
    tests/test_cuda.c does for the C API; random data has such near-ties now
    and then, and there the ids of a CPU and a GPU may rightly differ."""
    c = m.config
    h, dk, n, k = c["n_heads"], c["d_key"], c["n_subkeys"], c["top_k"]
    p = {name: v.detach().cpu().double() for name, v in m.state_dict().items()}
    keys = p["keys"].expand(h, -1, -1, -1) if c["shared_keys"] else p["keys"]
    for _ in range(100):
        x = torch.randn(t, c["d_model"], generator=g)
        q = x.double() @ p["query.weight"].T + p.get("query.bias", 0.0)
        if c["query_norm"] == "batchnorm":
            mean, var = ((q.mean(0), q.var(0, unbiased=False)) if training else
                         (p["query.norm.running_mean"], p["query.norm.running_var"]))
            q = (q - mean) / torch.sqrt(var + 1e-5) * p["query.norm.weight"] + \
                p["query.norm.bias"]
        q = q.view(t, h, dk)
        s1 = torch.einsum("thc,hnc->thn", q[..., :dk // 2], keys[:, 0])
        s2 = torch.einsum("thc,hnc->thn", q[..., dk // 2:], keys[:, 1])
        top, ids = (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(min(k + 1, n * n))
        gap = top[..., k - 1] - top[..., min(k, n * n - 1)]
        ok = k == n * n or bool((gap > near * (1 + top[..., k - 1].abs())).all())
        if c["gate"] == "relu":
            ok &= bool((top[..., :k].abs() > near * (1 + top[..., :k].abs())).all())
        if c["activation"] == "relu":
            pre = torch.einsum("thkd,td->thk", p["experts.down"][ids[..., :k]], x.double())
            ok &= bool((pre.abs() > near).all())
        if ok:
            return x
    raise AssertionError(f"clear_x: no batch of {t} free of near-ties in 100 draws")


# cap = T*H*k = 96 > N = 64: the padded tail of the sparse rows is exercised;
# the second config has cap = 48 < N = 81.
BASE = "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=4,subkey_top_k=5"
CONFIGS = [(BASE + ",query_norm=batchnorm,query_bias=1", 12),
           ("d_model=16,n_heads=3,d_key=6,n_subkeys=9,top_k=2,shared_keys=1,gate=sigmoid", 8)]
TOL = dict(rtol=1e-5, atol=1e-6)


class EmuDevice:
    """_TorchCuda's interface (empty, wrap, stream) over emulated device
    memory: a bump allocator in the expert tables of a CUDA layer made for it,
    256-byte aligned as cudaMalloc is; views are CPU tensors.  A buffer starts
    as 0xff bytes (NaN, -1: what torch.empty may give, so nothing relies on
    zeroed memory) and is followed by 256 guard bytes, which check_guards()
    verifies (a write past a buffer the module sized)."""

    stream = None
    GUARD = 0xA5

    def __init__(self, n_rows=4096, d=256):
        self.arena = Layer(f"d_model={d},n_heads=1,d_key=2,n_subkeys={int(n_rows ** 0.5)},"
                           "top_k=1", backend="cuda")
        self.base, shape, _ = self.arena.tensors["experts.down"]
        self.size = int(np.prod(shape)) * 4
        self.bytes = self.wrap(self.base, (self.size,), np.uint8, self.arena)
        self.used = 0
        self.guards = []

    def empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        off = -(-self.used // 256) * 256
        assert off + nbytes + 256 <= self.size, "EmuDevice: arena too small"
        self.bytes[off:off + nbytes] = 0xFF
        self.bytes[off + nbytes:off + nbytes + 256] = self.GUARD
        self.guards.append((off + nbytes, off + nbytes + 256))
        self.used = off + nbytes + 256
        np_dtype = {torch.float32: np.float32, torch.int64: np.int64, torch.uint8: np.uint8}
        return self.wrap(self.base + off, shape, np_dtype[dtype], self.arena)

    def check_guards(self):
        for a, b in self.guards:
            assert bool((self.bytes[a:b] == self.GUARD).all()), \
                f"EmuDevice: bytes {a}..{b} written: a buffer was too small"

    @staticmethod
    def wrap(ptr, shape, dtype, owner):
        return pnn._HOST.wrap(ptr, shape, dtype, owner)

    def put(self, t):
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out


def device_views(layer):
    """name -> CPU tensor over the CUDA layer's parameter (emulated device memory)."""
    return {n: pnn._HOST.wrap(*layer.tensors[n], layer) for n in layer.tensors}


def pair(config, seed=5):
    """(CPU module, emulated CUDA layer with the same values, its key, its state)."""
    cpu = PEER(config, seed=seed)
    gpu = Layer(config, backend="cuda")
    views = device_views(gpu)
    for n, v in cpu.state_dict().items():
        views[n].copy_(v)
    key = pnn._register(gpu)
    return cpu, gpu, key, pnn._CudaState(key, gpu)


def cpu_step(cpu, x, dy):
    """Training forward and backward on the CPU module: y, dx, name -> grad."""
    cpu.zero_grad()
    xr = x.clone().requires_grad_(True)
    y = cpu(xr)
    y.backward(dy)
    return y.detach(), xr.grad, {n: p.grad for n, p in cpu.named_parameters()}


def gpu_step(key, layer, dev, state, x, dy, sparse=True):
    """The CUDA kernels' path: forward_train, then backward; y, dx, name ->
    grad assembled as _backward does, the running statistics after."""
    xd, dyd = dev.put(x), dev.put(dy)
    y, token, after = pnn._forward_train(key, xd, dev, state)
    dx, dense, rows, down, up = pnn._cuda_backward(key, token, xd, dyd, not sparse, dev)
    dev.check_guards()
    names = pnn._trainable_names(layer)
    views = device_views(layer)
    dense = iter(dense)
    grads = {}
    for n in names:
        if n in pnn._EXPERTS:
            g = down if n == "experts.down" else up
            grads[n] = pnn._expert_grad(g, rows, views[n], sparse, padded=True)
        else:
            grads[n] = next(dense)
    return y, dx, grads, after, token


def step_both(cpu, key, gpu, state, g, t, sparse=True):
    """One training step of the same random batch on the CPU module (its
    .grad set) and on the emulated CUDA layer, whose running statistics are
    then updated as the module does; the CUDA gradients."""
    dev = EmuDevice()
    x, dy = clear_x(cpu, t, g), torch.randn(t, 16, generator=g)
    cpu_step(cpu, x, dy)
    _, _, grads, after, _ = gpu_step(key, gpu, dev, state, x, dy, sparse)
    views = device_views(gpu)
    for b, a in zip(pnn._running_names(gpu), after):
        views[b].copy_(a)
    return grads, dev


def assert_grads_equal(cpu_grads, gpu_grads):
    assert set(cpu_grads) == set(gpu_grads)
    for n, g in cpu_grads.items():
        h = gpu_grads[n]
        if g.is_sparse:
            assert h.is_sparse and not h.is_coalesced(), n
            g, h = g.coalesce(), h.coalesce()
            assert torch.equal(g.indices(), h.indices()), f"{n}: expert rows differ"
            g, h = g.values(), h.values()
        torch.testing.assert_close(h.to_dense(), g.to_dense(), **TOL,
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("config,t", CONFIGS)
@pytest.mark.parametrize("sparse", [True, False])
def test_training_step_matches_cpu(config, t, sparse):
    cpu, gpu, key, state = pair(config)
    cpu.sparse_grads = sparse
    cpu.train()
    dev = EmuDevice()
    g = torch.Generator().manual_seed(1)
    x, dy = clear_x(cpu, t, g), torch.randn(t, 16, generator=g)
    running_before = {n: b.clone() for n, b in cpu.named_buffers()}
    y_c, dx_c, grads_c = cpu_step(cpu, x, dy)
    y_g, dx_g, grads_g, after, token = gpu_step(key, gpu, dev, state, x, dy, sparse)
    torch.testing.assert_close(y_g, y_c, **TOL)
    torch.testing.assert_close(dx_g, dx_c, **TOL)
    assert_grads_equal(grads_c, grads_g)
    # The op is functional: the layer's running statistics are as before, and
    # the updated values come back (the module copies them in).
    views = device_views(gpu)
    names = pnn._running_names(gpu)
    assert len(after) == len(names) == len(running_before)
    for n, a in zip(names, after):
        assert torch.equal(views[n], running_before[n])
        torch.testing.assert_close(a, dict(cpu.named_buffers())[n], **TOL)
    check(lib.peer_cuda_check(gpu.handle, None))


def test_ids_identical_to_cpu():
    cpu, gpu, key, state = pair(CONFIGS[0][0])
    dev = EmuDevice()
    x = clear_x(cpu, 40, torch.Generator().manual_seed(2), training=False)
    ids_c, scores_c, _ = cpu.eval().layer.retrieve(x.numpy())
    ids = dev.empty((40, 2, 4), torch.int64)
    scores = dev.empty((40, 2, 4), torch.float32)
    gpu._call(lib.peer_cuda_retrieve, 40, dev.put(x).data_ptr(), ids.data_ptr(),
              scores.data_ptr(), None, None)
    assert np.array_equal(ids.numpy(), ids_c)


def test_backward_twice_redoes_the_forward_and_keeps_running_stats():
    config, t = CONFIGS[0]
    _, gpu, key, state = pair(config)
    dev = EmuDevice()
    g = torch.Generator().manual_seed(3)
    x, dy = dev.put(torch.randn(t, 16, generator=g)), dev.put(torch.randn(t, 16, generator=g))
    _, token, after = pnn._forward_train(key, x, dev, state)
    first = pnn._cuda_backward(key, token, x, dy, False, dev)
    running = {n: v.clone() for n, v in state.running(dev).items()}
    second = pnn._cuda_backward(key, token, x, dy, False, dev)  # retain_graph's second pass
    def flat(out):
        return [out[0], *out[1], *out[2:]]

    for a, b in zip(flat(first), flat(second)):
        assert torch.equal(a, b)
    for n, v in state.running(dev).items():
        assert torch.equal(v, running[n])


def test_contexts_are_pooled_not_freed():
    config, t = CONFIGS[1]
    _, gpu, key, state = pair(config)
    dev = EmuDevice()
    x = dev.put(torch.randn(t, 16))
    _, token, _ = pnn._forward_train(key, x, dev, state)
    handle = pnn._Saved.find(token).ctx.handle.value
    assert state._free == []
    del token  # autograd dropping the graph
    assert [c.handle.value for c in state._free] == [handle]
    _, token, _ = pnn._forward_train(key, x, dev, state)  # same size: reused
    assert pnn._Saved.find(token).ctx.handle.value == handle and state._free == []
    _, token2, _ = pnn._forward_train(key, x, dev, state)  # two live forwards: two contexts
    assert pnn._Saved.find(token2).ctx.handle.value != handle
    del token, token2
    assert len(state._free) == 2
    big = dev.put(torch.randn(2 * t, 16))
    _, token, _ = pnn._forward_train(key, big, dev, state)  # grown: the small ones go
    assert state._free == [] and pnn._Saved.find(token).ctx.max_tokens == 2 * t
    del token
    one_more = dev.put(torch.randn(2 * t + 1, 16))  # grows by a quarter at least
    _, token, _ = pnn._forward_train(key, one_more, dev, state)
    assert pnn._Saved.find(token).ctx.max_tokens == 2 * t + (2 * t + 3) // 4


def test_workspace_is_the_callers_buffer_and_grows():
    config, t = CONFIGS[1]
    _, gpu, key, state = pair(config)
    dev = EmuDevice()
    pnn._forward_train(key, dev.put(torch.randn(t, 16)), dev, state)
    ws = state._workspace
    size = ctypes.c_size_t()
    check(lib.peer_cuda_workspace_size(gpu.handle, t, ctypes.byref(size)))
    assert ws is not None and ws.numel() == max(size.value, 1)
    pnn._forward_train(key, dev.put(torch.randn(t - 1, 16)), dev, state)
    assert state._workspace is ws
    pnn._forward_train(key, dev.put(torch.randn(3 * t, 16)), dev, state)
    assert state._workspace is not ws and state._workspace_tokens == 3 * t
    pnn._forward_train(key, dev.put(torch.randn(3 * t + 1, 16)), dev, state)
    assert state._workspace_tokens == 3 * t + (3 * t + 3) // 4


@pytest.mark.parametrize("sparse", [True, False])
def test_torch_optimizers_step_the_cuda_parameters_as_the_cpu_ones(sparse):
    """SparseAdam on the (padded, uncoalesced) expert gradients and Adam on
    the dense ones, three steps, against the same on the CPU module.  No
    query bias: under batch norm its gradient is rounding noise, which Adam
    scales up to steps of lr in either direction."""
    config, t = BASE + ",query_norm=batchnorm", 12
    cpu, gpu, key, state = pair(config)
    cpu.sparse_grads = sparse
    gviews = device_views(gpu)
    gparams = {n: torch.nn.Parameter(gviews[n]) for n in pnn._trainable_names(gpu)}

    def optimizers(params):
        experts = [p for n, p in params.items() if n in pnn._EXPERTS]
        dense = [p for n, p in params.items() if n not in pnn._EXPERTS]
        opt = torch.optim.SparseAdam if sparse else torch.optim.Adam
        return [opt(experts, lr=1e-2), torch.optim.Adam(dense, lr=1e-2)]

    opt_c = optimizers(dict(cpu.named_parameters()))
    opt_g = optimizers(gparams)
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        grads, _ = step_both(cpu, key, gpu, state, g, t, sparse)
        for n, p in gparams.items():
            p.grad = grads[n]
        for o in opt_c + opt_g:
            o.step()
        for n, p in cpu.state_dict().items():
            torch.testing.assert_close(gviews[n], p, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n, s=step: f"step {s}: {n}: {m}")


def test_layer_optimizer_steps_the_cuda_layer_as_the_cpu_one():
    """nn._layer_grads + peerlayer.Optimizer.step_pointers (what
    LayerOptimizer.step runs) on the emulated CUDA layer, from device
    gradients (peer_cuda_optimizer_step), against LayerOptimizer on the CPU
    module: AdamW on the dense parameters, lazy Adam on the expert rows."""
    config, t = BASE + ",query_norm=batchnorm", 12
    cpu, gpu, key, state = pair(config)
    settings = dict(kind="adam", expert_kind="adam", lr=1e-2, weight_decay=0.1)
    opt_c = cpu.layer_optimizer(**settings)
    opt_g = peerlayer.Optimizer(gpu, **settings)
    gviews = device_views(gpu)
    g = torch.Generator().manual_seed(6)
    for step in range(3):
        grads, dev = step_both(cpu, key, gpu, state, g, t)
        opt_c.step()
        for n in pnn._EXPERTS:  # coalesced, in device memory (as on a GPU)
            c = grads[n].coalesce()
            grads[n] = torch.sparse_coo_tensor(dev.put(c.indices()), dev.put(c.values()),
                                               c.shape, is_coalesced=True,
                                               check_invariants=True)
        pg, keep = pnn._layer_grads(gpu, grads)
        opt_g.step_pointers(pg, None)
        assert opt_g.step_count == opt_c.step_count == step + 1
        for n, p in cpu.state_dict().items():
            torch.testing.assert_close(gviews[n], p, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n, s=step: f"step {s}: {n}: {m}")


@pytest.mark.parametrize("sparse", [True, False])
def test_empty_batch(sparse):
    config, _ = CONFIGS[1]
    cpu, gpu, key, state = pair(config)
    cpu.sparse_grads = sparse
    x = torch.empty(0, 16)
    _, dx_c, grads_c = cpu_step(cpu, x, x)
    y, dx, grads, after, _ = gpu_step(key, gpu, EmuDevice(), state, x, x, sparse)
    assert y.shape == dx.shape == dx_c.shape == (0, 16) and after == []
    assert_grads_equal(grads_c, grads)
    for n, g in grads.items():
        assert not g.to_dense().any(), n


def test_inference_forward_matches_cpu():
    config, _ = CONFIGS[0]  # batch norm: running statistics in inference
    cpu, gpu, key, state = pair(config)
    views = device_views(gpu)
    for n in pnn._running_names(gpu):  # statistics that are not the initial ones
        views[n].uniform_(0.5, 1.5)
        getattr(cpu.query.norm, n.rsplit(".", 1)[1]).copy_(views[n])
    dev = EmuDevice()
    x = clear_x(cpu, 30, torch.Generator().manual_seed(7), training=False)
    with torch.no_grad():
        y_c = cpu.eval()(x)
    torch.testing.assert_close(pnn._cuda_forward(key, dev.put(x), dev), y_c, **TOL)
    dev.check_guards()
