"""A sharded PEER layer over torch.distributed (README "Sharding").

The C library's sharded layers split the expert tables by columns over the
ranks of a process group: rank r holds columns [r*d/P, (r+1)*d/P) of
experts.down and experts.up; retrieval is replicated.  Their communicator is
built here from a torch.distributed process group: the library's all-reduce
and all-gather call back into Python and run dist.all_reduce /
dist.all_gather_into_tensor on tensors over the library's own buffers.  On
the CPU backend (peer.h, peer_shard_*: a peer_comm) those are host memory
(gloo); on the CUDA backend (peer_cuda.h, peer_cuda_shard_*: a
peer_cuda_comm) they are device memory, and each collective runs with the
stream the library names (torch's current stream, where the module queues
its calls) made torch's current stream, so NCCL, which torch runs on a
stream of its own ordered after the current one, is ordered with the
library's kernels.  Every call that communicates is collective: every rank
of the group makes it with the same x (and dy).

Two levels.  ShardedPEER, what peerlayer.nn.PEER(..., process_group=pg)
returns (device="cuda" for the CUDA backend), is the torch module:
parameters are views of this rank's shard (its [N, d/P] expert columns, the
replicated rest in full), autograd runs the shard's collective training
forward and backward, expert gradients are sparse rows (or dense) as
nn.PEER's, state_dict is per rank.  Below it, the numpy-level CPU layer:

    dist.init_process_group("gloo", ...)
    layer = ShardedLayer(d_model=512, seed=0)          # process_group=None: WORLD
    y = layer.forward(x)                               # x, y [T, d] on every rank
    ctx, grads = layer.context(T), layer.grads(T)
    y = layer.forward_train(ctx, x)
    dx, grads = layer.backward(ctx, dy, grads)         # expert rows: [R, d/P]
    opt = ShardedOptimizer(layer, kind="adam")
    opt.step(grads)
    layer.save(f"shard-{rank}.safetensors", opt)       # peer_shard_save

and CudaShardedLayer, the CUDA one on torch tensors (forward, retrieve,
train_forward, train_backward, check; CudaShardedOptimizer; the same files).
"""

import ctypes

import numpy as np
import torch
import torch.distributed as dist

from . import _lib
from . import nn as _nn
from .core import (_NP_DTYPE, Grads, _config_dict, _config_struct, _input, _options, _output,
                   _ptr, _View, check, lib, optim_config)
from .nn import _EXPERTS, PEER, LayerOptimizer

_ALLREDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_ALLGATHER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_size_t)
# peer_cuda.h's: the same, on device pointers, with the stream to queue on
_CUDA_ALLREDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_void_p)
_CUDA_ALLGATHER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


class peer_comm(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_void_p), ("rank", ctypes.c_int), ("world", ctypes.c_int),
                ("allreduce_sum", _ALLREDUCE), ("allgather", _ALLGATHER)]


class peer_cuda_comm(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_void_p), ("rank", ctypes.c_int), ("world", ctypes.c_int),
                ("allreduce_sum", _CUDA_ALLREDUCE), ("allgather", _CUDA_ALLGATHER)]


_vp, _i64 = ctypes.c_void_p, ctypes.c_int64
_PROTOS = {
    "peer_shard_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp, _vp, ctypes.POINTER(peer_comm)]),
    "peer_shard_free": (None, [_vp]),
    "peer_shard_init": (ctypes.c_int, [_vp, ctypes.c_uint64]),
    "peer_shard_columns": (None, [_vp, ctypes.POINTER(_i64), ctypes.POINTER(_i64)]),
    "peer_shard_n_params": (ctypes.c_int, [_vp]),
    "peer_shard_param": (ctypes.c_int, [_vp, ctypes.c_int, ctypes.POINTER(_lib.peer_tensor)]),
    "peer_shard_forward": (ctypes.c_int, [_vp, _i64, _vp, _vp, _vp, _vp]),
    "peer_shard_context_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp, _i64]),
    "peer_shard_forward_train": (ctypes.c_int, [_vp, _vp, _i64, _vp, _vp]),
    "peer_shard_backward": (ctypes.c_int, [_vp, _vp, _vp, _vp, ctypes.POINTER(_lib.peer_grads)]),
    "peer_shard_optimizer_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp,
                                                   ctypes.POINTER(_lib.peer_optim_config)]),
    "peer_shard_optimizer_free": (None, [_vp]),
    "peer_shard_optimizer_step": (ctypes.c_int, [_vp, ctypes.POINTER(_lib.peer_grads)]),
    "peer_shard_optimizer_step_count": (_i64, [_vp]),
    "peer_shard_save": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
    "peer_shard_load": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
    "peer_shard_load_full": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
    "peer_shard_split": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, _vp]),
    "peer_shard_merge": (ctypes.c_int, [_vp, ctypes.c_int, ctypes.c_char_p]),
    "peer_layer_check_file": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(_lib.peer_config)]),
}


def split(path, world, out_paths):
    """One unsharded weight file or checkpoint into `world` shard files."""
    arr = (ctypes.c_char_p * int(world))(*[str(p).encode() for p in out_paths])
    check(lib.peer_shard_split(str(path).encode(), int(world), arr))


