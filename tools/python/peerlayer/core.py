"""The numpy binding: peer layers, training contexts, gradients and optimizers.

Arrays go to the C library without copies when they are already C-contiguous
and of the right dtype (float32 activations); anything else is converted
once.  Parameters are numpy views of the layer's own memory: writing into them
changes the layer.  Every failing call raises PeerError with the library's
message (peer_last_error) and status.

Threads: a Layer may be shared between threads.  Calls on one layer (and on
its contexts, gradients and optimizer) are serialised by a per-layer lock;
ctypes releases the GIL, so different layers run in parallel.  Lifetimes:
after Layer.close(), calls on the layer, its contexts and its optimizers
raise ValueError; numpy views of its parameters keep its memory alive (the C
layer is freed when the last of them goes).  Gradients, contexts and
optimizers are checked to belong to the layer they are used with.
"""

import ctypes
import threading

import numpy as np

from . import _lib

lib = _lib.load_library()

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "identity"]
GATES = ["softmax", "sigmoid", "relu"]
NORMS = ["none", "batchnorm"]
DTYPES = ["f32", "bf16", "i64"]
BACKENDS = {"cpu": 0, "cuda": 1}
OPTIM_KINDS = {"sgd": 0, "adam": 1}
_CONFIG_INTS = ["d_model", "n_heads", "d_key", "n_subkeys", "top_k", "subkey_top_k",
                "shared_keys", "query_bias"]
# numpy has no bfloat16: bf16 tables are exposed as their raw uint16 bits.
_NP_DTYPE = {0: np.float32, 1: np.uint16, 2: np.int64}


class PeerError(RuntimeError):
    """A failing libpeer call: `status` is the peer_status value, `status_name`
    its short name, and the message is peer_last_error()."""

    def __init__(self, status, message):
        self.status = int(status)
        self.status_name = lib.peer_status_string(self.status).decode()
        self.message = message
        super().__init__(f"{message} ({self.status_name})")


def check(status):
    """Raise PeerError for a nonzero peer_status.  Read on the calling thread
    right after the call, as peer_last_error is per thread."""
    if status:
        raise PeerError(status, lib.peer_last_error().decode(errors="replace"))


def version():
    return lib.peer_version_string().decode()


def _ptr(a):
    return None if a is None else a.ctypes.data


def _input(a, dtype, shape, name):
    """The array itself when it is C-contiguous with the right dtype (no copy),
    else one converted copy.  Checks the shape."""
    a = np.ascontiguousarray(a, dtype=dtype)
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape}, expected {tuple(shape)}")
    return a


def _output(a, dtype, shape, name):
    """A caller's output array (must be writable, C-contiguous, exact dtype and
    shape, since the library writes into it), or a new one."""
    if a is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != tuple(shape) \
            or not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name}: needs a writable C-contiguous {np.dtype(dtype).name} "
                         f"array of shape {tuple(shape)}")
    return a


def _disjoint(a, b, a_name, b_name):
    """Refuse an output that overlaps an input (in place, y = x): the library
    would read what it has already written."""
    if a is not None and b is not None and np.may_share_memory(a, b):
        raise ValueError(f"{a_name} overlaps {b_name}: in-place use is not supported; "
                         "pass a separate array")


class _View:
    """Exposes foreign memory to numpy and keeps its owner alive as long as any
    array over it exists."""

    def __init__(self, ptr, shape, dtype, owner):
        self.__array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                    "typestr": np.dtype(dtype).str, "version": 3}
        self._owner = owner


def _item(key, value):
    """One "key=value" config item; a key or value holding ',' or '=' would
    set other keys, so it is refused."""
    text = str(value)
    for part, what in ((str(key), "key"), (text, "value")):
        if "," in part or "=" in part:
            raise ValueError(f"config {what} {part!r} (for {key}): ',' and '=' are not allowed "
                             f"in a {what} (they would set other keys)")
    return f"{key}={text}"


