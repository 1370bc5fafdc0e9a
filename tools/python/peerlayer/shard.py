"""A sharded PEER layer over torch.distributed (README "Sharding").

The C library's sharded layer (peer.h, peer_shard_*) splits the expert tables
by columns over the ranks of a process group: rank r holds columns
[r*d/P, (r+1)*d/P) of experts.down and experts.up; retrieval is replicated.
Its communicator (peer_comm) is built here from a torch.distributed process
group: the library's all-reduce and all-gather call back into Python and run
dist.all_reduce / dist.all_gather on tensors over the library's own buffers
(gloo on CPU).  Every call that communicates is collective: every rank of the
group makes it with the same x (and dy).

    dist.init_process_group("gloo", ...)
    layer = ShardedLayer(d_model=512, seed=0)          # process_group=None: WORLD
    y = layer.forward(x)                               # x, y [T, d] on every rank
    ctx, grads = layer.context(T), layer.grads(T)
    y = layer.forward_train(ctx, x)
    dx, grads = layer.backward(ctx, dy, grads)         # expert rows: [R, d/P]
    opt = ShardedOptimizer(layer, kind="adam")
    opt.step(grads)
    layer.save(f"shard-{rank}.safetensors", opt)       # peer_shard_save

This module holds the numpy-level layer; the CUDA backend and NCCL are not
supported (the C library shards CPU layers only).
"""

import ctypes

import numpy as np
import torch
import torch.distributed as dist

from . import _lib
from .core import (Grads, _config_dict, _config_struct, _input, _options, _output, _ptr, check,
                   lib)

_ALLREDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                              ctypes.c_int64)
_ALLGATHER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_size_t)


class peer_comm(ctypes.Structure):
    _fields_ = [("handle", ctypes.c_void_p), ("rank", ctypes.c_int), ("world", ctypes.c_int),
                ("allreduce_sum", _ALLREDUCE), ("allgather", _ALLGATHER)]


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
}


def split(path, world, out_paths):
    """One unsharded weight file or checkpoint into `world` shard files."""
    arr = (ctypes.c_char_p * int(world))(*[str(p).encode() for p in out_paths])
    check(lib.peer_shard_split(str(path).encode(), int(world), arr))


def merge(paths, out_path):
    """Shard files (every rank once, any order) into one unsharded file."""
    arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
    check(lib.peer_shard_merge(arr, len(paths), str(out_path).encode()))
for _name, (_res, _args) in _PROTOS.items():
    _fn = getattr(lib, _name)
    _fn.restype, _fn.argtypes = _res, _args


class _TorchComm:
    """A peer_comm over a torch.distributed process group.  The callbacks
    keep any Python exception for the caller, and return nonzero."""

    def __init__(self, group):
        self.group = group
        self.error = None
        self._reduce = _ALLREDUCE(self._allreduce)
        self._gather = _ALLGATHER(self._allgather)
        self.c = peer_comm(None, dist.get_rank(group), dist.get_world_size(group),
                           self._reduce, self._gather)

    def _allreduce(self, _handle, data, count):
        try:
            buf = np.ctypeslib.as_array(data, shape=(count,))
            dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.SUM, group=self.group)
            return 0
        except BaseException as e:  # noqa: BLE001 (reported by the caller)
            self.error = e
            return 1

    def _allgather(self, _handle, send, recv, nbytes):
        try:
            world = self.c.world
            src = np.ctypeslib.as_array(ctypes.cast(send, ctypes.POINTER(ctypes.c_uint8)),
                                        shape=(nbytes,))
            dst = np.ctypeslib.as_array(ctypes.cast(recv, ctypes.POINTER(ctypes.c_uint8)),
                                        shape=(world * nbytes,))
            parts = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(world)]
            dist.all_gather(parts, torch.from_numpy(src.copy()), group=self.group)
            for r, p in enumerate(parts):
                dst[r * nbytes:(r + 1) * nbytes] = p.numpy()
            return 0
        except BaseException as e:  # noqa: BLE001
            self.error = e
            return 1

    def check(self, status):
        """check(status), raising the callback's own exception first."""
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError("the process group failed inside a sharded call") from e
        check(status)