def merge(paths, out_path):
    """Shard files (every rank once, any order) into one unsharded file."""
    arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
    check(lib.peer_shard_merge(arr, len(paths), str(out_path).encode()))


# peer_cuda.h "sharding": present in libraries built with the CUDA backend
_CUDA_PROTOS = {
    "peer_cuda_shard_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp, _vp,
                                              ctypes.POINTER(peer_cuda_comm)]),
    "peer_cuda_shard_free": (None, [_vp]),
    "peer_cuda_shard_init": (ctypes.c_int, [_vp, ctypes.c_uint64]),
    "peer_cuda_shard_columns": (None, [_vp, ctypes.POINTER(_i64), ctypes.POINTER(_i64)]),
    "peer_cuda_shard_n_params": (ctypes.c_int, [_vp]),
    "peer_cuda_shard_param": (ctypes.c_int, [_vp, ctypes.c_int, ctypes.POINTER(_lib.peer_tensor)]),
    "peer_cuda_shard_forward": (ctypes.c_int, [_vp, _i64, _vp, _vp, _vp, _vp, _vp]),
    "peer_cuda_shard_retrieve": (ctypes.c_int, [_vp, _i64, _vp, _vp, _vp, _vp, _vp]),
    "peer_cuda_shard_check": (ctypes.c_int, [_vp, _vp]),
    "peer_cuda_shard_context_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp, _i64]),
    "peer_cuda_shard_forward_train": (ctypes.c_int, [_vp, _vp, _i64, _vp, _vp, _vp]),
    "peer_cuda_shard_backward": (ctypes.c_int, [_vp, _vp, _vp, _vp,
                                                ctypes.POINTER(_lib.peer_grads), _vp, _vp]),
    "peer_cuda_shard_optimizer_create": (ctypes.c_int, [ctypes.POINTER(_vp), _vp,
                                                        ctypes.POINTER(_lib.peer_optim_config)]),
    "peer_cuda_shard_save": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
    "peer_cuda_shard_load": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
    "peer_cuda_shard_load_full": (ctypes.c_int, [_vp, _vp, ctypes.c_char_p]),
}
HAS_CUDA = lib.has_cuda and hasattr(lib, "peer_cuda_shard_create")
for _name, (_res, _args) in {**_PROTOS, **(_CUDA_PROTOS if HAS_CUDA else {})}.items():
    _fn = getattr(lib, _name)
    _fn.restype, _fn.argtypes = _res, _args


class _TorchComm:
    """A communicator over a torch.distributed process group: a peer_comm on
    host buffers (device None), or a peer_cuda_comm on `device`'s memory whose
    collectives run with the stream the library names as torch's current
    stream (NCCL: torch queues the collective after the work on that stream
    and the work queued there next after the collective).  The library's
    buffers are wrapped as tensors, not copied: dist.all_reduce sums in
    place, dist.all_gather_into_tensor writes the receive buffer.  The
    callbacks keep any Python exception for the caller, and return nonzero."""

    def __init__(self, group, device=None):
        self.group, self.device = group, device
        self.error = None
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        reduce_t, gather_t, comm_t = ((_ALLREDUCE, _ALLGATHER, peer_comm) if device is None else
                                      (_CUDA_ALLREDUCE, _CUDA_ALLGATHER, peer_cuda_comm))
        self._reduce, self._gather = reduce_t(self._allreduce), gather_t(self._allgather)
        self.c = comm_t(None, rank, world, self._reduce, self._gather)

    def dev(self):
        """The buffers and views of this communicator's memory (nn._HOST, or
        nn._TorchCuda on its device)."""
        return _nn._HOST if self.device is None else _nn._TorchCuda(self.device)

    @staticmethod
    def _view(dev, ptr, n, dtype):
        t = dev.wrap(ptr, (n,), dtype, None)
        if n and t.data_ptr() != ptr:  # a copy would leave the library's buffer as it was
            raise RuntimeError("peerlayer.shard: torch copied a buffer it was to wrap")
        return t

    def _collective(self, stream, run):
        try:
            dev = self.dev()
            with dev.on_stream(stream):
                run(dev)
            return 0
        except BaseException as e:  # noqa: BLE001 (reported by the caller)
            self.error = e
            return 1

    def _allreduce(self, _handle, data, count, stream=None):
        return self._collective(stream, lambda dev: dist.all_reduce(
            self._view(dev, data, count, np.float32), op=dist.ReduceOp.SUM, group=self.group))

    def _allgather(self, _handle, send, recv, nbytes, stream=None):
        world = self.c.world
        return self._collective(stream, lambda dev: dist.all_gather_into_tensor(
            self._view(dev, recv, world * nbytes, np.uint8),
            self._view(dev, send, nbytes, np.uint8), group=self.group))

    def check(self, status):
        """check(status), raising the callback's own exception first."""
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError("the process group failed inside a sharded call") from e
        check(status)


