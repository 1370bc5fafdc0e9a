"""Sharding and data parallelism together (README "Sharding"): P ranks shard
each PEER layer's expert tables, D such groups train on different batches,
and peerlayer.distributed.DistributedDataParallel averages the gradients
over the D ranks that hold the same columns.  Run from the repository root
after the CMake build, with P * D processes (P = 2 here):

    PYTHONPATH=tools/python torchrun --nproc-per-node 4 tools/examples/torch_shard_ddp.py

Each process also trains one unsharded copy of the model on the whole
batches (what the D groups see together) and compares: every parameter (its
own columns of the expert tables) must agree within 1e-6 relative, or the
program exits with status 1.  No batch norm in the layer: under DDP each
group normalises over its own tokens."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import peerlayer.optim
from peerlayer.distributed import DistributedDataParallel
from peerlayer.nn import PEER

P, STEPS, V, D, T = 2, 8, 64, 32, 16
CONFIG = "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4"


def make_model(**peer_options):
    torch.manual_seed(0)  # the same dense parameters everywhere
    return nn.Sequential(nn.Embedding(V, D), PEER(CONFIG, seed=7, threads=1, **peer_options),
                         nn.LayerNorm(D), nn.Linear(D, V))


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % P:
        sys.exit(f"run with a multiple of {P} processes (got {world})")
    groups = world // P
    # Every rank creates every group, in the same order (torch.distributed's rule).
    shard_groups = [dist.new_group([g * P + r for r in range(P)]) for g in range(groups)]
    replica_groups = [dist.new_group([g * P + r for g in range(groups)]) for r in range(P)]
    group, column_rank = rank // P, rank % P

    model = make_model(process_group=shard_groups[group])
    ddp = DistributedDataParallel(model, process_group=replica_groups[column_rank],
                                  expert_group=replica_groups[column_rank])
    opt = peerlayer.optim.AdamW(model, lr=1e-2, eps=1e-3)
    whole = make_model()
    whole_opt = peerlayer.optim.AdamW(whole, lr=1e-2, eps=1e-3)

    data = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(0, V, (groups * T,), generator=data)
        targets = (tokens * 7 + 3) % V
        mine = slice(group * T, (group + 1) * T)  # this group's part of the batch
        losses = []
        for m, o, x, y in ((ddp, opt, tokens[mine], targets[mine]),
                           (whole, whole_opt, tokens, targets)):
            loss = nn.functional.cross_entropy(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"step {step + 1}: loss {losses[0]:.3f} (group 0's part), "
                  f"{losses[1]:.3f} (unsharded, whole batch)", flush=True)

    cols = slice(model[1].columns.start, model[1].columns.stop)
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), whole.named_parameters()):
        q = q[:, cols] if ".experts." in name else q
        worst = max(worst, ((p - q).abs().max() / q.abs().max()).item())
    print(f"rank {rank} (group {group}, columns {cols.start}:{cols.stop}): parameters vs the "
          f"unsharded model on the whole batches: worst relative difference {worst:.2e}",
          flush=True)
    dist.destroy_process_group()
    sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()
