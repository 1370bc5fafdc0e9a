"""PyTorch module over libpeer: PEER(nn.Module), its torch.library custom ops
(peerlayer::forward, peerlayer::forward_train, peerlayer::backward) and their
autograd.

The C layer owns the parameter memory; the module registers torch Parameters
(and the batch-norm running statistics as buffers) that are views of that
memory, so torch optimizers, load_state_dict and the C library all read and
write the same bytes.  state_dict keys are the PEER.md tensor names
("query.weight", "keys", "experts.down", ...), so a state_dict and a peer
safetensors file hold the same tensors under the same names.

The ops take the layer as an integer key (a registry entry, not a pointer)
and the parameters as tensor inputs, so torch.compile sees what each op reads
and traces a model with PEER blocks as one graph (fullgraph=True).  The
training forward returns, besides y, a one-byte "context" tensor whose memory
owns the peer context that the backward needs: the context lives exactly as
long as autograd keeps the tensor.

Gradients: dense for the query, batch-norm affine and keys; for the expert
tables either sparse COO tensors holding only the rows the batch used
(sparse_grads=True, the default: peerlayer.optim.AdamW, torch.optim.SparseAdam
or SGD take them) or dense [N, d] tensors (any optimizer).

Devices and dtypes: CPU tensors go through the CPU backend.  A module created
with device="cuda" (library built with CUDA) keeps its parameters on the GPU
and runs on CUDA tensors, training included: the same ops, with CUDA kernels
that call peer_cuda_forward_train / peer_cuda_backward on torch's current
stream with buffers from torch's caching allocator (inputs, outputs,
gradients, the layer's scratch); no host copy and no wait (PEER.check() waits
and reports non-finite values).  The training contexts are the library's
device memory, pooled per layer (_CudaState).  Sparse expert gradients on
CUDA are uncoalesced (as nn.Embedding(sparse=True)'s on CUDA): the distinct
rows ascending, then repeats of the last row with zero gradient, since the
row count exists only on the device.  .to()/.cuda()/.cpu()
rebuild the C layer on the target backend; .to(torch.bfloat16) stores the
expert tables as bf16 (compute stays f32), .float() back as f32; other dtypes
are refused when .to() is called.
"""

import contextlib
import ctypes
import itertools
import threading
import weakref
from typing import List, Tuple

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # torch is the optional extra peerlayer[torch]
    raise ModuleNotFoundError(
        "peerlayer.nn needs PyTorch, which peerlayer does not install by itself: "
        "pip install 'peerlayer[torch]' (or pip install torch)", name="torch") from e

from . import _lib, core
from .core import Layer, check, lib

# PEER.md name -> (submodule path, attribute, is a buffer)
_SLOTS = {
    "query.weight": ("query", "weight", False),
    "query.bias": ("query", "bias", False),
    "query.norm.weight": ("query.norm", "weight", False),
    "query.norm.bias": ("query.norm", "bias", False),
    "query.norm.running_mean": ("query.norm", "running_mean", True),
    "query.norm.running_var": ("query.norm", "running_var", True),
    "keys": ("", "keys", False),
    "experts.down": ("experts", "down", False),
    "experts.up": ("experts", "up", False),
}
# peer_grads field of each dense trainable parameter, in the order the
# backward op returns their gradients.
_GRAD_FIELD = {"query.weight": "query_weight", "query.bias": "query_bias",
               "query.norm.weight": "norm_weight", "query.norm.bias": "norm_bias",
               "keys": "keys"}
_EXPERTS = ("experts.down", "experts.up")


class _CudaView:
    """Device memory of a CUDA layer exposed through __cuda_array_interface__,
    keeping the layer alive as long as a tensor over it exists."""

    def __init__(self, ptr, shape, dtype, owner):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                         "typestr": np.dtype(dtype).str, "version": 2,
                                         "strides": None}
        self._owner = owner


class _Host:
    """Buffers of the CPU path: torch CPU tensors; no stream."""

    stream = None

    @staticmethod
    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtype)

    @staticmethod
    def wrap(ptr, shape, dtype, owner):
        """A tensor over memory at ptr that keeps `owner` alive."""
        return torch.from_numpy(np.asarray(core._View(ptr, shape, dtype, owner)))

    @staticmethod
    def operand(t):
        """t, contiguous, as the library reads it (host memory)."""
        return t.contiguous()

    @staticmethod
    def on_stream(stream):
        return contextlib.nullcontext()