class _ShardHandle:
    """Owns a C shard (and the communicator it calls) until the layer and
    every view of its parameters have let go; `free` is its backend's
    peer_shard_free or peer_cuda_shard_free."""

    def __init__(self, h, comm, free):
        self.h, self.comm, self.free = h, comm, free

    def __del__(self):
        if getattr(self, "h", None):
            self.free(self.h)
            self.h = None


def _common_seed(seed, group, what, *, draw, dev=_nn._HOST):
    """The seed every rank of `group` uses.  Collective (on tensors from
    `dev`: CUDA ones for NCCL).  An int given alike on every rank is used;
    None on every rank gives None, or with draw=True rank 0's draw from
    torch's default generator.  Anything else is refused on every rank alike:
    the replicated parameters would differ between ranks."""
    given = seed is not None
    value = int(seed) % 2**64 if given else \
        int(torch.randint(0, 2**62, (1,)).item()) if draw else 0
    mine = dev.empty((3,), torch.int64)
    mine.copy_(torch.tensor([int(given), value >> 32, value & 0xFFFFFFFF], dtype=torch.int64))
    rows = [dev.empty((3,), torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    rows = [r.tolist() for r in rows]
    if not any(r[0] for r in rows):
        return (rows[0][1] << 32 | rows[0][2]) if draw else None
    if any(r != rows[0] for r in rows):
        seeds = ", ".join(f"rank {i}: {r[1] << 32 | r[2] if r[0] else None}"
                          for i, r in enumerate(rows))
        raise ValueError(f"{what}: the ranks of the group were given different seeds ({seeds}); "
                         "the replicated parameters would differ: pass the same seed on every "
                         "rank, or None on every rank")
    return value


class _Shard:
    """What the two backends' shards share: collective creation (refused on
    every rank alike when d_model is not divisible by the group's size or
    the ranks' configs or seeds differ), parameters, init, contexts, files.
    `tensors` is as peerlayer.Layer's, with experts.* as this rank's [N, d/P]
    columns."""

    _api = None  # the C library's calls for this backend: peer_shard_, peer_cuda_shard_

    def __init__(self, config=None, *, seed=0, threads=0, process_group=None, **overrides):
        self.group = process_group if process_group is not None else dist.group.WORLD
        cfg = _config_struct(config, **overrides)
        self.config = _config_dict(cfg)
        self.n_experts = self.config["n_subkeys"] ** 2
        self.comm = _TorchComm(self.group, self.device)
        opt = _options(self.backend, threads, 0 if self.device is None else self.device.index)
        h = ctypes.c_void_p()
        self.comm.check(self._fn("create")(ctypes.byref(h), ctypes.byref(cfg), ctypes.byref(opt),
                                           ctypes.byref(self.comm.c)))
        self._h = h
        self._owner = _ShardHandle(h, self.comm, self._fn("free"))
        c0, cols = _i64(), _i64()
        self._fn("columns")(h, ctypes.byref(c0), ctypes.byref(cols))
        self.col0, self.cols = c0.value, cols.value
        self.rank, self.world = self.comm.c.rank, self.comm.c.world
        self.tensors = {}  # name -> (pointer, shape, numpy dtype), as Layer.tensors
        for i in range(self._fn("n_params")(h)):
            t = _lib.peer_tensor()
            check(self._fn("param")(h, i, ctypes.byref(t)))
            self.tensors[t.name.decode()] = (t.data, tuple(t.shape[: t.ndim]), _NP_DTYPE[t.dtype])
        # numpy views of the shard's memory (host shards); each keeps the shard alive
        self.params = {} if self.backend != "cpu" else {
            name: np.asarray(_View(ptr, shape, dt, self._owner))
            for name, (ptr, shape, dt) in self.tensors.items()}
        seed = _common_seed(seed, self.group, "ShardedLayer", draw=False, dev=self.comm.dev())
        if seed is not None:
            self.init(seed)

    def _fn(self, name):
        return getattr(lib, self._api + name)

    def init(self, seed):
        """Local: this rank's part of peer_layer_init(seed) (the same seed on
        every rank, or the replicated parameters differ)."""
        check(self._fn("init")(self._h, ctypes.c_uint64(int(seed))))

    @property
    def n_parameters(self):
        """As peer_layer_n_parameters, for what this rank holds: the
        replicated tensors and its expert columns."""
        return sum(int(np.prod(shape)) for _, shape, _ in self.tensors.values())

    @property
    def n_active_parameters(self):
        """As peer_layer_n_active_parameters, for this rank's columns."""
        c = self.config
        return self.n_parameters + 2 * (c["n_heads"] * c["top_k"] - self.n_experts) * self.cols

    def context(self, max_tokens):
        return ShardedContext(self, max_tokens)

    def save(self, path, optimizer=None):
        """This rank's shard file (with the optimizer's state and step)."""
        check(self._fn("save")(self._h, optimizer._h if optimizer else None,
                               str(path).encode()))

    def load(self, path, optimizer=None):
        check(self._fn("load")(self._h, optimizer._h if optimizer else None,
                               str(path).encode()))

    def load_full(self, path, optimizer=None):
        """An unsharded weight file or checkpoint: the replicated tensors and
        this rank's columns (with the optimizer's state and step)."""
        check(self._fn("load_full")(self._h, optimizer._h if optimizer else None,
                                    str(path).encode()))




class ShardedLayer(_Shard):
    """This rank's shard of a PEER layer on the CPU backend (config as
    peerlayer.Layer: a "key=value" string, a dict or keywords; collective to
    create).  `params` and `tensors` are as peerlayer.Layer's, with experts.*
    as this rank's [N, d/P] columns."""

    backend = "cpu"
    device = None  # host memory
    _api = "peer_shard_"

    def _x(self, x):
        x = _input(x, np.float32, None, "x")
        if x.ndim != 2 or x.shape[1] != self.config["d_model"]:
            raise ValueError(f"x: shape {x.shape}, expected [T, {self.config['d_model']}]")
        return x

    def forward(self, x, out=None, *, indices=False):
        """y [T, d] (gathered: the same on every rank; `out` may be a float32
        [T, d] array to write into); with indices=True, (y, indices [T, H, k])."""
        x = self._x(x)
        y = _output(out, np.float32, x.shape, "out")
        ids = np.empty((x.shape[0], self.config["n_heads"], self.config["top_k"]), np.int64) \
            if indices else None
        self.comm.check(lib.peer_shard_forward(self._h, x.shape[0], _ptr(x), _ptr(y), _ptr(ids),
                                               None))
        return (y, ids) if indices else y

    def grads(self, max_tokens, *, experts_dense=False):
        """Gradient buffers: dense ones in full, expert rows [R, d/P] (or,
        experts_dense, [N, d/P] tables that backward adds into)."""
        return ShardedGrads(self, max_tokens, experts_dense=experts_dense)

    def forward_train(self, ctx, x):
        x = self._x(x)
        y = np.empty_like(x)
        self.comm.check(lib.peer_shard_forward_train(self._h, ctx._h, x.shape[0], _ptr(x),
                                                     _ptr(y)))
        ctx.x = x
        return y

    def backward(self, ctx, dy, grads=None):
        """(dx [T, d], grads) of the last forward_train on ctx."""
        if ctx.x is None:
            raise ValueError("backward: ctx holds no forward_train")
        dy = _input(dy, np.float32, ctx.x.shape, "dy")
        dx = _output(None, np.float32, dy.shape, "dx")
        if grads is None:
            grads = self.grads(ctx.max_tokens)
        self.comm.check(lib.peer_shard_backward(self._h, ctx._h, _ptr(dy), _ptr(dx),
                                                ctypes.byref(grads._s)))
        grads.n_expert_rows = int(grads._s.n_expert_rows)
        return dx, grads

    # The torch module's training calls (ShardedPEER), on tensors; `dev` is
    # nn._HOST here.
    def train_forward(self, ctx, x, dev):
        """y of forward_train(ctx, x), as a tensor."""
        return torch.from_numpy(self.forward_train(ctx, x.detach().numpy()))

    def train_backward(self, ctx, dy, dense_experts, dev):
        """backward(ctx, dy) as tensors: (dx, dense gradients in the
        parameters' order, expert rows, their down and up gradient rows)."""
        grads = self.grads(ctx.max_tokens, experts_dense=dense_experts)
        dx, grads = self.backward(ctx, dy.detach().contiguous().numpy(), grads)
        dense = grads.dense()
        return (torch.from_numpy(dx),
                [torch.from_numpy(dense[n]) for n in _nn._trainable_names(self) if n in dense],
                *(torch.from_numpy(a) for a in (grads.expert_rows, grads.experts_down,
                                                grads.experts_up)))

    def optimizer(self, **settings):
        """The library's optimizer of this shard (ShardedOptimizer)."""
        return ShardedOptimizer(self, **settings)


def _cuda_device(device):
    """torch.device("cuda", i) for "cuda[:i]", an index or None (torch's
    current device; 0 where torch sees no GPU: the emulated library)."""
    device = torch.device("cuda") if device is None else \
        torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"peerlayer.shard: device {device} is not a CUDA device")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()
                              if torch.cuda.is_available() else 0)
    return device