class ShardedLayer:
    """This rank's shard of a PEER layer (config as peerlayer.Layer: a
    "key=value" string, a dict or keywords).  Collective to create."""

    def __init__(self, config=None, *, seed=0, threads=0, process_group=None, **overrides):
        self.group = process_group if process_group is not None else dist.group.WORLD
        cfg = _config_struct(config, **overrides)
        self.config = _config_dict(cfg)
        self.comm = _TorchComm(self.group)
        opt = _options("cpu", threads, 0)
        h = ctypes.c_void_p()
        self.comm.check(lib.peer_shard_create(ctypes.byref(h), ctypes.byref(cfg),
                                              ctypes.byref(opt), ctypes.byref(self.comm.c)))
        self._h = h
        c0, cols = _i64(), _i64()
        lib.peer_shard_columns(h, ctypes.byref(c0), ctypes.byref(cols))
        self.col0, self.cols = c0.value, cols.value
        self.rank, self.world = self.comm.c.rank, self.comm.c.world
        if seed is not None:
            self.init(seed)

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_shard_free(self._h)
            self._h = None

    def init(self, seed):
        check(lib.peer_shard_init(self._h, int(seed)))

    @property
    def tensors(self):
        """name -> numpy view of each parameter (experts.*: this rank's
        [N, d/P] columns), valid while the layer lives."""
        out = {}
        for i in range(lib.peer_shard_n_params(self._h)):
            t = _lib.peer_tensor()
            check(lib.peer_shard_param(self._h, i, ctypes.byref(t)))
            dt = {0: np.float32, 1: np.uint16}[t.dtype]
            shape = tuple(t.shape[: t.ndim])
            arr = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(
                ctypes.c_float if dt == np.float32 else ctypes.c_uint16)), shape=shape)
            out[t.name.decode()] = arr
        return out

    def _x(self, x):
        x = _input(x, np.float32, None, "x")
        if x.ndim != 2 or x.shape[1] != self.config["d_model"]:
            raise ValueError(f"x: shape {x.shape}, expected [T, {self.config['d_model']}]")
        return x

    def forward(self, x, *, indices=False):
        """y [T, d] (gathered: the same on every rank); with indices=True,
        (y, indices [T, H, k])."""
        x = self._x(x)
        y = np.empty_like(x)
        ids = np.empty((x.shape[0], self.config["n_heads"], self.config["top_k"]), np.int64) \
            if indices else None
        self.comm.check(lib.peer_shard_forward(self._h, x.shape[0], _ptr(x), _ptr(y), _ptr(ids),
                                               None))
        return (y, ids) if indices else y

    def context(self, max_tokens):
        return ShardedContext(self, max_tokens)

    def grads(self, max_tokens):
        """Gradient buffers: dense ones in full, expert rows [R, d/P]."""
        return ShardedGrads(self, max_tokens)

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

    def save(self, path, optimizer=None):
        check(lib.peer_shard_save(self._h, optimizer._h if optimizer else None,
                                  str(path).encode()))

    def load(self, path, optimizer=None):
        check(lib.peer_shard_load(self._h, optimizer._h if optimizer else None,
                                  str(path).encode()))

    def load_full(self, path):
        """An unsharded weight file: the replicated tensors and this rank's columns."""
        check(lib.peer_shard_load_full(self._h, None, str(path).encode()))


class ShardedContext:
    def __init__(self, layer, max_tokens):
        self.layer, self.max_tokens, self.x = layer, int(max_tokens), None
        h = ctypes.c_void_p()
        check(lib.peer_shard_context_create(ctypes.byref(h), layer._h, self.max_tokens))
        self._h = h

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_context_free(self._h)
            self._h = None


class ShardedGrads(Grads):
    """peerlayer.Grads with the expert rows [R, d/P] of this rank's columns."""

    def __init__(self, layer, max_tokens):  # noqa: D107 (Grads' fields, other shapes)
        c, t = layer.config, layer.tensors
        s = _lib.peer_grads()

        def dense(name):
            return np.zeros(t[name].shape, np.float32) if name in t else None

        self.layer = layer
        self.query_weight, self.query_bias = dense("query.weight"), dense("query.bias")
        self.norm_weight, self.norm_bias = dense("query.norm.weight"), dense("query.norm.bias")
        self.keys = dense("keys")
        cap = int(max_tokens) * c["n_heads"] * c["top_k"]
        self.experts_dense = False
        self._rows = np.zeros(max(cap, 1), np.int64)
        self._down = np.zeros((max(cap, 1), layer.cols), np.float32)
        self._up = np.zeros((max(cap, 1), layer.cols), np.float32)
        for f in ("query_weight", "query_bias", "norm_weight", "norm_bias", "keys"):
            setattr(s, f, _ptr(getattr(self, f)))
        s.expert_capacity = cap
        s.expert_rows, s.experts_down, s.experts_up = _ptr(self._rows), _ptr(self._down), \
            _ptr(self._up)
        self._s = s
        self.n_expert_rows = 0


class ShardedOptimizer:
    """peer_shard_optimizer: peerlayer.Optimizer's rules on a shard (local: no
    communication)."""

    def __init__(self, layer, *, kind="adam", expert_kind="adam", **hyper):
        cfg = lib.peer_optim_config_default()
        kinds = {"sgd": 0, "adam": 1}
        cfg.kind, cfg.expert_kind = kinds[kind], kinds[expert_kind]
        for k, v in hyper.items():
            if not hasattr(cfg, k):
                raise ValueError(f"optimizer: unknown hyperparameter {k!r}")
            setattr(cfg, k, float(v))
        h = ctypes.c_void_p()
        check(lib.peer_shard_optimizer_create(ctypes.byref(h), layer._h, ctypes.byref(cfg)))
        self.layer, self._h = layer, h

    def step(self, grads):
        check(lib.peer_shard_optimizer_step(self._h, ctypes.byref(grads._s)))

    @property
    def step_count(self):
        return int(lib.peer_shard_optimizer_step_count(self._h))

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_shard_optimizer_free(self._h)
            self._h = None
