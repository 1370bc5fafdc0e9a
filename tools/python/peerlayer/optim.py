"""Optimizers for models that contain PEER modules.

param_groups(model) splits a model's parameters the way PEER needs:
  "decay"     dense parameters of the other modules with 2 or more dimensions
              (weight matrices, embeddings: nanoGPT's rule);
  "no_decay"  the other dense parameters (biases, norms) and PEER's own dense
              ones: query.weight, query.bias, keys and the batch-norm affine
              (their scale sets the retrieval scores, so decaying them would
              flatten the gates; peer_weight_decay=True decays query.weight
              and keys too);
  "experts"   PEER's expert tables: sparse gradients, lazy updates, never
              decayed (a lazy decay would shrink only the rows a batch used),
              learning rate scaled by expert_lr_scale.

AdamW(model_or_groups, lr, ...) is one torch.optim.Optimizer over them: AdamW
(torch's rule) on dense gradients, SparseAdam's lazy rule on sparse ones (rows
the batch did not use keep their values and moments).  Each group's step uses
group["lr"] * group["lr_scale"], so a schedule that sets or multiplies "lr"
(torch.optim.lr_scheduler, or nanoGPT's `for g in opt.param_groups: g["lr"] =
lr`) keeps the experts' ratio.  state_dict/load_state_dict, zero_grad and
param_groups are torch's own.  bf16 tables are updated in f32 and rounded back.
"""

import math

import torch
from torch import nn

from .nn import PEER


def param_groups(model, *, weight_decay=0.0, expert_lr_scale=1.0, peer_weight_decay=False):
    """The parameter groups of `model` (list of dicts, torch's format, plus
    "name", "lr_scale" and "weight_decay").  Empty groups are left out;
    parameters with requires_grad=False too."""
    expert, peer_dense, peer_decay = set(), set(), set()
    for m in model.modules():
        if isinstance(m, PEER):
            expert.update(map(id, m.sparse_parameters()))
            for name, p in m.named_parameters():
                if not name.startswith("experts."):
                    peer_dense.add(id(p))
                    if peer_weight_decay and name in ("query.weight", "keys"):
                        peer_decay.add(id(p))
    groups = {"decay": [], "no_decay": [], "experts": []}
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in expert:
            groups["experts"].append(p)
        elif id(p) in peer_decay or (id(p) not in peer_dense and p.dim() >= 2):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0),
                "experts": (0.0, expert_lr_scale)}
    return [{"name": n, "params": ps, "weight_decay": settings[n][0], "lr_scale": settings[n][1]}
            for n, ps in groups.items() if ps]


class AdamW(torch.optim.Optimizer):
    """AdamW for dense gradients and lazy sparse Adam for sparse ones, in one
    optimizer.  params: a model (grouped by param_groups with weight_decay,
    expert_lr_scale and peer_weight_decay), or an iterable of parameters or
    group dicts as for any torch optimizer (a group may set "lr_scale")."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 expert_lr_scale=1.0, peer_weight_decay=False):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr {lr} < 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas {betas} not in [0, 1)")
        if not eps > 0.0:
            raise ValueError(f"AdamW: eps {eps} <= 0")
        if isinstance(params, nn.Module):
            params = param_groups(params, weight_decay=weight_decay,
                                  expert_lr_scale=expert_lr_scale,
                                  peer_weight_decay=peer_weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "lr_scale": 1.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
                if p.grad.is_sparse:
                    self._sparse(p, state, lr, beta1, beta2, group["eps"], bc1, bc2)
                else:
                    self._dense(p, state, lr, beta1, beta2, group["eps"],
                                group["weight_decay"], bc1, bc2)
        return loss

    @staticmethod
    def _dense(p, state, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
        g = p.grad.float()
        w = p if p.dtype == torch.float32 else p.float()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        w.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / bc1)
        if w is not p:
            p.copy_(w)

    @staticmethod
    def _sparse(p, state, lr, beta1, beta2, eps, bc1, bc2):
        g = p.grad.coalesce()
        rows, values = g.indices()[0], g.values().float()
        if rows.numel() == 0:
            return
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m_rows = m[rows]
        v_rows = v[rows]
        m_rows.add_((values - m_rows).mul_(1.0 - beta1))
        v_rows.add_((values * values - v_rows).mul_(1.0 - beta2))
        m[rows] = m_rows
        v[rows] = v_rows
        step_size = lr * math.sqrt(bc2) / bc1
        update = m_rows.div_(v_rows.sqrt_().add_(eps)).mul_(-step_size)
        p.index_put_((rows,), (p[rows].float() + update).to(p.dtype))