class CudaShardedLayer(_Shard):
    """This rank's shard of a CUDA layer (peer_cuda.h "sharding"), as
    ShardedLayer, on `device` (this rank's GPU: "cuda:i", an index, or None
    for torch's current device): parameters in device memory (`tensors`
    holds device pointers; `params` is empty), collectives over the group on
    that device's memory (NCCL).  The calls take tensors on the device and
    `dev`, an nn._TorchCuda made for the call (torch's caching allocator and
    current stream); they queue their work, collectives included, on
    dev.stream and wait for nothing (check() waits and reports non-finite
    values)."""

    backend = "cuda"
    _api = "peer_cuda_shard_"

    def __init__(self, config=None, *, device=None, seed=0, process_group=None, **overrides):
        if not HAS_CUDA:
            raise RuntimeError(f"peerlayer.shard: {lib.path} was built without the CUDA backend "
                               "(or its sharded layer): rebuild it with -DPEER_CUDA=ON")
        self.device = _cuda_device(device)
        super().__init__(config, seed=seed, threads=0, process_group=process_group, **overrides)

    def _x(self, x, dev):
        if x.dim() != 2 or x.shape[1] != self.config["d_model"] or x.dtype != torch.float32:
            raise ValueError(f"x: shape {tuple(x.shape)} {x.dtype}, expected float32 "
                             f"[T, {self.config['d_model']}]")
        return dev.operand(x)

    def _thk(self, x, dev, dtype):
        return dev.empty((x.shape[0], self.config["n_heads"], self.config["top_k"]), dtype)

    def forward(self, x, dev, *, indices=False):
        """y [T, d] (gathered: the same on every rank); with indices=True,
        (y, indices [T, H, k])."""
        x = self._x(x, dev)
        y = dev.empty(x.shape, torch.float32)
        ids = self._thk(x, dev, torch.int64) if indices else None
        self.comm.check(lib.peer_cuda_shard_forward(
            self._h, x.shape[0], x.data_ptr(), y.data_ptr(),
            None if ids is None else ids.data_ptr(), None, dev.stream))
        return (y, ids) if indices else y

    def retrieve(self, x, dev):
        """Local: (indices [T, H, k], scores, gates), as Layer.retrieve."""
        x = self._x(x, dev)
        ids, scores, gates = (self._thk(x, dev, t) for t in
                              (torch.int64, torch.float32, torch.float32))
        check(lib.peer_cuda_shard_retrieve(self._h, x.shape[0], x.data_ptr(), ids.data_ptr(),
                                           scores.data_ptr(), gates.data_ptr(), dev.stream))
        return ids, scores, gates

    def check(self, dev):
        """Wait for dev.stream; PeerError for a non-finite value a call met
        (peer_cuda_shard_check)."""
        check(lib.peer_cuda_shard_check(self._h, dev.stream))

    def optimizer(self, **settings):
        """The library's optimizer of this shard (CudaShardedOptimizer)."""
        return CudaShardedOptimizer(self, **settings)

    def train_forward(self, ctx, x, dev):
        """Collective: y [T, d] of the training forward (batch norm on the
        batch's statistics, running ones updated); ctx keeps x (which must
        not change until the backward) and what the backward needs."""
        x = self._x(x.detach(), dev)
        y = dev.empty(x.shape, torch.float32)
        self.comm.check(lib.peer_cuda_shard_forward_train(self._h, ctx._h, x.shape[0],
                                                          x.data_ptr(), y.data_ptr(), dev.stream))
        ctx.x = x
        return y

    def train_backward(self, ctx, dy, dense_experts, dev):
        """Collective: the backward of the last train_forward on ctx, into
        buffers from dev: (dx, dense gradients in the parameters' order,
        expert rows, down and up gradient rows [R, d/P]; R = min(T*H*k, N)
        with the rows past the count padded as nn._pad_rows; or, dense_experts,
        [N, d/P] tables)."""
        if ctx.x is None:
            raise ValueError("backward: ctx holds no forward_train")
        dy = dev.operand(dy)
        if dy.shape != ctx.x.shape:
            raise ValueError(f"dy: shape {tuple(dy.shape)}, expected {tuple(ctx.x.shape)}")
        g = _nn._CudaGrads(self, ctx.x.shape[0], dense_experts, dev, self.cols)
        dx = dev.empty(dy.shape, torch.float32)
        self.comm.check(lib.peer_cuda_shard_backward(self._h, ctx._h, dy.data_ptr(), dx.data_ptr(),
                                                     ctypes.byref(g.s), g.count.data_ptr(),
                                                     dev.stream))
        return g.outputs(dx)


