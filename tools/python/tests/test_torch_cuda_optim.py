"""PEER.layer_optimizer(): the library's optimizer (peer_optimizer) stepping
a module from its parameters' .grad.  On the CPU it must equal the numpy
binding's Optimizer fed by Layer.backward (the same C step on the same
gradients: bitwise).  On CUDA (skipped without a GPU, as test_torch_cuda.py)
it must match the CPU module's within float tolerance."""

import os

import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")

import peerlayer  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402
from test_torch_cuda import REASON  # noqa: E402
from test_torch_cuda_emu import clear_x  # noqa: E402

CONFIG = "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=4,query_norm=batchnorm"
SETTINGS = dict(kind="adam", expert_kind="adam", lr=1e-2, weight_decay=0.1)


def batches(n, t=12):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(t, 16, generator=g), torch.randn(t, 16, generator=g))
            for _ in range(n)]


def module_steps(m, opt, data):
    for x, dy in data:
        opt.zero_grad()
        m(x).backward(dy)
        opt.step()


@pytest.mark.parametrize("sparse", [True, False])
def test_cpu_module_steps_as_the_numpy_binding(sparse):
    """Dense expert gradients step every row (as torch's optimizers do with
    them), the numpy binding's only the rows its backward listed: the same
    until a row used before is unused in a batch, so one step there."""
    m = PEER(CONFIG, seed=4, sparse_grads=sparse)
    layer = peerlayer.Layer(CONFIG, seed=4)
    data = batches(3 if sparse else 1)
    module_steps(m, m.layer_optimizer(**SETTINGS), data)
    opt = peerlayer.Optimizer(layer, **SETTINGS)
    ctx = layer.context(12)
    for x, dy in data:
        layer.forward_train(ctx, x.numpy())
        _, grads = layer.backward(ctx, dy.numpy(), layer.grads(12, experts_dense=not sparse))
        opt.step(grads)
    for n, v in m.state_dict().items():
        assert torch.equal(v, torch.from_numpy(layer.params[n])), n


def test_refuses_a_moved_module_and_half_the_expert_gradients():
    m = PEER(CONFIG, seed=4)
    opt = m.layer_optimizer()
    x, dy = batches(1)[0]
    m(x).backward(dy)
    m.experts.up.grad = None
    with pytest.raises(ValueError, match="one expert table"):
        opt.step()
    m.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="make a new one"):
        opt.step()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("sparse", [True, False])
def test_cuda_module_steps_as_the_cpu_one(sparse):
    cpu = PEER(CONFIG, seed=4, sparse_grads=sparse)
    gpu = PEER(CONFIG, seed=5, sparse_grads=sparse, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    opt_c, opt_g = cpu.layer_optimizer(**SETTINGS), gpu.layer_optimizer(**SETTINGS)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # batches free of near-ties for the weights of each step
        x, dy = clear_x(cpu, 12, g), torch.randn(12, 16, generator=g)
        module_steps(cpu, opt_c, [(x, dy)])
        module_steps(gpu, opt_g, [(x.cuda(), dy.cuda())])
    for n, v in gpu.state_dict().items():
        torch.testing.assert_close(v.cpu(), cpu.state_dict()[n], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")
