"""A sharded PEER layer over torch.distributed (README "Sharding").

The C library's sharded layer (peer.h, peer_shard_*) splits the expert tables
by columns over the ranks of a process group: rank r holds columns
[r*d/P, (r+1)*d/P) of experts.down and experts.up; retrieval is replicated.
Its communicator (peer_comm) is built here from a torch.distributed process
group: the library's all-reduce and all-gather call back into Python and run
dist.all_reduce / dist.all_gather on tensors over the library's own buffers
(gloo on CPU).  Every call that communicates is collective: every rank of the
group makes it with the same x (and dy).

Two levels.  ShardedPEER, what peerlayer.nn.PEER(..., process_group=pg)
returns, is the torch module: parameters are views of this rank's shard
(its [N, d/P] expert columns, the replicated rest in full), autograd runs the
shard's collective training forward and backward, expert gradients are
sparse rows (or dense) as nn.PEER's, state_dict is per rank.  Below it, the
numpy-level layer:

    dist.init_process_group("gloo", ...)
    layer = ShardedLayer(d_model=512, seed=0)          # process_group=None: WORLD
    y = layer.forward(x)                               # x, y [T, d] on every rank
    ctx, grads = layer.context(T), layer.grads(T)
    y = layer.forward_train(ctx, x)
    dx, grads = layer.backward(ctx, dy, grads)         # expert rows: [R, d/P]
    opt = ShardedOptimizer(layer, kind="adam")
    opt.step(grads)
    layer.save(f"shard-{rank}.safetensors", opt)       # peer_shard_save

The CUDA backend and NCCL are not supported (the C library shards CPU layers
only).
"""

import ctypes

import numpy as np
import torch
import torch.distributed as dist

from . import _lib
from .core import (_NP_DTYPE, Grads, _config_dict, _config_struct, _input, _options, _output,
                   _ptr, _View, check, lib)
from .nn import _EXPERTS, _SLOTS, PEER, LayerOptimizer

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


class _ShardHandle:
    """Owns a C shard (and the communicator it calls) until the layer and
    every numpy view of its parameters have let go."""

    def __init__(self, h, comm):
        self.h, self.comm = h, comm

    def __del__(self):
        if getattr(self, "h", None):
            lib.peer_shard_free(self.h)
            self.h = None


