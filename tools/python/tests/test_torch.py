"""Tests of the PyTorch module peerlayer.nn.PEER (skipped without torch).

The library computes in float32, so torch.autograd.gradcheck (float64) runs
on a plain-PyTorch float64 PEER written here, which validates that reference;
the module's float32 gradients (from peer_backward) are then compared with the
reference's autograd gradients at float32 tolerances."""

import os

import numpy as np
import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
from torch import nn  # noqa: E402

import peerlayer  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402

SMALL = "d_model=8,n_heads=2,d_key=6,n_subkeys=5,top_k=3,subkey_top_k=4"


def ref_peer(x, P, cfg):
    """PEER in plain PyTorch (training mode), any dtype: y and expert ids."""
    H, dk, n, k, kp = (cfg[s] for s in ("n_heads", "d_key", "n_subkeys", "top_k", "subkey_top_k"))
    T, half = x.shape[0], dk // 2
    q = x @ P["query.weight"].T
    if "query.bias" in P:
        q = q + P["query.bias"]
    if cfg["query_norm"] == "batchnorm":
        mean, var = q.mean(0), q.var(0, unbiased=False)
        q = (q - mean) / torch.sqrt(var + 1e-5) * P["query.norm.weight"] + P["query.norm.bias"]
    q = q.view(T, H, dk)
    keys = P["keys"].expand(H, -1, -1, -1) if cfg["shared_keys"] else P["keys"]
    s1 = torch.einsum("thc,hnc->thn", q[..., :half], keys[:, 0])
    s2 = torch.einsum("thc,hnc->thn", q[..., half:], keys[:, 1])
    v1, a1 = s1.topk(kp, dim=-1)
    v2, a2 = s2.topk(kp, dim=-1)
    z, j = (v1[..., :, None] + v2[..., None, :]).flatten(-2).topk(k, dim=-1)
    ids = a1.gather(-1, j // kp) * n + a2.gather(-1, j % kp)
    gate = {"softmax": lambda s: s.softmax(-1), "sigmoid": torch.sigmoid,
            "relu": torch.relu}[cfg["gate"]](z)
    act = {"gelu": nn.functional.gelu, "relu": torch.relu, "silu": nn.functional.silu,
           "identity": lambda a: a}[cfg["activation"]]
    h = act(torch.einsum("thkd,td->thk", P["experts.down"][ids], x))
    y = torch.einsum("thk,thkd->td", gate * h, P["experts.up"][ids])
    return y, ids


def trainable(m):
    return {n: p for n, p in m.named_parameters()}


CONFIGS = [
    SMALL + ",query_norm=batchnorm,query_bias=1",
    SMALL + ",shared_keys=1,activation=relu,gate=sigmoid",
    SMALL + ",activation=silu,gate=relu,query_bias=1",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_match_float64_reference_validated_by_gradcheck(config):
    torch.manual_seed(0)
    m = PEER(config, seed=11)
    cfg = m.config
    x = torch.randn(6, 8)

    # 1. The float64 reference passes torch.autograd.gradcheck (selection is
    #    constant, as in the library: perturbations are far from any tie).
    names = list(trainable(m))
    P64 = {n: p.detach().double().clone().requires_grad_() for n, p in trainable(m).items()}
    x64 = x.double().requires_grad_()

    def f(xx, *ps):
        return ref_peer(xx, dict(zip(names, ps)), cfg)[0]

    assert torch.autograd.gradcheck(f, (x64, *[P64[n] for n in names]), eps=1e-6, atol=1e-7)

    # 2. The module's forward and float32 gradients against the reference.
    xm = x.clone().requires_grad_()
    y = m(xm)
    y_ref, ids_ref = ref_peer(x64, P64, cfg)
    if cfg["query_norm"] == "none":  # else inference retrieval uses running statistics
        np.testing.assert_array_equal(m.layer.retrieve(x.numpy())[0], ids_ref.numpy())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn(6, 8)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(xm.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for n, p in trainable(m).items():
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(g.double(), P64[n].grad, rtol=1e-4, atol=1e-5, msg=n)
    assert m.experts.down.grad.is_sparse and not m.keys.grad.is_sparse


def test_parameters_share_the_c_layer_memory_and_state_dict_is_the_file_layout(tmp_path):
    m = PEER(SMALL + ",query_norm=batchnorm,query_bias=1", seed=2)
    for name, (ptr, shape, _) in m.layer.tensors.items():
        t = m.state_dict()[name]
        assert t.data_ptr() == ptr and tuple(t.shape) == shape, name
    m.save(tmp_path / "w.safetensors")
    from conftest import read_safetensors
    tensors, meta = read_safetensors(tmp_path / "w.safetensors")
    assert set(tensors) == set(m.state_dict())
    for name, a in tensors.items():
        np.testing.assert_array_equal(a, m.state_dict()[name].numpy())
    assert meta["peer.format"] == "1"

    # load_state_dict copies into the C memory: the C forward sees the values.
    other = PEER(SMALL + ",query_norm=batchnorm,query_bias=1", seed=9).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert not torch.equal(other(x), m.eval()(x))
        other.load_state_dict(m.state_dict())
        torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)
        loaded = PEER.from_file(tmp_path / "w.safetensors").eval()
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
        m.experts.up.zero_()  # in-place torch writes reach the library
        assert not m(x).any()

    # A dtype the library cannot hold is refused by .double() itself.
    with pytest.raises(TypeError, match="float64"):
        m.double()
    assert m.query.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(m(x.double()), m(x).double(), rtol=0, atol=0)


def test_errors_surface_as_exceptions():
    with pytest.raises(peerlayer.PeerError, match="top_k"):
        PEER(SMALL + ",top_k=0")
    m = PEER(SMALL, seed=1)
    x = torch.randn(3, 8)
    x[2, 0] = float("inf")
    with pytest.raises(peerlayer.PeerError, match="token 2"):
        m(x)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(3, 7))


class Block(nn.Module):
    """A pre-norm transformer block whose feed-forward is PEER."""

    def __init__(self, d, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ffn = ffn

    def forward(self, x):
        h = self.ln1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


@pytest.mark.parametrize("sparse", [True, False])
def test_tiny_transformer_trains_with_peer_in_place_of_its_mlp(sparse):
    torch.manual_seed(0)
    V, d, L = 16, 32, 8
    peer = PEER("d_model=32,n_heads=2,d_key=16,n_subkeys=8,top_k=4,query_norm=batchnorm",
                seed=0, sparse_grads=sparse)
    model = nn.Sequential(nn.Embedding(V, d), Block(d, peer), nn.LayerNorm(d), nn.Linear(d, V))
    expert_params = set(map(id, peer.sparse_parameters()))
    dense = [p for p in model.parameters() if id(p) not in expert_params]
    if sparse:  # sparse expert rows: SparseAdam, as PKM and PEER train their value tables
        opts = [torch.optim.AdamW(dense, lr=3e-3), torch.optim.SparseAdam(peer.sparse_parameters(), lr=1e-2)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=3e-3)]
    perm = torch.randperm(V)  # next token = a fixed permutation of the current one
    down0 = peer.layer.params["experts.down"].copy()
    losses = []
    for _ in range(40):
        tokens = torch.randint(0, V, (16, L))
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), perm[tokens].reshape(-1))
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    # The optimizers moved the C layer's own expert rows.
    assert not np.array_equal(peer.layer.params["experts.down"], down0)
    model.eval()
    with torch.no_grad():
        assert model(torch.randint(0, V, (2, L))).shape == (2, L, V)


@pytest.mark.skipif(not (peerlayer.lib.has_cuda and torch.cuda.is_available()),
                    reason="libpeer built without CUDA, or no CUDA device: CUDA forward not tested")
def test_cuda_forward_matches_cpu():
    cpu = PEER(SMALL + ",query_bias=1", seed=3).eval()
    gpu = PEER(SMALL + ",query_bias=1", seed=3, device="cuda").eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-5, atol=1e-6)
        assert gpu.experts.down.is_cuda