def _config_struct(config=None, **overrides):
    """A peer_config from None (defaults), a "key=value,..." string, a dict or
    keyword arguments (PEER.md names), validated by the library."""
    cfg = _lib.peer_config()
    lib.peer_config_default(ctypes.byref(cfg))
    items = []
    if isinstance(config, str):
        items.append(config)
    elif isinstance(config, dict):
        overrides = {**config, **overrides}
    elif config is not None:
        raise TypeError("config: a 'key=value,...' string, a dict, or None")
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = int(value)
        items.append(_item(key, value))
    text = ",".join(i for i in items if i)
    if text:
        check(lib.peer_config_parse(ctypes.byref(cfg), text.encode()))
    check(lib.peer_config_validate(ctypes.byref(cfg)))
    return cfg


def _config_dict(cfg):
    d = {name: int(getattr(cfg, name)) for name in _CONFIG_INTS}
    d["activation"] = ACTIVATIONS[cfg.activation]
    d["gate"] = GATES[cfg.gate]
    d["query_norm"] = NORMS[cfg.query_norm]
    d["weight_dtype"] = DTYPES[cfg.weight_dtype]
    return d


def _options(backend, threads, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r}, expected one of {sorted(BACKENDS)}")
    opt = _lib.peer_options()
    lib.peer_options_default(ctypes.byref(opt))
    opt.backend, opt.n_threads, opt.device = BACKENDS[backend], int(threads), int(device)
    return opt


class _Handle:
    """Owns a C layer and frees it when the last of its users lets go: the
    Layer until close(), and every numpy view of a parameter."""

    def __init__(self, h):
        self.h = h

    def __del__(self):
        if getattr(self, "h", None):
            lib.peer_layer_free(self.h)
            self.h = None