def _common_seed(seed, group, what, *, draw):
    """The seed every rank of `group` uses.  Collective.  An int given alike on
    every rank is used; None on every rank gives None, or with draw=True rank
    0's draw from torch's default generator.  Anything else is refused on
    every rank alike: the replicated parameters would differ between ranks."""
    given = seed is not None
    value = int(seed) % 2**64 if given else \
        int(torch.randint(0, 2**62, (1,)).item()) if draw else 0
    mine = torch.tensor([int(given), value >> 32, value & 0xFFFFFFFF], dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
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


class ShardedLayer:
    """This rank's shard of a PEER layer (config as peerlayer.Layer: a
    "key=value" string, a dict or keywords).  Collective to create: refused
    on every rank alike when d_model is not divisible by the group's size or
    the ranks' configs or seeds differ.  `params` and `tensors` are as
    peerlayer.Layer's, with experts.* as this rank's [N, d/P] columns."""

    backend = "cpu"

    def __init__(self, config=None, *, seed=0, threads=0, process_group=None, **overrides):
        self.group = process_group if process_group is not None else dist.group.WORLD
        cfg = _config_struct(config, **overrides)
        self.config = _config_dict(cfg)
        self.n_experts = self.config["n_subkeys"] ** 2
        self.comm = _TorchComm(self.group)
        opt = _options("cpu", threads, 0)
        h = ctypes.c_void_p()
        self.comm.check(lib.peer_shard_create(ctypes.byref(h), ctypes.byref(cfg),
                                              ctypes.byref(opt), ctypes.byref(self.comm.c)))
        self._h = h
        self._owner = _ShardHandle(h, self.comm)
        c0, cols = _i64(), _i64()
        lib.peer_shard_columns(h, ctypes.byref(c0), ctypes.byref(cols))
        self.col0, self.cols = c0.value, cols.value
        self.rank, self.world = self.comm.c.rank, self.comm.c.world
        self.tensors = {}  # name -> (pointer, shape, numpy dtype), as Layer.tensors
        for i in range(lib.peer_shard_n_params(h)):
            t = _lib.peer_tensor()
            check(lib.peer_shard_param(h, i, ctypes.byref(t)))
            self.tensors[t.name.decode()] = (t.data, tuple(t.shape[: t.ndim]), _NP_DTYPE[t.dtype])
        # numpy views of the shard's memory; each keeps the shard alive
        self.params = {name: np.asarray(_View(ptr, shape, dt, self._owner))
                       for name, (ptr, shape, dt) in self.tensors.items()}
        seed = _common_seed(seed, self.group, "ShardedLayer", draw=False)
        if seed is not None:
            self.init(seed)

    def init(self, seed):
        """Local: this rank's part of peer_layer_init(seed) (the same seed on
        every rank, or the replicated parameters differ)."""
        check(lib.peer_shard_init(self._h, ctypes.c_uint64(int(seed))))

    @property
    def n_parameters(self):
        """As peer_layer_n_parameters, for what this rank holds: the
        replicated tensors and its expert columns."""
        return sum(a.size for a in self.params.values())

    @property
    def n_active_parameters(self):
        """As peer_layer_n_active_parameters, for this rank's columns."""
        c = self.config
        return self.n_parameters + 2 * (c["n_heads"] * c["top_k"] - self.n_experts) * self.cols

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

    def context(self, max_tokens):
        return ShardedContext(self, max_tokens)

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
        self.step_pointers(grads._s)

    def step_pointers(self, grads, stream=None):
        """One step from a _lib.peer_grads (expert rows [R, d/P]) whose buffers
        the caller keeps alive for the call; stream is unused (CPU)."""
        check(lib.peer_shard_optimizer_step(self._h, ctypes.byref(grads)))

    def set_lr(self, lr, expert_lr=0.0):
        raise NotImplementedError("ShardedOptimizer: the C library has no learning-rate change "
                                  "for a shard's optimizer (peer_shard_optimizer_* has no "
                                  "set_lr); make a new optimizer, or use a torch optimizer")

    @property
    def step_count(self):
        return int(lib.peer_shard_optimizer_step_count(self._h))

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_shard_optimizer_free(self._h)
            self._h = None


# ------------------------------------------------------------ the torch module

class _TrainRun:
    """One collective training forward of a shard, kept for its backward: the
    context and x (which the context points into)."""

    def __init__(self, layer, x):
        self.layer, self.x = layer, x.detach().numpy()
        self.ctx = layer.context(max(self.x.shape[0], 1))
        self.y = layer.forward_train(self.ctx, self.x)
        self.used = False

    def backward(self, dy, experts_dense):
        """(dx, ShardedGrads).  A second backward of one forward
        (retain_graph=True) runs the forward again on a fresh context, as the
        library consumes one per backward; the running statistics that forward
        would update again are put back."""
        layer = self.layer
        if self.used:
            running = {n: a.copy() for n, a in layer.params.items() if _SLOTS[n][2]}
            self.ctx = layer.context(self.ctx.max_tokens)
            try:
                layer.forward_train(self.ctx, self.x)
            finally:
                for n, a in running.items():
                    layer.params[n][...] = a
        grads = layer.grads(self.ctx.max_tokens, experts_dense=experts_dense)
        dx, grads = layer.backward(self.ctx, dy.detach().contiguous().numpy(), grads)
        self.used = True
        return dx, grads


class _ShardedTrain(torch.autograd.Function):
    """y = the shard's training forward of x; the backward is the shard's
    (collective: every rank of the group runs it, as it runs the forward)."""

    @staticmethod
    def forward(ctx, module, x, *params):
        ctx.run = _TrainRun(module.layer, x)
        ctx.sparse = module.sparse_grads
        ctx.slots = [(name, p.shape, p.dtype) for name, p in zip(module._trainable, params)]
        return torch.from_numpy(ctx.run.y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        dx, g = ctx.run.backward(dy, experts_dense=not ctx.sparse)
        dense = g.dense()
        experts = {"experts.down": g.experts_down, "experts.up": g.experts_up}
        rows = torch.from_numpy(g.expert_rows).unsqueeze(0)
        out = []
        for name, shape, dtype in ctx.slots:
            if name not in experts:
                out.append(torch.from_numpy(dense[name]))
                continue
            t = torch.from_numpy(experts[name])
            if ctx.sparse:
                t = torch.sparse_coo_tensor(rows, t, shape, is_coalesced=True,
                                            check_invariants=False)
            out.append(t.to(dtype))
        return (None, torch.from_numpy(dx), *out)


class _ShardedLayerOptimizer(LayerOptimizer):
    """LayerOptimizer stepping a ShardedPEER with its ShardedOptimizer."""

    def __init__(self, module, **settings):  # noqa: D107 (LayerOptimizer's, another optimizer)
        self.module = module
        self.optimizer = ShardedOptimizer(module.layer, **settings)


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
    None: rank 0's draw from torch's generator, used by all).  CPU (gloo)
    only.  state_dict() is this rank's (with an "_extra_state" entry naming
    the rank, world size and columns, checked on load); load_state_dict also
    takes an unsharded state_dict (nn.PEER's, or full_state_dict()'s) and
    keeps this rank's columns.  Dropout masks come from each rank's torch
    generator: seed every rank alike, as the replicated rest of the model
    needs anyway."""

    def __init__(self, config=None, *, process_group=None, seed=None, threads=0, device="cpu",
                 sparse_grads=True, dropout=0.0, layer=None, **overrides):
        if torch.device(device).type != "cpu":
            raise RuntimeError(f"peerlayer.PEER(process_group=...): device {device}: the "
                               "sharded layer runs on the CPU backend only (gloo; the library "
                               "has no NCCL adapter)")
        if layer is None:
            group = process_group if process_group is not None else dist.group.WORLD
            seed = _common_seed(seed, group, "peerlayer.PEER(process_group=...)", draw=True)
            layer = ShardedLayer(config, seed=seed, threads=threads, process_group=group,
                                 **overrides)
        super().__init__(layer=layer, sparse_grads=sparse_grads, dropout=dropout)

    @classmethod
    def from_file(cls, path, *, process_group=None, threads=0, device="cpu", sparse_grads=True,
                  dropout=0.0):
        """A sharded module holding an unsharded weight file's (or
        checkpoint's) replicated tensors and this rank's columns.  Collective."""
        cfg = _lib.peer_config()
        check(lib.peer_layer_check_file(str(path).encode(), ctypes.byref(cfg)))
        layer = ShardedLayer(_config_dict(cfg), seed=None, threads=threads,
                             process_group=process_group)
        layer.load_full(path)
        return cls(layer=layer, device=device, sparse_grads=sparse_grads, dropout=dropout)

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
        """The library's optimizer over this rank's shard (peer_shard_optimizer:
        local; the replicated parameters step alike on every rank), with
        LayerOptimizer's interface; settings as peerlayer.Optimizer's.  No
        set_lr (the C shard optimizer has none)."""
        return _ShardedLayerOptimizer(self, **settings)

    def _forward_train(self, x2, params):
        # PEER.forward's training branch (gradients, or batch norm's running
        # statistics); its inference branch runs peerlayer::forward, which
        # calls the shard's collective forward.
        return _ShardedTrain.apply(self, x2, *params)

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
        """.to(), .float(), .cpu(), ...: the shard stays on the CPU with the
        weight_dtype it was made with; asking for that is a no-op, anything
        else is refused here."""
        have = self.layer.config["weight_dtype"]
        probe = fn(torch.zeros(1, dtype=torch.bfloat16 if have == "bf16" else torch.float32))
        want = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(probe.dtype)
        if probe.device.type != "cpu" or want != have:
            raise RuntimeError(
                f"peerlayer.PEER(process_group=...): cannot move to {probe.device} / "
                f"{probe.dtype}: a sharded layer stays on the CPU with its weight_dtype "
                f"({have}); create it with the weight_dtype "
                "you want")
        return self

    def __getstate__(self):
        raise TypeError("peerlayer.PEER(process_group=...) cannot be pickled or deep-copied "
                        "(its shard belongs to a process group): save state_dict() per rank, "
                        "or full_state_dict(), and load it into a new module")