class _TorchCuda:
    """Buffers and stream of the CUDA path: torch's caching allocator and
    torch's current stream on `device`, as the calls see them when made."""

    def __init__(self, device):
        self.device = device
        self.stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def wrap(self, ptr, shape, dtype, owner):
        return torch.as_tensor(_CudaView(ptr, shape, dtype, owner), device=self.device)

    def operand(self, t):
        """t, contiguous, where the library reads it: refused unless on this
        device (torch made it there: an input, autograd's dy, a gradient)."""
        if t.device != torch.device(self.device):
            raise RuntimeError(f"peerlayer: a tensor on {t.device} where the layer on "
                               f"{self.device} reads device memory")
        return t.contiguous()

    def on_stream(self, stream):
        """A context in which `stream` (a cudaStream_t the library hands a
        callback; 0 or None: the legacy default stream) is torch's current
        stream on this device, so that torch work there (a collective of
        torch.distributed, which NCCL runs on a stream of its own ordered
        after the current one and before what follows on it) is ordered
        with the library's."""
        ptr = stream or 0
        if ptr == torch.cuda.current_stream(self.device).cuda_stream:
            return contextlib.nullcontext()
        s = (torch.cuda.default_stream(self.device) if ptr == 0 else
             torch.cuda.ExternalStream(ptr, device=self.device))
        return torch.cuda.stream(s)


_HOST = _Host()


def _wrap(layer, name, device):
    ptr, shape, dt = layer.tensors[name]
    if layer.backend == "cpu":
        t = torch.from_numpy(layer.params[name])
    else:
        t = _TorchCuda(device).wrap(ptr, shape, dt, layer)
    if dt == np.uint16:  # bf16 expert table: same bits, torch's bfloat16
        t = t.view(torch.bfloat16)
    return t


# ---------------------------------------------------------------- registry

# The ops name a layer by an integer key: a graph holds a constant, never a
# pointer.  Entries go when their layer is garbage.
_LAYERS = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def _register(layer):
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


def _layer(key):
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"peerlayer: no live layer has key {key} (the PEER module was freed)")
    return layer


def _trainable_names(layer):
    return [n for n in layer.tensors if not _SLOTS[n][2]]


def _running_names(layer):
    return [n for n in layer.tensors if _SLOTS[n][2]]


def _grown(n):
    return n + (n + 3) // 4


class _CudaState:
    """What the CUDA path keeps per layer between calls.  The layer's device
    scratch: a byte tensor from torch's caching allocator, registered with
    peer_cuda_set_workspace and grown with the batch.  Training contexts
    (peer_context: device memory the library allocates; freeing one waits for
    the whole device) are pooled: a training forward takes one and its _Saved
    hands it back when autograd drops it, so a steady loop neither allocates
    nor waits.  Held by the module (a context refers to the layer, so the
    layer cannot hold this); the ops find it by the layer's key."""

    _by_key = weakref.WeakValueDictionary()

    def __init__(self, key, layer):
        self.layer = layer
        self._free = []
        self._most = 0  # the largest context made
        self._lock = threading.Lock()
        self._workspace, self._workspace_tokens = None, 0
        self._running = None
        _CudaState._by_key[key] = self

    @classmethod
    def of(cls, key):
        state = cls._by_key.get(key)
        if state is None:
            raise RuntimeError(f"peerlayer: no live CUDA layer has key {key} (the PEER "
                               "module was freed)")
        return state

    def take(self, n_tokens):
        """A context for n_tokens tokens: a pooled one, else a new one."""
        with self._lock:
            fits = [c for c in self._free if c.max_tokens >= n_tokens]
            if fits:
                ctx = min(fits, key=lambda c: c.max_tokens)
                self._free.remove(ctx)
                return ctx
            # The batch grew: pooled contexts are too small (freeing them waits
            # for the device), and new ones grow by a quarter at least, so that
            # batches growing a little at a time cause few such waits.
            smaller, self._free = self._free, []
            if n_tokens > self._most:
                n_tokens = self._most = max(n_tokens, _grown(self._most))
            else:
                n_tokens = self._most
        del smaller
        return self.layer.context(n_tokens)

    def give_back(self, ctx):
        with self._lock:
            self._free.append(ctx)

    def workspace(self, n_tokens, dev):
        """Make the layer's scratch hold n_tokens tokens (grown, never shrunk;
        the old buffer goes back to torch's allocator, stream-ordered)."""
        if n_tokens <= self._workspace_tokens:
            return
        n_tokens = max(n_tokens, _grown(self._workspace_tokens))
        size = ctypes.c_size_t()
        check(lib.peer_cuda_workspace_size(self.layer.handle, n_tokens, ctypes.byref(size)))
        buf = dev.empty((max(size.value, 1),), torch.uint8)
        self.layer._call(lib.peer_cuda_set_workspace, buf.data_ptr(), size.value)
        self._workspace, self._workspace_tokens = buf, n_tokens

    def running(self, dev):
        """name -> tensor over the layer's running statistics (device memory)."""
        if self._running is None:
            self._running = {n: dev.wrap(*self.layer.tensors[n], self.layer)
                             for n in _running_names(self.layer)}
        return self._running

    def __del__(self):
        # The layer may outlive this (a tensor over its memory keeps it): it
        # must not keep a pointer to a workspace that goes back to torch.
        layer = self.layer
        if getattr(self, "_workspace", None) is not None and not layer.closed:
            with layer._lock:
                lib.peer_cuda_set_workspace(layer.handle, None, 0)


