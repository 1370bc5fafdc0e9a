"""PyTorch module over libpeer: PEER(nn.Module) and its autograd Function.

The C layer owns the parameter memory; the module registers torch Parameters
(and the batch-norm running statistics as buffers) that are views of that
memory, so torch optimizers, load_state_dict and the C library all read and
write the same bytes.  state_dict keys are the PEER.md tensor names
("query.weight", "keys", "experts.down", ...), so a state_dict and a peer
safetensors file hold the same tensors under the same names.

Gradients: dense for the query, batch-norm affine and keys; for the expert
tables either sparse COO tensors holding only the rows the batch used
(sparse_grads=True, the default: use torch.optim.SparseAdam, or SGD without
momentum, on sparse_parameters()) or dense [N, d] tensors (any optimizer).

Devices: CPU tensors go through the CPU backend (forward and backward).  A
module created with device="cuda" (library built with CUDA) keeps its
parameters on the GPU and runs the forward on CUDA tensors, on torch's current
stream; the CUDA backend has no backward yet, so it is for inference.
Moving the module with .to()/.cuda() would copy the parameters away from the
C layer; forward refuses parameters that no longer share its memory.
"""

import ctypes

import numpy as np
import torch
from torch import nn

from . import core
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
# peer_grads field of each trainable parameter (experts handled apart).
_GRAD_FIELD = {"query.weight": "query_weight", "query.bias": "query_bias",
               "query.norm.weight": "norm_weight", "query.norm.bias": "norm_bias",
               "keys": "keys"}


class _CudaView:
    """Device memory of a CUDA layer exposed through __cuda_array_interface__,
    keeping the layer alive as long as a tensor over it exists."""

    def __init__(self, ptr, shape, dtype, owner):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                         "typestr": np.dtype(dtype).str, "version": 2,
                                         "strides": None}
        self._owner = owner


def _wrap(layer, name, device):
    ptr, shape, dt = layer.tensors[name]
    if layer.backend == "cpu":
        t = torch.from_numpy(layer.params[name])
    else:
        t = torch.as_tensor(_CudaView(ptr, shape, dt, layer), device=device)
    if dt == np.uint16:  # bf16 expert table: same bits, torch's bfloat16
        t = t.view(torch.bfloat16)
    return t


class PEERFunction(torch.autograd.Function):
    """y = PEER(x) on x [T, d] float32 CPU, training mode: forward_train on a
    fresh peer context, backward through peer_backward.  The parameter tensors
    are inputs so that autograd routes their gradients; the C library reads
    them from its own memory, which they share."""

    @staticmethod
    def forward(ctx, module, x, *params):
        layer = module.layer
        pctx = core.Context(layer, max(x.shape[0], 1))
        y = torch.empty_like(x)
        layer.forward_train(pctx, x.detach().numpy(), out=y.numpy())
        ctx.module, ctx.pctx = module, pctx
        ctx.save_for_backward(x)  # x must stay unchanged until backward
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        module, layer = ctx.module, ctx.module.layer
        (x,) = ctx.saved_tensors
        T = x.shape[0]
        names = module._trainable
        need = dict(zip(names, ctx.needs_input_grad[2:]))
        sparse = module.sparse_grads
        g = core.Grads(layer, max(T, 1), experts_dense=not sparse)
        want_experts = need["experts.down"] or need["experts.up"]
        for name, field in _GRAD_FIELD.items():
            if name in need and not need[name]:
                setattr(g._s, field, None)
        if not want_experts:
            g._s.expert_rows = g._s.experts_down = g._s.experts_up = None
        dy = dy.contiguous().float()
        dx, _ = layer.backward(ctx.pctx, dy.numpy(), g, dx=bool(ctx.needs_input_grad[1]))
        out = [None, None if dx is None else torch.from_numpy(dx)]
        N, d = layer.n_experts, layer.config["d_model"]
        for name in names:
            if not need[name]:
                out.append(None)
            elif name in _GRAD_FIELD:
                out.append(torch.from_numpy(getattr(g, _GRAD_FIELD[name])))
            else:
                rows = getattr(g, "experts_down" if name == "experts.down" else "experts_up")
                if sparse:
                    idx = torch.from_numpy(g.expert_rows.copy()).unsqueeze(0)
                    grad = torch.sparse_coo_tensor(idx, torch.from_numpy(rows), (N, d),
                                                   is_coalesced=True, check_invariants=False)
                else:
                    grad = torch.from_numpy(rows)
                out.append(grad)
        return tuple(out)