class Layer:
    """A PEER layer owned by the C library.

    Layer(config, seed=0) creates one ("key=value,..." string, dict or keyword
    arguments, PEER.md names) initialised with peer_layer_init(seed); seed=None
    leaves the parameters zero.  Layer.load(path) reads a safetensors file.
    backend="cuda" keeps the parameters in device memory (forward and
    retrieval only; `params` then holds no numpy views)."""

    def __init__(self, config=None, *, seed=0, backend="cpu", threads=0, device=0, **overrides):
        cfg = _config_struct(config, **overrides)
        handle = ctypes.c_void_p()
        opt = _options(backend, threads, device)
        check(lib.peer_layer_create(ctypes.byref(handle), ctypes.byref(cfg), ctypes.byref(opt)))
        self._adopt(handle, backend)
        if seed is not None:
            self.init(seed)

    @classmethod
    def load(cls, path, *, backend="cpu", threads=0, device=0):
        handle = ctypes.c_void_p()
        opt = _options(backend, threads, device)
        check(lib.peer_layer_load(ctypes.byref(handle), str(path).encode(), ctypes.byref(opt)))
        self = cls.__new__(cls)
        self._adopt(handle, backend)
        return self

    @classmethod
    def load_pytorch(cls, path, config=None, *, threads=0, **settings):
        """A layer from lucidrains' PEER-pytorch state dict saved as safetensors
        (peer_layer_load_pytorch): the shapes come from the file; config or
        keyword arguments give what it does not record (top_k, subkey_top_k,
        gate, activation; defaults as peer_config_default)."""
        handle = ctypes.c_void_p()
        cfg = _settings_struct(config, **settings)
        opt = _options("cpu", threads, 0)
        check(lib.peer_layer_load_pytorch(ctypes.byref(handle), str(path).encode(),
                                          ctypes.byref(cfg), ctypes.byref(opt)))
        self = cls.__new__(cls)
        self._adopt(handle, "cpu")
        return self

    def save_pytorch(self, path):
        """Write the layer as a PEER-pytorch state dict (peer_layer_save_pytorch);
        returns the PEER(...) call of PEER-pytorch that loads it."""
        self._call(lib.peer_layer_save_pytorch, str(path).encode())
        buf = ctypes.create_string_buffer(512)
        check(lib.peer_config_pytorch_args(lib.peer_layer_config(self.handle), buf, len(buf)))
        return buf.value.decode()

    def _adopt(self, handle, backend):
        self._h = handle
        self._owner = _Handle(handle)
        self._lock = threading.Lock()  # one call at a time on this layer
        self.backend = backend
        c = lib.peer_layer_config(handle).contents
        self.config = _config_dict(c)
        self.n_experts = self.config["n_subkeys"] ** 2
        self.tensors = {}  # name -> (pointer, shape, numpy dtype), for every parameter
        for i in range(lib.peer_layer_n_params(handle)):
            t = _lib.peer_tensor()
            check(lib.peer_layer_param(handle, i, ctypes.byref(t)))
            self.tensors[t.name.decode()] = (t.data, tuple(t.shape[: t.ndim]), _NP_DTYPE[t.dtype])
        # Parameters as numpy views of the layer's memory (host layers only).
        self.params = {}
        if backend == "cpu":
            for name, (ptr, shape, dt) in self.tensors.items():
                self.params[name] = np.asarray(_View(ptr, shape, dt, self._owner))

    def close(self):
        """Release the C layer: it is freed now, or when the last numpy view
        of one of its parameters goes.  Calls on the layer, its contexts and
        its optimizers raise ValueError after."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:  # waits for a call in progress on another thread
            self._h = None
            self.params = {}
            self._owner = None

    def __del__(self):
        self.close()

    @property
    def closed(self):
        return not getattr(self, "_h", None)

    @property
    def handle(self):
        if not self._h:
            raise ValueError("layer is closed")
        return self._h

    def _call(self, fn, *args):
        """fn(handle, *args) under the layer's lock, checked."""
        with self._lock:
            check(fn(self.handle, *args))

    def _owns(self, obj, what):
        if getattr(obj, "layer", None) is not self:
            raise ValueError(f"{what} belongs to another layer (made by a different Layer object)")

    def __repr__(self):
        text = ",".join(f"{k}={v}" for k, v in self.config.items())
        return f"peerlayer.Layer({text!r}, backend={self.backend!r})"

    # -- parameters, files
    def init(self, seed):
        self._call(lib.peer_layer_init, ctypes.c_uint64(int(seed)))

    @property
    def threads(self):
        return lib.peer_layer_threads(self.handle)

    @threads.setter
    def threads(self, n):
        self._call(lib.peer_layer_set_threads, int(n))

    def set_norm_momentum(self, momentum):
        self._call(lib.peer_layer_set_norm_momentum, float(momentum))

    @property
    def n_parameters(self):
        return lib.peer_layer_n_parameters(self.handle)

    @property
    def n_active_parameters(self):
        return lib.peer_layer_n_active_parameters(self.handle)

    def save(self, path):
        self._call(lib.peer_layer_save, str(path).encode())

    # -- inference
    def _x(self, x):
        x = _input(x, np.float32, None, "x")
        if x.ndim != 2 or x.shape[1] != self.config["d_model"]:
            raise ValueError(f"x: shape {x.shape}, expected [T, {self.config['d_model']}]")
        return x

    def _thk(self, x):
        return (x.shape[0], self.config["n_heads"], self.config["top_k"])

    def forward(self, x, out=None, *, indices=False, gates=False):
        """y = PEER(x) for x [T, d] (batch norm on running statistics).  `out`
        may be a float32 [T, d] array to write into.  indices / gates: True
        for new [T, H, k] arrays, or arrays to fill.  Returns y, or
        (y, indices, gates) when either was asked for."""
        x = self._x(x)
        y = _output(out, np.float32, x.shape, "out")
        _disjoint(x, y, "out", "x")
        ids = self._opt_out(indices, np.int64, x, "indices")
        g = self._opt_out(gates, np.float32, x, "gates")
        self._call(lib.peer_forward, x.shape[0], _ptr(x), _ptr(y), _ptr(ids), _ptr(g))
        if indices is False and gates is False:
            return y
        return y, ids, g

    def _opt_out(self, a, dtype, x, name):
        if a is False or a is None:
            return None
        return _output(None if a is True else a, dtype, self._thk(x), name)

    def retrieve(self, x, *, brute=False):
        """Retrieval only: (indices [T, H, k] int64, scores, gates [T, H, k]
        float32).  brute=True scores all N experts (for checks)."""
        x = self._x(x)
        ids = np.empty(self._thk(x), np.int64)
        scores = np.empty(self._thk(x), np.float32)
        g = np.empty(self._thk(x), np.float32)
        fn = lib.peer_retrieve_brute if brute else lib.peer_retrieve
        self._call(fn, x.shape[0], _ptr(x), _ptr(ids), _ptr(scores), _ptr(g))
        return ids, scores, g

    # -- training
    def context(self, max_tokens):
        return Context(self, max_tokens)

    def grads(self, max_tokens, *, experts_dense=False):
        return Grads(self, max_tokens, experts_dense=experts_dense)

    def forward_train(self, ctx, x, out=None):
        """Training forward (batch norm on batch statistics, running statistics
        updated); ctx keeps what backward needs, including a reference to x,
        which must not change until backward."""
        self._owns(ctx, "forward_train: the context")
        x = self._x(x)
        y = _output(out, np.float32, x.shape, "out")
        _disjoint(x, y, "out", "x")
        self._call(lib.peer_forward_train, ctx.handle, x.shape[0], _ptr(x), _ptr(y))
        ctx.x = x
        return y

    def backward(self, ctx, dy, grads=None, *, dx=True):
        """Backward of the last forward_train on ctx.  dy [T, d].  grads: a
        Grads to overwrite (one is made when None).  dx: True for a new array,
        an array to fill, or False to skip.  Returns (dx, grads)."""
        self._owns(ctx, "backward: the context")
        if grads is not None:
            self._owns(grads, "backward: the gradients")
        if ctx.x is None:
            raise ValueError("backward: ctx holds no forward_train")
        dy = _input(dy, np.float32, ctx.x.shape, "dy")
        dxa = None if dx is False else _output(None if dx is True else dx, np.float32,
                                               dy.shape, "dx")
        if dxa is not None:
            _disjoint(dy, dxa, "dx", "dy")
            _disjoint(ctx.x, dxa, "dx", "the x of forward_train")
        if grads is None:
            grads = Grads(self, ctx.max_tokens)
        self._call(lib.peer_backward, ctx.handle, _ptr(dy), _ptr(dxa), ctypes.byref(grads._s))
        grads.n_expert_rows = int(grads._s.n_expert_rows)
        return dxa, grads