class _Saved:
    """A training forward's peer context.  Owned by the one-byte tensor the
    forward op returns (`token`), so it lives exactly as long as autograd keeps
    that tensor.  Found again by that tensor's address, which cannot be reused
    while the tensor lives.  CPU (state None): a context of its own.  CUDA: a
    context from the layer's _CudaState pool, handed back when this goes."""

    _live = {}

    def __init__(self, layer, x, dev, state=None):
        self.layer = layer
        self.x = x  # the C context points into x's memory: keep it alive
        self.state = state
        n = max(x.shape[0], 1)
        self.ctx = state.take(n) if state is not None else core.Context(layer, n)
        self.used = False
        self._byte = dev.empty((1,), torch.uint8).zero_()  # a token's value is compared
        self._addr = self._byte.data_ptr()
        _Saved._live[self._addr] = weakref.ref(self)

    def token(self, dev):
        """The tensor that owns this object (not kept here: that would be a
        cycle through C++ that no garbage collector sees)."""
        return dev.wrap(self._addr, (1,), np.uint8, self)

    @classmethod
    def find(cls, token):
        ref = cls._live.get(token.data_ptr())
        saved = ref() if ref is not None else None
        if saved is None:
            raise RuntimeError("peerlayer: backward got a context tensor that no training "
                               "forward made (a copy of it?); pass the one forward_train returned")
        return saved

    def running(self, dev):
        """name -> tensor over the layer's own running statistics."""
        if self.state is not None:
            return self.state.running(dev)
        return {n: torch.from_numpy(self.layer.params[n]) for n in _running_names(self.layer)}

    def forward(self, y, dev):
        if self.state is None:
            self.layer.forward_train(self.ctx, self.x.detach().numpy(), out=y.detach().numpy())
            return
        t = self.x.shape[0]
        self.state.workspace(t, dev)
        self.layer._call(lib.peer_cuda_forward_train, self.ctx.handle, t, self.x.data_ptr(),
                         y.data_ptr(), dev.stream)

    def redo_forward(self, dev):
        """A second backward of one forward (retain_graph=True): the library
        consumes the context, so run the same training forward again (CPU: on a
        fresh context).  Deterministic, so it records the same values; the
        running statistics it would update again are put back."""
        running = self.running(dev)
        before = {n: t.clone() for n, t in running.items()}
        if self.state is None:
            self.ctx = core.Context(self.layer, max(self.x.shape[0], 1))
        try:
            self.forward(dev.empty(self.x.shape, torch.float32), dev)
        finally:
            for n, t in running.items():
                t.copy_(before[n])

    def __del__(self):
        # This object owns the byte at _addr, so no other entry can have it yet.
        _Saved._live.pop(getattr(self, "_addr", None), None)
        if getattr(self, "state", None) is not None and getattr(self, "ctx", None) is not None:
            self.state.give_back(self.ctx)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("peerlayer::forward", mutates_args=())
def _forward_op(key: int, x: torch.Tensor, params: List[torch.Tensor]) -> torch.Tensor:
    """Inference forward: y [T, d] for x [T, d] f32 (batch norm on running
    statistics).  params are the layer's trainable tensors (read by the library
    from its own memory, which they are).  The CPU kernel; CUDA's is below."""
    y = torch.empty_like(x)
    _layer(key).forward(x.detach().numpy(), out=y.numpy())
    return y


@_forward_op.register_kernel("cuda")
def _(key, x, params):
    return _cuda_forward(key, x, _TorchCuda(x.device))


def _cuda_forward(key, x, dev):
    """The inference forward on a CUDA layer: peer_cuda_forward on dev's
    stream, then peer_cuda_check, which waits for the stream: a non-finite
    score (or a CUDA error) is raised here, as on the CPU."""
    layer = _layer(key)
    _CudaState.of(key).workspace(x.shape[0], dev)
    y = dev.empty(x.shape, torch.float32)
    layer._call(lib.peer_cuda_forward, x.shape[0], x.data_ptr(), y.data_ptr(), None, None,
                dev.stream)
    layer._call(lib.peer_cuda_check, dev.stream)
    return y


@_forward_op.register_fake
def _(key, x, params):
    return torch.empty_like(x)


