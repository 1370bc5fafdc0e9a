"""Data-parallel training of models with PEER modules (torch.distributed).

torch's DistributedDataParallel all-reduces gradients in dense buckets and
fails on PEER's sparse expert gradients ("Cannot access storage of
SparseTensorImpl").  DistributedDataParallel here is torch's, with PEER's
sparse expert tables left out of its buckets and averaged by this module
instead: when a table's gradient has been accumulated, the ranks exchange
the rows they used (all_gather of row ids and gradient rows, on a process
group of their own) and each sets the average, as sparse rows; an N x d dense
gradient never exists.  Everything else is torch's DDP unchanged (dense
parameters, buffers, no_sync).  At construction the tables are broadcast from
rank 0 like DDP's own parameters.

Query batch norm normalises over each rank's own tokens (as torch's
BatchNorm under DDP does without SyncBatchNorm).
"""

import torch
import torch.distributed as dist

from .nn import PEER


def _expert_tables(module):
    """(qualified name, parameter) of every sparse-gradient expert table."""
    out = []
    for prefix, m in module.named_modules():
        if isinstance(m, PEER) and m.sparse_grads:
            for name in ("experts.down", "experts.up"):
                p = m.get_parameter(name)
                if p.requires_grad:
                    out.append((f"{prefix}.{name}" if prefix else name, p))
    return out


def all_reduce_sparse_mean(grad, group=None):
    """The average over the ranks of `group` of a sparse COO gradient, as a
    coalesced sparse tensor (every rank gets the same bits)."""
    world = dist.get_world_size(group)
    g = grad.coalesce()
    rows, values = g.indices()[0].contiguous(), g.values().contiguous()
    count = torch.tensor([rows.numel()], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    most = max(counts)
    pad = most - rows.numel()
    rows_p = torch.cat([rows, rows.new_zeros(pad)])
    values_p = torch.cat([values, values.new_zeros((pad,) + values.shape[1:])])
    all_rows = [torch.empty_like(rows_p) for _ in range(world)]
    all_values = [torch.empty_like(values_p) for _ in range(world)]
    dist.all_gather(all_rows, rows_p, group=group)
    dist.all_gather(all_values, values_p, group=group)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    values = torch.cat([v[:c] for v, c in zip(all_values, counts)]) / world
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape).coalesce()


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch.nn.parallel.DistributedDataParallel for models with PEER modules
    whose expert gradients are sparse; same arguments, plus expert_group: the
    process group for the expert rows (default: a new group of all ranks)."""

    def __init__(self, module, *args, expert_group=None, **kwargs):
        tables = _expert_tables(module)
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [name for name, _ in tables])
        super().__init__(module, *args, **kwargs)
        self.expert_group = expert_group if expert_group is not None else dist.new_group()
        src = dist.get_global_rank(self.expert_group, 0)  # broadcast's src is a global rank
        with torch.no_grad():
            for _, p in tables:
                dist.broadcast(p.data, src=src, group=self.expert_group)
        for _, p in tables:
            p.register_post_accumulate_grad_hook(self._average_expert_grad)

    def _average_expert_grad(self, p):
        # Under no_sync() gradients accumulate locally; the next synchronised
        # backward averages the accumulated sum, as DDP does for its buckets.
        if not self.require_backward_grad_sync or p.grad is None:
            return
        if p.grad.is_sparse:
            p.grad = all_reduce_sparse_mean(p.grad, self.expert_group).to(p.grad.dtype)
        else:
            dist.all_reduce(p.grad, group=self.expert_group)
            p.grad /= dist.get_world_size(self.expert_group)
