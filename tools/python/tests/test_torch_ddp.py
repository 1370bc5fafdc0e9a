"""peerlayer.distributed.DistributedDataParallel: two gloo processes on this
machine train a model with a PEER block (sparse expert gradients) on halves
of each batch; their parameters must agree with each other and with one
process trained on the whole batches."""

import os

import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import peerlayer.optim  # noqa: E402
from peerlayer.distributed import DistributedDataParallel  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402

V, D, STEPS, WORLD = 17, 16, 6, 2


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(V, D),
                         PEER("d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=4", threads=1),
                         nn.LayerNorm(D), nn.Linear(D, V))


def batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        tokens = torch.randint(0, V, (2 * WORLD, 6), generator=g)
        yield tokens, (tokens * 5 + 2) % V


def train(model, opt, rank, world):
    for tokens, target in batches():
        tokens, target = tokens.chunk(world)[rank], target.chunk(world)[rank]
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, V), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    model = make_model(seed=rank)  # different seeds: DDP must broadcast rank 0's values
    ddp = DistributedDataParallel(model)
    opt = peerlayer.optim.AdamW(model, lr=1e-2, weight_decay=0.1)
    train(ddp, opt, rank, WORLD)
    torch.save({n: p.detach().clone() for n, p in model.state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_model(seed=0)
    start = {n: t.clone() for n, t in single.state_dict().items()}
    opt = peerlayer.optim.AdamW(single, lr=1e-2, weight_decay=0.1)
    train(single, opt, 0, 1)

    for name, t in single.state_dict().items():
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], t, rtol=1e-4, atol=2e-5, msg=name)
    assert not torch.equal(single.state_dict()["1.experts.down"], start["1.experts.down"])