class ShardedContext:
    """A training context of a shard (peer_shard_context_create, or
    peer_cuda_shard_context_create: device memory) for up to max_tokens."""

    def __init__(self, layer, max_tokens):
        self.layer, self.max_tokens, self.x = layer, int(max_tokens), None
        h = ctypes.c_void_p()
        check(layer._fn("context_create")(ctypes.byref(h), layer._h, self.max_tokens))
        self._h = h

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_context_free(self._h)
            self._h = None


class ShardedGrads(Grads):
    """peerlayer.Grads with the expert rows [R, d/P] of this rank's columns."""

    def __init__(self, layer, max_tokens, *, experts_dense=False):  # noqa: D107 (Grads' fields)
        c, t = layer.config, layer.tensors
        s = _lib.peer_grads()

        def dense(name):
            return np.zeros(t[name][1], np.float32) if name in t else None

        self.layer = layer
        self.query_weight, self.query_bias = dense("query.weight"), dense("query.bias")
        self.norm_weight, self.norm_bias = dense("query.norm.weight"), dense("query.norm.bias")
        self.keys = dense("keys")
        cap = int(max_tokens) * c["n_heads"] * c["top_k"]
        self.experts_dense = bool(experts_dense)
        self._rows = np.zeros(max(cap, 1), np.int64)
        shape = (layer.n_experts if experts_dense else max(cap, 1), layer.cols)
        self._down = np.zeros(shape, np.float32)
        self._up = np.zeros(shape, np.float32)
        for f in ("query_weight", "query_bias", "norm_weight", "norm_bias", "keys"):
            setattr(s, f, _ptr(getattr(self, f)))
        s.experts_dense = int(experts_dense)
        s.expert_capacity = cap
        s.expert_rows, s.experts_down, s.experts_up = _ptr(self._rows), _ptr(self._down), \
            _ptr(self._up)
        self._s = s
        self.n_expert_rows = 0