class Context:
    """peer_context: what a training forward keeps for backward, for batches of
    up to max_tokens tokens."""

    def __init__(self, layer, max_tokens):
        self.layer = layer
        self.max_tokens = int(max_tokens)
        self.x = None
        h = ctypes.c_void_p()
        with layer._lock:
            check(lib.peer_context_create(ctypes.byref(h), layer.handle, self.max_tokens))
        self._h = h

    @property
    def handle(self):
        if self.layer.closed:
            raise ValueError("context: its layer is closed")
        return self._h

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_context_free(self._h)
            self._h = None


class Grads:
    """Gradient buffers for peer_backward, allocated once and overwritten by
    each backward: dense arrays named as the parameters (query_weight,
    query_bias, norm_weight, norm_bias, keys; None where the layer has no such
    parameter), and the expert gradients.  Sparse (default): `expert_rows`,
    `experts_down`, `experts_up` give the distinct rows the batch used,
    ascending, and their gradient rows.  experts_dense=True: experts_down/_up
    are [N, d] arrays that backward ADDS into (zero them yourself, zero_experts)."""

    def __init__(self, layer, max_tokens, *, experts_dense=False):
        self.layer = layer  # the buffers are shaped for this layer only
        c = layer.config
        t = layer.tensors
        s = _lib.peer_grads()

        def dense(name):
            if name not in t:
                return None
            return np.zeros(t[name][1], np.float32)

        self.query_weight = dense("query.weight")
        self.query_bias = dense("query.bias")
        self.norm_weight = dense("query.norm.weight")
        self.norm_bias = dense("query.norm.bias")
        self.keys = dense("keys")
        cap = int(max_tokens) * c["n_heads"] * c["top_k"]
        rows = min(cap, layer.n_experts) if experts_dense else cap
        self.experts_dense = bool(experts_dense)
        self._rows = np.zeros(max(cap, 1), np.int64)
        shape = (layer.n_experts if experts_dense else max(rows, 1), c["d_model"])
        self._down = np.zeros(shape, np.float32)
        self._up = np.zeros(shape, np.float32)
        for f in ("query_weight", "query_bias", "norm_weight", "norm_bias", "keys"):
            setattr(s, f, _ptr(getattr(self, f)))
        s.experts_dense = int(experts_dense)
        s.expert_capacity = cap
        s.expert_rows, s.experts_down, s.experts_up = _ptr(self._rows), _ptr(self._down), _ptr(self._up)
        self._s = s
        self.n_expert_rows = 0

    @property
    def expert_rows(self):
        return self._rows[: self.n_expert_rows]

    @property
    def experts_down(self):
        return self._down if self.experts_dense else self._down[: self.n_expert_rows]

    @property
    def experts_up(self):
        return self._up if self.experts_dense else self._up[: self.n_expert_rows]

    def zero_experts(self):
        self._down.fill(0)
        self._up.fill(0)

    def dense(self):
        """name -> dense gradient array, PEER.md names (no expert tables)."""
        names = {"query.weight": self.query_weight, "query.bias": self.query_bias,
                 "query.norm.weight": self.norm_weight, "query.norm.bias": self.norm_bias,
                 "keys": self.keys}
        return {k: v for k, v in names.items() if v is not None}


