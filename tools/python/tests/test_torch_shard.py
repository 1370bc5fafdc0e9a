"""peerlayer.shard: the C library's sharded layer over torch.distributed
(gloo), two processes on this machine.  Each rank checks its shard against an
unsharded peerlayer.Layer on the same data: ids identical; y, dx, the dense
gradients and its columns of the expert gradients within 1e-6 relative;
parameters after optimizer steps (SGD: each rank steps with its own
gradients); shard files saved, merged and compared with the unsharded
checkpoint."""

import os

import numpy as np
import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import peerlayer  # noqa: E402

CONFIG = "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4,query_norm=batchnorm"
WORLD, T, STEPS, TOL = 2, 24, 3, 1e-6


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return np.abs(a - b).max() / scale if scale > 0 else np.abs(a - b).max()


def _worker(rank, init_file, out_dir):
    from peerlayer.shard import ShardedLayer, ShardedOptimizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    errors = []

    def expect(ok, what):
        if not ok:
            errors.append(what)

    full = peerlayer.Layer(CONFIG, seed=3, threads=1)
    shard = ShardedLayer(CONFIG, seed=3, threads=1)
    c0, c1 = shard.col0, shard.col0 + shard.cols
    rng = np.random.default_rng(7)  # the same stream on both ranks
    x = rng.standard_normal((T, 32), dtype=np.float32)
    yf, idf, _ = full.forward(x, indices=True)
    ys, ids = shard.forward(x, indices=True)
    expect((idf == ids).all(), "forward ids differ")
    expect(rel(ys, yf) <= TOL, f"forward y differs by {rel(ys, yf):.3g}")
    cf, cs = full.context(T), shard.context(T)
    gf, gs = full.grads(T), shard.grads(T)
    of = peerlayer.Optimizer(full, kind="sgd", expert_kind="sgd", lr=0.05)
    osh = ShardedOptimizer(shard, kind="sgd", expert_kind="sgd", lr=0.05)
    for step in range(STEPS):
        x = rng.standard_normal((T, 32), dtype=np.float32)
        dy = 0.1 * rng.standard_normal((T, 32), dtype=np.float32)
        yf, ys = full.forward_train(cf, x), shard.forward_train(cs, x)
        expect(rel(ys, yf) <= TOL, f"step {step}: y differs by {rel(ys, yf):.3g}")
        dxf, gf = full.backward(cf, dy, gf)
        dxs, gs = shard.backward(cs, dy, gs)
        expect(rel(dxs, dxf) <= TOL, f"step {step}: dx differs by {rel(dxs, dxf):.3g}")
        for name, g in gf.dense().items():
            expect(rel(gs.dense()[name], g) <= TOL, f"step {step}: grad {name} differs")
        expect((gs.expert_rows == gf.expert_rows).all(), f"step {step}: expert rows differ")
        expect(rel(gs.experts_down, gf.experts_down[:, c0:c1]) <= TOL, "expert grads differ")
        expect(rel(gs.experts_up, gf.experts_up[:, c0:c1]) <= TOL, "expert grads differ")
        of.step(gf)
        osh.step(gs)
        for name, arr in shard.params.items():
            ref = full.params[name]
            ref = ref[:, c0:c1] if name.startswith("experts.") else ref
            expect(rel(arr, ref) <= TOL, f"step {step}: {name} differs by {rel(arr, ref):.3g}")
    expect(osh.step_count == STEPS, "step count")
    shard.save(os.path.join(out_dir, f"shard{rank}.safetensors"), osh)
    if rank == 0:
        of.save_checkpoint(os.path.join(out_dir, "full.safetensors"))
    with open(os.path.join(out_dir, f"errors{rank}.txt"), "w") as f:
        f.write("\n".join(errors))
    dist.destroy_process_group()


def test_sharded_layer_matches_unsharded_over_gloo(tmp_path):
    init = tmp_path / "init"
    mp.start_processes(_worker, args=(str(init), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    for r in range(WORLD):
        errors = (tmp_path / f"errors{r}.txt").read_text()
        assert errors == "", f"rank {r}:\n{errors}"
    # the shard files merge into the unsharded checkpoint
    from peerlayer.shard import merge
    merge([tmp_path / f"shard{r}.safetensors" for r in reversed(range(WORLD))],
          tmp_path / "merged.safetensors")
    merged = peerlayer.Layer.load(tmp_path / "merged.safetensors", threads=1)
    full = peerlayer.Layer.load(tmp_path / "full.safetensors", threads=1)
    for name, arr in full.params.items():
        assert rel(merged.params[name], arr) <= TOL, name