@torch.library.custom_op("peerlayer::forward_train", mutates_args=())
def _forward_train_op(key: int, x: torch.Tensor, params: List[torch.Tensor],
                      running: List[torch.Tensor],
                      sparse_grads: bool) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Training forward: (y, context, batch norm's running statistics after
    the update).  Batch norm uses the batch's statistics.  Functional, as
    autograd formulas and torch.compile want: the running statistics (the
    module's buffers, `running`) are left as they were; the module copies the
    returned values into them.  This is the CPU kernel; CUDA's is below."""
    return _forward_train(key, x, _HOST, None)


def _forward_train(key, x, dev, state):
    """The forward_train op on the device `dev` describes (buffers, stream);
    state: the layer's _CudaState, None on the CPU."""
    layer = _layer(key)
    saved = _Saved(layer, x, dev, state)
    running = saved.running(dev)
    before = {n: t.clone() for n, t in running.items()}
    y = dev.empty(x.shape, torch.float32)
    try:
        saved.forward(y, dev)
        after = [running[n].clone() for n in _running_names(layer)]
    finally:
        for n, t in running.items():
            t.copy_(before[n])
    return y, saved.token(dev), after


@_forward_train_op.register_kernel("cuda")
def _(key, x, params, running, sparse_grads):
    return _forward_train(key, x, _TorchCuda(x.device), _CudaState.of(key))


@_forward_train_op.register_fake
def _(key, x, params, running, sparse_grads):
    return (torch.empty_like(x), x.new_empty(1, dtype=torch.uint8),
            [torch.empty_like(r) for r in running])


@torch.library.custom_op("peerlayer::backward", mutates_args=())
def _backward_op(key: int, context: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                 params: List[torch.Tensor], dense_experts: bool
                 ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """Backward of the training forward that made `context`: (dx, gradients of
    the dense parameters in params' order, expert rows [R], their down and up
    gradient rows [R, d]; or, with dense_experts, [N, d] gradients).  The CPU
    kernel; CUDA's (_cuda_backward) lists min(T*H*k, N) rows, see _pad_rows."""
    layer = _layer(key)
    saved = _Saved.find(context)
    if saved.used:
        saved.redo_forward(_HOST)
    g = core.Grads(layer, max(x.shape[0], 1), experts_dense=dense_experts)
    dx, _ = layer.backward(saved.ctx, dy.detach().contiguous().numpy(), g, dx=True)
    saved.used = True
    dense = [torch.from_numpy(getattr(g, _GRAD_FIELD[n])) for n in _trainable_names(layer)
             if n in _GRAD_FIELD]
    # Views of g's buffers (which they keep alive), not copies.
    return (torch.from_numpy(dx), dense, torch.from_numpy(g.expert_rows),
            torch.from_numpy(g.experts_down), torch.from_numpy(g.experts_up))


def _cuda_backward(key, context, x, dy, dense_experts, dev):
    """The backward op on a CUDA layer: peer_cuda_backward on dev's stream
    into buffers from dev (torch's caching allocator), nothing read back."""
    layer = _layer(key)
    saved = _Saved.find(context)
    if saved.used:
        saved.redo_forward(dev)
    g = _CudaGrads(layer, x.shape[0], dense_experts, dev, layer.config["d_model"])
    dx = dev.empty(x.shape, torch.float32)
    layer._call(lib.peer_cuda_backward, saved.ctx.handle, dy.data_ptr(), dx.data_ptr(),
                ctypes.byref(g.s), g.count.data_ptr(), dev.stream)
    saved.used = True
    return g.outputs(dx)


class _CudaGrads:
    """Device buffers (from dev) for a CUDA backward of t tokens and the
    peer_grads over them (`s`): the layer's dense gradients, and expert
    gradient rows `width` wide (d, or a shard's d/P columns): [T*H*k] sparse
    rows or, dense_experts, [N] rows that the backward adds into (zeroed);
    `count` receives the row count on the device."""

    def __init__(self, layer, t, dense_experts, dev, width):
        c = layer.config
        n, cap = layer.n_experts, t * c["n_heads"] * c["top_k"]
        s = _lib.peer_grads()
        self.dense = []
        for name in _trainable_names(layer):
            if name in _GRAD_FIELD:
                buf = dev.empty(layer.tensors[name][1], torch.float32)
                setattr(s, _GRAD_FIELD[name], buf.data_ptr())
                self.dense.append(buf)
        self.rows = dev.empty((max(cap, 1),), torch.int64)
        shape = (n, width) if dense_experts else (max(cap, 1), width)
        self.down, self.up = dev.empty(shape, torch.float32), dev.empty(shape, torch.float32)
        # no more distinct rows than that
        self.listed = n if dense_experts else min(cap, n)
        self.down[:self.listed].zero_()  # dense: backward adds; sparse: the rows past the count
        self.up[:self.listed].zero_()
        self.count = dev.empty((1,), torch.int64)
        s.experts_dense, s.expert_capacity = int(dense_experts), cap
        s.expert_rows, s.experts_down, s.experts_up = (self.rows.data_ptr(), self.down.data_ptr(),
                                                       self.up.data_ptr())
        self.s, self.dense_experts = s, dense_experts

    def outputs(self, dx):
        """(dx, dense gradients in the layer's order, expert rows, down, up) as
        the backward op returns them (sparse rows padded: _pad_rows)."""
        if self.dense_experts:
            return dx, self.dense, self.rows[:0], self.down, self.up
        listed = self.listed
        return (dx, self.dense, _pad_rows(self.rows[:listed], self.count), self.down[:listed],
                self.up[:listed])


def _pad_rows(rows, count):
    """rows whose first `count` entries (count: a one-element device tensor)
    are the distinct expert ids, ascending, the rest unwritten: the rest
    become the last id.  Their gradient rows are zero, so the list is a valid
    uncoalesced sparse index with the right sum, and the host never waits to
    read count."""
    if rows.numel() == 0:
        return rows
    last = rows.gather(0, (count - 1).clamp(min=0))
    return torch.where(torch.arange(rows.shape[0], device=rows.device) < count, rows, last)


@_backward_op.register_kernel("cuda")
def _(key, context, x, dy, params, dense_experts):
    return _cuda_backward(key, context, x, dy, dense_experts, _TorchCuda(x.device))


@_backward_op.register_fake
def _(key, context, x, dy, params, dense_experts):
    layer = _layer(key)
    names = _trainable_names(layer)
    dense = [torch.empty_like(p, dtype=torch.float32) for n, p in zip(names, params)
             if n in _GRAD_FIELD]
    rows = torch.library.get_ctx().new_dynamic_size()
    d = layer.config["d_model"]
    shape = (layer.n_experts, d) if dense_experts else (rows, d)
    return (torch.empty_like(x), dense, x.new_empty(rows, dtype=torch.int64),
            x.new_empty(shape), x.new_empty(shape))


def _setup_context(ctx, inputs, output):
    key, x, params, running, sparse_grads = inputs
    ctx.key, ctx.sparse, ctx.n_running = key, sparse_grads, len(running)
    ctx.save_for_backward(output[1], x, *params)


def _backward(ctx, dy, dcontext, drunning):
    context, x, *params = ctx.saved_tensors
    layer = _layer(ctx.key)
    names = _trainable_names(layer)
    dx, dense, rows, down, up = torch.ops.peerlayer.backward(
        ctx.key, context, x, dy.contiguous(), params, not ctx.sparse)
    dense = iter(dense)
    experts = {"experts.down": down, "experts.up": up}
    grads = []
    for n, p in zip(names, params):
        if n in experts:
            grads.append(_expert_grad(experts[n], rows, p, ctx.sparse, padded=x.is_cuda))
        else:
            grads.append(next(dense))
    return None, dx, grads, [None] * ctx.n_running, None


def _expert_grad(g, rows, p, sparse, padded):
    """The gradient of expert table p from the backward op's rows and gradient
    rows g: sparse COO (coalesced from the CPU; padded, from CUDA, repeats the
    last row, see _pad_rows) or dense; in p's dtype."""
    if sparse:
        g = torch.sparse_coo_tensor(rows.unsqueeze(0), g, p.shape, is_coalesced=not padded,
                                    check_invariants=False)
    return g.to(p.dtype)


_forward_train_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------- dense optimizers, sparse grads

_DENSE_ONLY = tuple(getattr(torch.optim, n) for n in
                    ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adadelta",
                     "ASGD", "Rprop", "LBFGS") if hasattr(torch.optim, n))


def _refuse_sparse_in_dense_optimizer(optimizer, args, kwargs):
    """Global optimizer pre-step hook: a dense-only torch optimizer about to
    meet PEER's sparse expert gradients fails with a message naming the fix,
    instead of torch's bare 'does not support sparse gradients'."""
    if not isinstance(optimizer, _DENSE_ONLY):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if getattr(p, "_peer_expert", False) and p.grad is not None and p.grad.is_sparse:
                raise TypeError(
                    f"peerlayer.PEER: {type(optimizer).__name__} cannot take the sparse "
                    "gradients of PEER's expert tables. Use peerlayer.optim.AdamW(model, ...) "
                    "(AdamW on the dense parameters, lazy sparse Adam on the expert rows, one "
                    "optimizer), or torch.optim.SparseAdam on PEER.sparse_parameters(), or "
                    "create PEER(..., sparse_grads=False) so that any optimizer works (dense "
                    "[N, d] gradients: every step then updates all N rows).")


from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

register_optimizer_step_pre_hook(_refuse_sparse_in_dense_optimizer)


# ------------------------------------------------ the library's own optimizer

class LayerOptimizer:
    """The library's optimizer (peer_optimizer: SGD with momentum or AdamW on
    the dense parameters, lazy SGD or Adam on the expert rows, state beside
    the layer: device memory for a CUDA layer) stepping a PEER module from
    its parameters' .grad, as a torch optimizer's step() does.  Made by
    PEER.layer_optimizer(kind=..., expert_kind=..., lr=..., ...) with
    peerlayer.Optimizer's arguments.  On CUDA the step is
    peer_cuda_optimizer_step on torch's current stream, reading the
    gradients where they are; sparse expert gradients are coalesced first
    (on CUDA torch waits for the device there, as in SparseAdam), dense ones
    update every row.  Both expert tables need gradients over the same rows
    (as one backward gives).  A move of the module (.to()) makes a new layer:
    make a new optimizer then."""

    def __init__(self, module, **settings):
        self.module = module
        self.optimizer = core.Optimizer(module.layer, **settings)

    def zero_grad(self, set_to_none=True):
        self.module.zero_grad(set_to_none)

    def set_lr(self, lr, expert_lr=0.0):
        self.optimizer.set_lr(lr, expert_lr)

    @property
    def step_count(self):
        return self.optimizer.step_count

    @torch.no_grad()
    def step(self):
        m = self.module
        if m.layer is not self.optimizer.layer:
            raise RuntimeError("peerlayer.LayerOptimizer: the module was moved (.to()) since "
                               "this optimizer was made; make a new one")
        grads = {name: p.grad for name, (_, _, p) in zip(m._trainable, m._own)}
        dev = _TorchCuda(m.experts.down.device) if m._cuda else _HOST
        g, keep = _layer_grads(m.layer, grads, dev)
        self.optimizer.step_pointers(g, dev.stream)
        del keep  # the step has read them (CPU) or is queued on the stream (CUDA)


def _layer_grads(layer, grads, dev=_HOST):
    """A peer_grads over torch gradients (name -> tensor or None) where the
    library reads them (dev.operand), and the tensors it points to
    (converted ones included: keep them alive)."""
    g = _lib.peer_grads()
    keep = []
    for name, field in _GRAD_FIELD.items():
        t = grads.get(name)
        if t is not None:
            t = dev.operand(t.to_dense().float())
            setattr(g, field, t.data_ptr())
            keep.append(t)
    down, up = (grads.get(n) for n in _EXPERTS)
    if (down is None) != (up is None):
        raise ValueError("peerlayer.LayerOptimizer: one expert table has a gradient and "
                         "the other none; the library steps both over the same rows")
    if down is not None:
        if down.is_sparse and up.is_sparse:
            down, up = down.coalesce(), up.coalesce()
            rows = down.indices()[0].contiguous()
            if not torch.equal(rows, up.indices()[0]):
                raise ValueError("peerlayer.LayerOptimizer: the expert tables' sparse "
                                 "gradients list different rows")
            down, up = down.values(), up.values()
        else:
            rows = torch.arange(layer.n_experts, device=down.device)
            down, up = down.to_dense(), up.to_dense()
            g.experts_dense = 1
        rows, down, up = dev.operand(rows), dev.operand(down.float()), dev.operand(up.float())
        g.expert_capacity = g.n_expert_rows = rows.numel()
        g.expert_rows, g.experts_down, g.experts_up = (rows.data_ptr(), down.data_ptr(),
                                                       up.data_ptr())
        keep += [rows, down, up]
    return g, keep


# ---------------------------------------------------------------- the module

class PEER(nn.Module):
    """The PEER layer as a torch module: y = PEER(x) for x [..., d_model].

    PEER(config, seed=None, ...) with config a "key=value,..." string, a dict,
    or keyword arguments (PEER.md names); PEER.from_file(path) loads a
    safetensors weight file.  seed: None draws the library's seed from torch's
    default generator (so torch.manual_seed decides it and two modules differ);
    an int is used as given.  threads: CPU threads (0 = OpenMP's default).
    device: "cpu" or "cuda[:i]".  sparse_grads: expert
    gradients as sparse COO tensors (default) or dense [N, d] tensors.
    dropout: probability of dropping elements of the layer's output in
    training (as the dropout that ends a transformer's MLP).  Computes in
    float32; other input dtypes are cast in and out."""

    def __new__(cls, *args, **kwargs):
        """PEER(..., process_group=pg) is the layer sharded over a
        torch.distributed group (None: the default group): a
        peerlayer.shard.ShardedPEER, README "Sharding"."""
        if cls is PEER and "process_group" in kwargs:
            from .shard import ShardedPEER
            cls = ShardedPEER
        return super().__new__(cls)

    def __init__(self, config=None, *, seed=None, threads=0, device="cpu", sparse_grads=True,
                 dropout=0.0, layer=None, **overrides):
        super().__init__()
        device = torch.device(device)
        if layer is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            layer = Layer(config, seed=seed, backend=device.type, threads=threads,
                          device=device.index or 0, **overrides)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"peerlayer.PEER: dropout {dropout} is not in [0, 1)")
        self.sparse_grads = bool(sparse_grads)
        self.dropout = float(dropout)
        self.query = nn.Module()
        if "query.norm.weight" in layer.tensors:
            self.query.norm = nn.Module()
        self.experts = nn.Module()
        self._bind(layer, device)

    def _bind(self, layer, device, values=None):
        """Make the module's parameters and buffers views of `layer`'s memory.
        Existing Parameter objects are kept (their .data is replaced), as
        torch's own .to() does, so optimizers holding them stay valid.  values:
        name -> tensor to copy in (cast to the new storage's dtype)."""
        self.layer = layer
        self._key = _register(layer)
        self._cuda_state = _CudaState(self._key, layer) if layer.backend == "cuda" else None
        c = layer.config
        self._d = c["d_model"]
        self._batchnorm = c["query_norm"] == "batchnorm"
        self._cuda = layer.backend == "cuda"
        self._trainable, self._own, self._running = [], [], []
        for name in layer.tensors:
            path, attr, is_buffer = _SLOTS[name]
            owner = self.get_submodule(path)
            t = _wrap(layer, name, device)
            if values is not None:
                with torch.no_grad():
                    t.copy_(values[name].to(t.device, t.dtype))
            if is_buffer:
                owner.register_buffer(attr, t)
                self._running.append((owner, attr))
                continue
            p = owner._parameters.get(attr)
            if p is None:
                p = nn.Parameter(t)
                owner.register_parameter(attr, p)
            else:
                p.data = t
                p.grad = None
            p._peer_expert = name in _EXPERTS
            self._trainable.append(name)
            self._own.append((owner, attr, p))

    @classmethod
    def from_file(cls, path, *, threads=0, device="cpu", sparse_grads=True, dropout=0.0):
        device = torch.device(device)
        layer = Layer.load(path, backend=device.type, threads=threads, device=device.index or 0)
        return cls(layer=layer, sparse_grads=sparse_grads, dropout=dropout, device=device)

    def save(self, path):
        """Write the layer as a PEER.md safetensors file (atomic)."""
        self.layer.save(path)

    @property
    def config(self):
        return dict(self.layer.config)

    def n_parameters(self):
        """All parameters of the layer (query, keys, the N-row expert tables)."""
        return self.layer.n_parameters

    def n_active_parameters(self):
        """Parameters one token touches: query, keys and its H*k expert rows."""
        return self.layer.n_active_parameters

    def extra_repr(self):
        c = self.layer.config
        text = ", ".join(f"{k}={v}" for k, v in c.items()) + f", backend={self.layer.backend}"
        return text + (f", dropout={self.dropout}" if self.dropout else "")

    def sparse_parameters(self):
        """The expert tables (sparse gradients when sparse_grads)."""
        return [self.experts.down, self.experts.up]

    def dense_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("experts.")]

    def layer_optimizer(self, **settings):
        """The library's optimizer over this layer (LayerOptimizer; settings as
        peerlayer.Optimizer: kind, expert_kind, lr, momentum, beta1, beta2,
        eps, weight_decay, expert_lr), on the CPU or on the GPU."""
        return LayerOptimizer(self, **settings)

    # -- forward
    def _params(self):
        out = []
        for owner, attr, p in self._own:
            if owner._parameters.get(attr) is not p:
                raise RuntimeError(
                    f"peerlayer.PEER: parameter {attr!r} was replaced (functional_call, "
                    "reparametrization or assignment); the library reads its weights from "
                    "its own memory: copy new values in with load_state_dict or copy_")
            out.append(p)
        return out

    def forward(self, x):
        d = self._d
        if x.shape[-1] != d:
            raise ValueError(f"peerlayer.PEER: input's last dimension is {x.shape[-1]}, "
                             f"d_model is {d}")
        if x.device.type != self.experts.down.device.type:
            raise RuntimeError(f"peerlayer.PEER: input on {x.device}, layer on "
                               f"{self.experts.down.device.type}; move one of them "
                               "(module.to(device) rebuilds the layer there)")
        params = self._params()
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, d).to(torch.float32).contiguous()
        needs_grad = torch.is_grad_enabled() and (x2.requires_grad or
                                                  any(p.requires_grad for p in params))
        if needs_grad:
            if self._batchnorm and not self.training:
                raise RuntimeError("peerlayer.PEER: backward through batch norm needs "
                                   "training mode (the library differentiates batch "
                                   "statistics only); use torch.no_grad() in eval mode")
            y = self._forward_train(x2, params)
        elif self.training and self._batchnorm:
            # Training-mode batch norm updates the running statistics, as torch's does.
            y = self._forward_train(x2, params)
        else:
            y = self._forward_infer(x2, params)
        y = y.reshape(*lead, d).to(dtype)
        if self.dropout and self.training:
            y = nn.functional.dropout(y, self.dropout, training=True)
        return y

    def _forward_infer(self, x2, params):
        return torch.ops.peerlayer.forward(self._key, x2, params)

    def _forward_train(self, x2, params):
        buffers = [getattr(owner, attr) for owner, attr in self._running]
        y, _, running = torch.ops.peerlayer.forward_train(self._key, x2, params, buffers,
                                                          self.sparse_grads)
        with torch.no_grad():
            for b, value in zip(buffers, running):
                b.copy_(value)
        return y

    def check(self):
        """CUDA: wait for torch's current stream, then raise PeerError if a
        call on this layer not checked yet met a NaN or infinity (in x, dy or
        a score: its batch's results are meaningless), or if the stream holds
        a CUDA error (peer_cuda_check).  Training does not wait by itself: call
        this where a wait costs little (beside loss.item()).  The inference
        forward calls it.  CPU: nothing to do (calls raise at once)."""
        if self._cuda:
            stream = torch.cuda.current_stream(self.experts.down.device).cuda_stream
            self.layer._call(lib.peer_cuda_check, ctypes.c_void_p(stream))

    # -- moves, copies
    def _values(self, layer=None):
        out = {}
        for name in (layer or self.layer).tensors:
            path, attr, _ = _SLOTS[name]
            out[name] = getattr(self.get_submodule(path), attr).detach().clone()
        return out

    def _rebuild(self, backend=None, device=None, weight_dtype=None):
        """A new C layer of this one's config on `backend` / `weight_dtype`,
        holding this one's values; the module's tensors become views of it."""
        c = dict(self.layer.config)
        if weight_dtype is not None:
            c["weight_dtype"] = weight_dtype
        backend = backend or self.layer.backend
        device = torch.device(device if device is not None else
                              ("cpu" if backend == "cpu" else "cuda"))
        values = self._values()
        layer = Layer(c, seed=None, backend=backend, threads=self.layer.threads,
                      device=device.index or 0)
        self._bind(layer, device, values)

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .cpu(), .float(), .bfloat16(), ...: the C layer owns
        the memory, so a move rebuilds it on the target backend or expert-table
        dtype (bfloat16 -> bf16 tables, float32 -> f32; compute is f32), and an
        unsupported target is refused here, at the call, not at the next
        forward."""
        try:
            # The expert tables' own device and dtype: a dtype-only conversion
            # keeps a CUDA module on its GPU, a device-only move keeps bf16
            # tables bf16.
            probe = fn(torch.zeros(1, dtype=self.experts.down.dtype,
                                   device=self.experts.down.device))
        except (RuntimeError, AssertionError) as e:  # e.g. .cuda() where torch has no GPU
            if lib.has_cuda:
                raise
            raise RuntimeError("peerlayer.PEER: cannot move: this libpeer was built without the "
                               f"CUDA backend, so the layer stays on the CPU (torch: {e})") from e
        dtype, device = probe.dtype, probe.device
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"peerlayer.PEER: cannot convert to {dtype}: the library computes "
                            "in float32 and stores expert tables as f32 or bf16 "
                            "(.to(torch.bfloat16) maps to bf16 tables); keep PEER in float32 "
                            "or bfloat16, its inputs and outputs keep their own dtype")
        backend = {"cpu": "cpu", "cuda": "cuda"}.get(device.type)
        if backend is None:
            raise RuntimeError(f"peerlayer.PEER: no backend for device {device}; the library "
                               "has CPU and CUDA backends")
        if backend == "cuda" and not lib.has_cuda:
            raise RuntimeError("peerlayer.PEER: cannot move to CUDA: this libpeer was built "
                               "without the CUDA backend (rebuild with -DPEER_CUDA=ON), so the "
                               "layer stays on the CPU")
        want = "bf16" if dtype == torch.bfloat16 else "f32"
        same_device = backend == self.layer.backend and (
            backend == "cpu" or self.experts.down.device == device)
        if same_device and want == self.layer.config["weight_dtype"]:
            return self
        self._rebuild(backend=backend, device=device, weight_dtype=want)
        return self

    def __getstate__(self):
        """Pickling and deepcopy: the tensors travel as tensors (copies of the C
        memory); the C layer is rebuilt from the config on the other side."""
        state = self.__dict__.copy()
        layer = state.pop("layer")
        state["_layer_spec"] = {"config": dict(layer.config), "backend": layer.backend,
                                "threads": layer.threads}
        state.pop("_key", None)
        state.pop("_cuda_state", None)
        return state

    def __setstate__(self, state):
        spec = state.pop("_layer_spec")
        super().__setstate__(state)
        device = self.experts.down.device
        layer = Layer(spec["config"], seed=None, backend=spec["backend"], threads=spec["threads"],
                      device=device.index or 0)
        self._bind(layer, device, self._values(layer))