def optim_config(kind="adam", expert_kind="adam", **hyper):
    """A peer_optim_config: the library's defaults, kind / expert_kind "sgd"
    or "adam", hyperparameters as its fields (lr, momentum, beta1, beta2, eps,
    weight_decay, expert_lr)."""
    cfg = lib.peer_optim_config_default()
    for name, value in (("kind", kind), ("expert_kind", expert_kind)):
        if value not in OPTIM_KINDS:
            raise ValueError(f"Optimizer: {name} {value!r} is not one of "
                             f"{', '.join(repr(k) for k in OPTIM_KINDS)}")
    cfg.kind, cfg.expert_kind = OPTIM_KINDS[kind], OPTIM_KINDS[expert_kind]
    for key, value in hyper.items():
        if key not in ("lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "expert_lr"):
            raise TypeError(f"Optimizer: unknown hyperparameter {key!r}")
        setattr(cfg, key, float(value))
    return cfg


class Optimizer:
    """peer_optimizer: updates a layer's parameters in place from Grads.
    kind / expert_kind: "sgd" or "adam"; other keywords as peer_optim_config
    (lr, momentum, beta1, beta2, eps, weight_decay, expert_lr)."""

    def __init__(self, layer, *, kind="adam", expert_kind="adam", **hyper):
        cfg = optim_config(kind, expert_kind, **hyper)
        h = ctypes.c_void_p()
        with layer._lock:
            check(lib.peer_optimizer_create(ctypes.byref(h), layer.handle, ctypes.byref(cfg)))
        self.layer, self._h = layer, h

    def _locked(self, fn, *args):
        """fn(*args) under the layer's lock, checked; refused once the layer
        is closed (the C optimizer points into it)."""
        if self.layer.closed:
            raise ValueError("optimizer: its layer is closed")
        with self.layer._lock:
            if self.layer.closed:
                raise ValueError("optimizer: its layer is closed")
            check(fn(*args))

    def step(self, grads):
        self.layer._owns(grads, "Optimizer.step: the gradients")
        self._locked(lib.peer_optimizer_step, self._h, ctypes.byref(grads._s))

    def step_pointers(self, grads, stream=None):
        """One step from a _lib.peer_grads whose buffers the caller owns and
        keeps alive for the call: host pointers on a CPU layer
        (peer_optimizer_step), device pointers on a CUDA layer
        (peer_cuda_optimizer_step: queued on `stream`, a cudaStream_t, None
        for the legacy default stream; not waited for; the expert row count
        is grads.n_expert_rows; the rows must be strictly ascending)."""
        if self.layer.backend == "cuda":
            self._locked(lib.peer_cuda_optimizer_step, self._h, ctypes.byref(grads), None,
                         stream)
        else:
            self._locked(lib.peer_optimizer_step, self._h, ctypes.byref(grads))

    def set_lr(self, lr, expert_lr=0.0):
        self._locked(lib.peer_optimizer_set_lr, self._h, float(lr), float(expert_lr))

    @property
    def step_count(self):
        return lib.peer_optimizer_step_count(self._h)

    def save_checkpoint(self, path):
        self._locked(lib.peer_checkpoint_save, self.layer.handle, self._h, str(path).encode())

    def load_checkpoint(self, path):
        self._locked(lib.peer_checkpoint_load, self.layer.handle, self._h, str(path).encode())

    def __del__(self):
        if getattr(self, "_h", None):
            lib.peer_optimizer_free(self._h)
            self._h = None


def usage_metrics(z):
    """(usage, unevenness) of accumulated gate mass z [N] float64 (PEER.md)."""
    z = _input(z, np.float64, None, "z")
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"usage_metrics: z has shape {z.shape}; it needs one gate-mass entry "
                         "per expert, shape [N] with N = n_subkeys**2 (accumulate it with "
                         "the gates of retrievals)")
    u, e = ctypes.c_double(), ctypes.c_double()
    check(lib.peer_usage_metrics(_ptr(z), z.size, ctypes.byref(u), ctypes.byref(e)))
    return u.value, e.value