class PEER(nn.Module):
    """The PEER layer as a torch module: y = PEER(x) for x [..., d_model].

    PEER(config, seed=0, ...) with config a "key=value,..." string, a dict,
    or keyword arguments (PEER.md names); PEER.from_file(path) loads a
    safetensors weight file.  threads: CPU threads (0 = OpenMP's default).
    device: "cpu" or "cuda[:i]" (forward only).  sparse_grads: expert
    gradients as sparse COO tensors (default) or dense [N, d] tensors.
    Computes in float32; other input dtypes are cast in and out."""

    def __init__(self, config=None, *, seed=0, threads=0, device="cpu", sparse_grads=True,
                 layer=None, **overrides):
        super().__init__()
        device = torch.device(device)
        if layer is None:
            layer = Layer(config, seed=seed, backend=device.type, threads=threads,
                          device=device.index or 0, **overrides)
        self.layer = layer
        self.sparse_grads = bool(sparse_grads)
        self.query = nn.Module()
        if "query.norm.weight" in layer.tensors:
            self.query.norm = nn.Module()
        self.experts = nn.Module()
        self._trainable = []
        self._ptrs = {}
        for name in layer.tensors:
            path, attr, is_buffer = _SLOTS[name]
            owner = self.get_submodule(path)
            t = _wrap(layer, name, device)
            if is_buffer:
                owner.register_buffer(attr, t)
            else:
                owner.register_parameter(attr, nn.Parameter(t))
                self._trainable.append(name)
            self._ptrs[name] = (owner, attr, t.data_ptr())

    @classmethod
    def from_file(cls, path, *, threads=0, device="cpu", sparse_grads=True):
        device = torch.device(device)
        layer = Layer.load(path, backend=device.type, threads=threads, device=device.index or 0)
        return cls(layer=layer, sparse_grads=sparse_grads, device=device)

    def save(self, path):
        """Write the layer as a PEER.md safetensors file (atomic)."""
        self.layer.save(path)

    @property
    def config(self):
        return dict(self.layer.config)

    def extra_repr(self):
        c = self.layer.config
        return ", ".join(f"{k}={v}" for k, v in c.items()) + f", backend={self.layer.backend}"

    def sparse_parameters(self):
        """The expert tables (sparse gradients when sparse_grads)."""
        return [self.experts.down, self.experts.up]

    def dense_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("experts.")]

    def _params(self):
        out = []
        for name, (owner, attr, ptr) in self._ptrs.items():
            t = getattr(owner, attr)
            if t is None or t.data_ptr() != ptr:
                raise RuntimeError(
                    f"peerlayer.PEER: {name} no longer shares memory with the C layer "
                    "(moved with .to()/.cuda()/.double() or replaced?); load values with "
                    "load_state_dict or copy_ instead")
            if name in self._trainable:
                out.append(t)
        return out

    def forward(self, x):
        d = self.layer.config["d_model"]
        if x.shape[-1] != d:
            raise ValueError(f"peerlayer.PEER: input's last dimension is {x.shape[-1]}, "
                             f"d_model is {d}")
        params = self._params()
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, d).to(torch.float32).contiguous()
        needs_grad = torch.is_grad_enabled() and (x2.requires_grad or
                                                  any(p.requires_grad for p in params))
        batchnorm = self.layer.config["query_norm"] == "batchnorm"
        if x2.is_cuda:
            y = self._forward_cuda(x2, needs_grad)
        elif needs_grad:
            if batchnorm and not self.training:
                raise RuntimeError("peerlayer.PEER: backward through batch norm needs "
                                   "training mode (the library differentiates batch "
                                   "statistics only); use torch.no_grad() in eval mode")
            y = PEERFunction.apply(self, x2, *params)
        elif self.training and batchnorm:
            # Training-mode batch norm updates the running statistics, as torch's does.
            pctx = core.Context(self.layer, max(x2.shape[0], 1))
            y = torch.empty_like(x2)
            self.layer.forward_train(pctx, x2.numpy(), out=y.numpy())
        else:
            y = torch.empty_like(x2)
            self.layer.forward(x2.numpy(), out=y.numpy())
        return y.reshape(*lead, d).to(dtype)

    def _forward_cuda(self, x, needs_grad):
        if self.layer.backend != "cuda":
            raise RuntimeError("peerlayer.PEER: CUDA input to a CPU layer; create the "
                               "module with device='cuda'")
        if needs_grad or (self.training and self.layer.config["query_norm"] == "batchnorm"):
            raise RuntimeError("peerlayer.PEER: the CUDA backend does forward only (no "
                               "training yet); use torch.no_grad() and eval(), or train "
                               "on CPU")
        if not lib.has_cuda:
            raise RuntimeError("peerlayer.PEER: libpeer was built without CUDA")
        y = torch.empty_like(x)
        stream = ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        h = self.layer.handle
        check(lib.peer_cuda_forward(h, x.shape[0], x.data_ptr(), y.data_ptr(), None, None,
                                    stream))
        # Surfaces a non-finite score (or a CUDA error) now, at the cost of a sync.
        check(lib.peer_cuda_check(h, stream))
        return y