class ShardedOptimizer:
    """peer_shard_optimizer: peerlayer.Optimizer's rules on a shard (local: no
    communication); settings as peerlayer.Optimizer's."""

    def __init__(self, layer, *, kind="adam", expert_kind="adam", **hyper):
        cfg = optim_config(kind, expert_kind, **hyper)
        h = ctypes.c_void_p()
        check(layer._fn("optimizer_create")(ctypes.byref(h), layer._h, ctypes.byref(cfg)))
        self.layer, self._h = layer, h

    def step(self, grads):
        self.step_pointers(grads._s)

    def step_pointers(self, grads, stream=None):
        """One step from a _lib.peer_grads (expert rows [R, d/P]) whose buffers
        the caller keeps alive for the call; stream is unused (CPU)."""
        check(lib.peer_shard_optimizer_step(self._h, ctypes.byref(grads)))

    def set_lr(self, lr, expert_lr=0.0):
        raise NotImplementedError("ShardedOptimizer: the C library has no learning-rate change "
                                  "for a shard's optimizer (peer_shard_optimizer_* has no "
                                  "set_lr); make a new optimizer, or use a torch optimizer")

    _count, _free = "peer_shard_optimizer_step_count", "peer_shard_optimizer_free"

    @property
    def step_count(self):
        return int(getattr(lib, self._count)(self._h))

    def __del__(self):
        if getattr(self, "_h", None):
            getattr(lib, self._free)(self._h)
            self._h = None


class CudaShardedOptimizer(ShardedOptimizer):
    """A CUDA shard's optimizer (peer_cuda_shard_optimizer_create: a
    peer_optimizer whose state is device memory, [N, d/P] for the expert
    tables), stepped on device gradients; local."""

    def step(self, grads):
        raise TypeError("CudaShardedOptimizer: step_pointers takes the device gradients")

    def step_pointers(self, grads, stream=None):
        """One step (peer_cuda_optimizer_step) from a _lib.peer_grads of
        device pointers (expert rows [R, d/P], strictly ascending, R in
        grads.n_expert_rows) that stay valid until the step has run on
        `stream` (a cudaStream_t; None: the legacy default stream); queued,
        not waited for."""
        check(lib.peer_cuda_optimizer_step(self._h, ctypes.byref(grads), None, stream))

    def set_lr(self, lr, expert_lr=0.0):
        check(lib.peer_optimizer_set_lr(self._h, float(lr), float(expert_lr)))

    _count, _free = "peer_optimizer_step_count", "peer_optimizer_free"


# ------------------------------------------------------------ the torch module

class _TrainRun:
    """One collective training forward of a shard, kept for its backward: the
    context (from the module's pool on CUDA, _CudaState) and x (which the
    context points into).  Not y: autograd's record of the forward keeps
    this, and y keeps that record (a cycle, which the garbage collector
    would end in any order: the context freed, then handed back)."""

    def __init__(self, module, x):
        layer = self.layer = module.layer
        self.state = module._cuda_state
        self.running = [getattr(owner, attr) for owner, attr in module._running]
        n = max(x.shape[0], 1)
        self.ctx = self.state.take(n) if self.state is not None else layer.context(n)
        self.x = x.detach()
        self.used = False

    def forward(self, dev):
        """y of the training forward."""
        return self.layer.train_forward(self.ctx, self.x, dev)

    def backward(self, dy, experts_dense, dev):
        """The layer's train_backward.  A second backward of one forward
        (retain_graph=True) runs the forward again (on the CPU on a fresh
        context), as the library consumes the forward with its backward; the
        running statistics that forward would update again are put back."""
        if self.used:
            before = [b.clone() for b in self.running]
            if self.state is None:
                self.ctx = self.layer.context(self.ctx.max_tokens)
            try:
                self.forward(dev)
            finally:
                for b, value in zip(self.running, before):
                    b.copy_(value)
        out = self.layer.train_backward(self.ctx, dy, experts_dense, dev)
        self.used = True
        return out

    def __del__(self):
        if getattr(self, "state", None) is not None and getattr(self, "ctx", None) is not None:
            self.state.give_back(self.ctx)


class _ShardedTrain(torch.autograd.Function):
    """y = the shard's training forward of x; the backward is the shard's
    (collective: every rank of the group runs it, as it runs the forward).
    On CUDA both run on torch's current stream when called (autograd runs a
    backward on its forward's stream)."""

    @staticmethod
    def forward(ctx, module, x, *params):
        ctx.run = _TrainRun(module, x)
        ctx.module, ctx.params = module, params
        return ctx.run.forward(module._dev())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        m = ctx.module
        dx, dense, rows, down, up = ctx.run.backward(dy, not m.sparse_grads, m._dev())
        dense, experts = iter(dense), {"experts.down": down, "experts.up": up}
        out = [_nn._expert_grad(experts[name], rows, p, m.sparse_grads, padded=m._cuda)
               if name in experts else next(dense) for name, p in zip(m._trainable, ctx.params)]
        return (None, dx, *out)