def _settings_struct(config=None, **overrides):
    """A peer_config from defaults and the given items, parsed but not
    validated (the shapes come from elsewhere, e.g. a PEER-pytorch file)."""
    cfg = _lib.peer_config()
    lib.peer_config_default(ctypes.byref(cfg))
    items = [config] if isinstance(config, str) else []
    if isinstance(config, dict):
        overrides = {**config, **overrides}
    elif config is not None and not isinstance(config, str):
        raise TypeError("config: a 'key=value,...' string, a dict, or None")
    items += [_item(k, int(v) if isinstance(v, bool) else v) for k, v in overrides.items()]
    text = ",".join(i for i in items if i)
    if text:
        check(lib.peer_config_parse(ctypes.byref(cfg), text.encode()))
    return cfg


def convert_from_pytorch(in_path, out_path, config=None, **settings):
    """PEER-pytorch state dict (safetensors) -> peer weight file
    (peer_convert_from_pytorch); settings as Layer.load_pytorch."""
    cfg = _settings_struct(config, **settings)
    check(lib.peer_convert_from_pytorch(str(in_path).encode(), str(out_path).encode(),
                                        ctypes.byref(cfg)))


def convert_to_pytorch(in_path, out_path):
    """peer weight file -> PEER-pytorch state dict (peer_convert_to_pytorch)."""
    check(lib.peer_convert_to_pytorch(str(in_path).encode(), str(out_path).encode()))
