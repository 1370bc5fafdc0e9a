"""A PEER layer sharded over torch.distributed (README "Sharding"): each rank
holds 1/P of the expert tables; the rest of the model is replicated and every
rank sees the same batches.  Run from the repository root after the CMake
build:

    PYTHONPATH=tools/python torchrun --nproc-per-node 2 tools/examples/torch_shard.py
    PYTHONPATH=tools/python torchrun --nproc-per-node 2 tools/examples/torch_shard.py \
        --device cuda     # one GPU per rank, NCCL (libpeer built with PEER_CUDA=ON)

It trains a tiny next-byte model for a few steps, then writes each rank's
state_dict, the unsharded one (full_state_dict, on rank 0) and each rank's
shard file, merged back into one weight file by rank 0.  With --device cuda
and fewer GPUs than ranks (or a libpeer without CUDA) every rank prints why
it skips and exits with 0 before any process group is made (torchrun reports
any other exit status as a failed rank, with a traceback)."""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import peerlayer.optim
from peerlayer.nn import PEER
from peerlayer.shard import HAS_CUDA, merge

STEPS, T, D, V = 30, 64, 64, 256


def cuda_device():
    """This rank's GPU (torchrun's LOCAL_RANK), or exit saying why there is none."""
    local, ranks = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    why = ("libpeer was built without the CUDA backend (PEER_CUDA=ON)" if not HAS_CUDA else
           "torch has no NCCL" if not dist.is_nccl_available() else
           f"{ranks} ranks on this host, torch sees {torch.cuda.device_count()} GPUs"
           if torch.cuda.device_count() < ranks else None)
    if why:
        print(f"torch_shard.py --device cuda: skipped: {why}", flush=True)
        sys.exit(0)
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def main(out_dir, device):
    device = cuda_device() if device == "cuda" else torch.device("cpu")
    # torchrun's environment: rank, world size, address; NCCL for CUDA tensors
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same replicated parameters, batches and dropout on every rank
    peer = PEER(d_model=D, n_heads=4, d_key=32, n_subkeys=64, top_k=8, query_norm="batchnorm",
                threads=1, process_group=dist.group.WORLD, device=device)
    model = nn.Sequential(nn.Embedding(V, D), nn.LayerNorm(D), peer, nn.Linear(D, V)).to(device)
    opt = peerlayer.optim.AdamW(model, lr=3e-3)  # sparse expert rows, dense rest, all local
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 40), device=device)
    for step in range(STEPS):
        start = torch.randint(0, len(text) - T - 1, (1,)).item()
        x, y = text[start:start + T], text[start + 1:start + T + 1]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss {loss.item():.3f}", flush=True)
    mine = peer.experts.down.shape
    print(f"rank {rank}/{world}: experts.down {tuple(mine)}, columns {peer.columns}", flush=True)

    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, f"model-rank{rank}.pt"))
    full = peer.full_state_dict()  # collective; the whole tables on rank 0 only
    shard_file = os.path.join(out_dir, f"peer-rank{rank}-of-{world}.safetensors")
    peer.save(shard_file)
    dist.barrier()
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "peer-full.pt"))
        merged = os.path.join(out_dir, "peer-merged.safetensors")
        merge([os.path.join(out_dir, f"peer-rank{r}-of-{world}.safetensors")
               for r in range(world)], merged)
        back = PEER.from_file(merged)
        same = all(torch.equal(t, full[name].cpu()) for name, t in back.state_dict().items())
        print(f"merged shard files == full_state_dict: {same}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("out_dir", nargs="?", default="torch_shard_out")
    args.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = args.parse_args()
    main(args.out_dir, args.device)