class _ShardedLayerOptimizer(LayerOptimizer):
    """LayerOptimizer stepping a ShardedPEER with its shard's optimizer."""

    def __init__(self, module, **settings):  # noqa: D107 (LayerOptimizer's, another optimizer)
        self.module = module
        self.optimizer = module.layer.optimizer(**settings)


def _shard_device(device):
    """None for the CPU backend, the torch.device("cuda", i) of a CUDA shard
    (refused, before anything collective, where the library has none)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise RuntimeError(f"peerlayer.PEER(process_group=...): no backend for device {device}; "
                           "the sharded layer runs on the CPU (gloo) or CUDA (NCCL)")
    if not HAS_CUDA:
        raise RuntimeError(f"peerlayer.PEER(process_group=...): device {device}: {lib.path} "
                           "was built without the CUDA backend (or its sharded layer): rebuild "
                           "it with -DPEER_CUDA=ON")
    return _cuda_device(device)


def _sharded_layer(config, seed, threads, device, group, **overrides):
    if device is None:
        return ShardedLayer(config, seed=seed, threads=threads, process_group=group, **overrides)
    return CudaShardedLayer(config, device=device, seed=seed, process_group=group, **overrides)


class ShardedPEER(PEER):
    """peerlayer.nn.PEER sharded over a torch.distributed process group: what
    PEER(config, ..., process_group=pg) returns (pg None: the default group).

    Rank r holds columns [r*d/P, (r+1)*d/P) of the expert tables as its
    experts.down / experts.up parameters ([N, d/P], 1/P of the memory) and the
    query, batch norm and keys in full (the same bits on every rank).  x is
    replicated: every rank of the group calls forward (and backward) with the
    same x (and the same loss); y and x's gradient come back whole on every
    rank.  Expert gradients are sparse rows of this rank's columns (or dense
    with sparse_grads=False); torch optimizers step each rank's parameters
    locally.  Creation is collective and refused on every rank alike when
    d_model is not divisible by P or the ranks' configs or seeds differ (seed
    None: rank 0's draw from torch's generator, used by all).  device="cpu"
    (gloo) or "cuda[:i]" (NCCL; "cuda": torch's current device, so call
    torch.cuda.set_device first): on CUDA the calls run on torch's current
    stream without waiting, as nn.PEER's (the inference forward checks, and
    waits; check() does for training), and sparse expert gradients are
    uncoalesced as nn.PEER's on CUDA.  state_dict() is this rank's (with an "_extra_state" entry naming
    the rank, world size and columns, checked on load); load_state_dict also
    takes an unsharded state_dict (nn.PEER's, or full_state_dict()'s) and
    keeps this rank's columns.  Dropout masks come from each rank's torch
    generator: seed every rank alike, as the replicated rest of the model
    needs anyway."""

    def __init__(self, config=None, *, process_group=None, seed=None, threads=0, device="cpu",
                 sparse_grads=True, dropout=0.0, layer=None, **overrides):
        if layer is None:
            group = process_group if process_group is not None else dist.group.WORLD
            device = _shard_device(device)
            dev = _nn._HOST if device is None else _nn._TorchCuda(device)
            seed = _common_seed(seed, group, "peerlayer.PEER(process_group=...)", draw=True,
                                dev=dev)
            layer = _sharded_layer(config, seed, threads, device, group, **overrides)
        super().__init__(layer=layer, device=layer.device or "cpu", sparse_grads=sparse_grads,
                         dropout=dropout)

    @classmethod
    def from_file(cls, path, *, process_group=None, threads=0, device="cpu", sparse_grads=True,
                  dropout=0.0):
        """A sharded module holding an unsharded weight file's (or
        checkpoint's) replicated tensors and this rank's columns.  Collective."""
        cfg = _lib.peer_config()
        check(lib.peer_layer_check_file(str(path).encode(), ctypes.byref(cfg)))
        layer = _sharded_layer(_config_dict(cfg), None, threads, _shard_device(device),
                               process_group)
        layer.load_full(path)
        return cls(layer=layer, sparse_grads=sparse_grads, dropout=dropout)

    def save(self, path):
        """This rank's shard file (peer_shard_save: its columns, metadata
        peer.shard.*), atomic.  peerlayer.shard.merge or `peer shard --merge`
        joins the ranks' files into one unsharded weight file."""
        self.layer.save(path)

    def load(self, path):
        """This rank's shard file, as save wrote it (refused from another rank,
        world size or config)."""
        self.layer.load(path)

    def load_full(self, path):
        """An unsharded weight file or checkpoint: its replicated tensors and
        this rank's columns."""
        self.layer.load_full(path)

    @property
    def rank(self):
        return self.layer.rank

    @property
    def world(self):
        return self.layer.world

    @property
    def columns(self):
        """This rank's columns of the expert tables: range(col0, col0 + d/P)."""
        return range(self.layer.col0, self.layer.col0 + self.layer.cols)

    def extra_repr(self):
        return super().extra_repr() + f", rank={self.rank}, world={self.world}"

    def layer_optimizer(self, **settings):
        """The library's optimizer over this rank's shard (local; the
        replicated parameters step alike on every rank), with
        LayerOptimizer's interface; settings as peerlayer.Optimizer's.  CPU:
        peer_shard_optimizer, without set_lr (the C shard optimizer has
        none).  CUDA: peer_cuda_shard_optimizer_create's, stepped on torch's
        current stream (peer_cuda_optimizer_step)."""
        return _ShardedLayerOptimizer(self, **settings)

    def _dev(self):
        """Buffers and stream of a call now: nn._HOST, or nn._TorchCuda on the
        shard's device (torch's current stream)."""
        return _nn._TorchCuda(self.layer.device) if self._cuda else _nn._HOST

    def _forward_infer(self, x2, params):
        # CPU: peerlayer::forward, whose kernel calls the shard's collective
        # forward.  CUDA: that forward on torch's current stream, then the
        # check (which waits), as nn.PEER's CUDA inference.
        if not self._cuda:
            return super()._forward_infer(x2, params)
        dev = self._dev()
        y = self.layer.forward(x2, dev)
        self.layer.check(dev)
        return y

    def _forward_train(self, x2, params):
        # PEER.forward's training branch (gradients, or batch norm's running
        # statistics).
        return _ShardedTrain.apply(self, x2, *params)

    def check(self):
        """As PEER.check: CUDA, wait for torch's current stream and raise
        PeerError if a call on this shard not checked yet met a NaN or
        infinity (peer_cuda_shard_check); CPU, nothing to do."""
        if self._cuda:
            self.layer.check(self._dev())

    # -- state
    def _shard_info(self):
        return {"rank": self.rank, "world": self.world, "col0": self.layer.col0,
                "cols": self.layer.cols, "config": dict(self.layer.config)}

    def get_extra_state(self):
        return self._shard_info()

    def set_extra_state(self, state):
        pass  # checked (before any tensor is copied) in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A state_dict of this rank's shard (its _extra_state must match), or
        an unsharded one (no _extra_state; [N, d] expert tables are sliced).
        The tables belong to the child module `experts`, which torch loads
        after this from the same dict (this load's own copy): the entries are
        changed in place, for it to see."""
        key = prefix + "_extra_state"
        mine = self._shard_info()
        if key in state_dict and state_dict[key] != mine:
            error_msgs.append(
                f"peerlayer.PEER(process_group=...): the state_dict is another shard's "
                f"({state_dict[key]}); this module is {mine}: load each rank's own "
                "state_dict, or an unsharded one")
            # nothing of it is loaded: the children copy in their own values
            state_dict.update(self.state_dict(prefix=prefix))
            return
        if key not in state_dict:
            full = (self.layer.n_experts, self._d)
            for name in _EXPERTS:
                t = state_dict.get(prefix + name)
                if t is not None and tuple(t.shape) == full:
                    state_dict[prefix + name] = t[:, self.columns.start:self.columns.stop]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)

    def full_state_dict(self, rank=0):
        """Collective: the unsharded state_dict (nn.PEER's names and shapes:
        [N, d] expert tables) on group rank `rank`, None on the others (the
        whole tables exist only there)."""
        group, me = self.layer.group, self.rank
        dst = dist.get_global_rank(group, rank) if group is not dist.group.WORLD else rank
        out = {}
        for name, t in self.state_dict().items():
            if name not in _EXPERTS:
                if name != "_extra_state":
                    out[name] = t.clone()
                continue
            bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            parts = [torch.empty_like(bits) for _ in range(self.world)] if me == rank else None
            dist.gather(bits.contiguous(), parts, dst=dst, group=group)
            if me == rank:
                out[name] = torch.cat(parts, dim=1).view(t.dtype)
        return out if me == rank else None

    def _apply(self, fn, recurse=True):
        """.to(), .float(), .cuda(), ...: the shard stays on its device with
        the weight_dtype it was made with; asking for that is a no-op,
        anything else is refused here."""
        have, where = self.layer.config["weight_dtype"], self.experts.down.device
        probe = fn(torch.zeros(1, dtype=torch.bfloat16 if have == "bf16" else torch.float32,
                               device=where))
        want = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(probe.dtype)
        if probe.device != where or want != have:
            raise RuntimeError(
                f"peerlayer.PEER(process_group=...): cannot move to {probe.device} / "
                f"{probe.dtype}: a sharded layer stays on {self.layer.device or 'the CPU'} "
                f"with its weight_dtype ({have}); create it where and with the weight_dtype "
                "you want")
        return self

    def __getstate__(self):
        raise TypeError("peerlayer.PEER(process_group=...) cannot be pickled or deep-copied "
                        "(its shard belongs to a process group): save state_dict() per rank, "
                        "or full_state_dict(), and load it into a new module")
