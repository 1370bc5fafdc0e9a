"""peerlayer.nn as real training code uses it: the custom ops (opcheck), a
model with PEER blocks under torch.compile(fullgraph=True), seeding,
copying and pickling, moves between dtypes and devices, a second backward,
dropout, and the errors that name their fix."""

import copy
import io
import os

import pytest

if os.environ.get("PEER_REQUIRE_TORCH"):  # tools/test: the torch tests must run
    import torch
else:
    torch = pytest.importorskip(
        "torch", reason="torch is not importable: the PyTorch module tests did not run")
from torch import nn  # noqa: E402

import peerlayer  # noqa: E402
import peerlayer.optim  # noqa: E402
from peerlayer.nn import PEER  # noqa: E402

SMALL = "d_model=8,n_heads=2,d_key=6,n_subkeys=5,top_k=3,subkey_top_k=4"
BN = SMALL + ",query_norm=batchnorm,query_bias=1"


def grads_of(module):
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in module.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ opcheck

@pytest.mark.parametrize("config", [SMALL, BN])
def test_opcheck_training_forward_and_backward(config):
    m = PEER(config, seed=4)
    params = m._params()
    for p in params:
        p.requires_grad_(True)
    running = [getattr(owner, attr) for owner, attr in m._running]
    x = torch.randn(7, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.peerlayer.forward_train.default,
                          (m._key, x, params, running, True))
    torch.library.opcheck(torch.ops.peerlayer.forward_train.default,
                          (m._key, x, params, running, False))


def test_opcheck_inference_forward():
    m = PEER(BN, seed=4)
    torch.library.opcheck(torch.ops.peerlayer.forward.default,
                          (m._key, torch.randn(5, 8), [p.detach() for p in m._params()]))


# ------------------------------------------------------------------ compile

class Block(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.ffn = ffn

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


def two_block_model(d=16):
    return nn.Sequential(
        nn.Embedding(11, d),
        Block(d, PEER(f"d_model={d},n_heads=2,d_key=8,n_subkeys=6,top_k=3")),
        # (no query bias before batch norm: its gradient is rounding noise,
        # which Adam would blow up to full steps in either direction)
        Block(d, PEER(f"d_model={d},n_heads=2,d_key=8,n_subkeys=6,top_k=3,"
                      "query_norm=batchnorm")),
        nn.Linear(d, 11))


def test_compile_fullgraph_trains_as_eager_does():
    """Two training steps (forward, backward, peerlayer.optim.AdamW step) of a
    model with two PEER blocks, compiled with fullgraph=True (any graph break
    raises), against the same model in eager mode; then inference."""
    torch.manual_seed(0)
    eager = two_block_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    opts = [peerlayer.optim.AdamW(m, lr=1e-2, weight_decay=0.1) for m in (eager, compiled_model)]
    tokens = torch.randint(0, 11, (3, 5))
    for step in range(2):  # the second step reuses the compiled graphs
        y_e, y_c = eager(tokens), compiled(tokens)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        y_e.square().mean().backward()
        y_c.square().mean().backward()
        ge, gc = grads_of(eager), grads_of(compiled_model)
        assert ge.keys() == gc.keys() and "1.ffn.experts.down" in ge
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)
        assert compiled_model[1].ffn.experts.down.grad.is_sparse
        for o in opts:
            o.step()
            o.zero_grad()
    for (n, p), p2 in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p2, p, rtol=1e-4, atol=1e-5, msg=n)
    # Batch norm's running statistics moved, identically, in both.
    rm_e = eager[2].ffn.query.norm.running_mean
    assert rm_e.abs().sum() > 0
    torch.testing.assert_close(compiled_model[2].ffn.query.norm.running_mean, rm_e)
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), eager(tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ seeding

def test_seed_comes_from_torch_generator_and_explicit_seed_wins():
    torch.manual_seed(123)
    a, b = PEER(SMALL), PEER(SMALL)
    assert not torch.equal(a.experts.down, b.experts.down)  # two blocks differ
    torch.manual_seed(123)
    c = PEER(SMALL)
    assert torch.equal(a.experts.down, c.experts.down) and torch.equal(a.keys, c.keys)
    torch.manual_seed(1)
    d = PEER(SMALL, seed=7)
    torch.manual_seed(2)
    e = PEER(SMALL, seed=7)
    assert torch.equal(d.experts.up, e.experts.up)
    assert torch.equal(e.experts.up, torch.from_numpy(peerlayer.Layer(SMALL, seed=7).params["experts.up"]))


# ------------------------------------------------------------ copy, pickle

def test_deepcopy_gives_an_independent_layer_with_equal_values():
    m = PEER(BN, seed=3)
    x = torch.randn(6, 8)
    m(x).sum().backward()  # moves the running statistics; leaves grads
    c = copy.deepcopy(m)
    assert c.layer is not m.layer
    for (n, t), (n2, t2) in zip(m.state_dict().items(), c.state_dict().items()):
        assert n == n2 and torch.equal(t, t2), n
        assert t2.data_ptr() == c.layer.tensors[n][0]  # the copy's tensors are its C memory
    m.eval(), c.eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)
        c.experts.up.mul_(2)
        assert not torch.equal(c(x), m(x))
    # An EMA copy, as training loops keep one.
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), m.parameters()):
            pe.lerp_(p, 0.5)
    # The copy trains.
    c.train()
    c(x).sum().backward()
    assert c.experts.down.grad.is_sparse


def test_torch_save_and_load_of_a_whole_model():
    torch.manual_seed(0)
    model = two_block_model().eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    tokens = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded[1].ffn.layer is not model[1].ffn.layer


# -------------------------------------------------------------- moves

def test_bfloat16_maps_to_bf16_expert_tables_and_float_maps_back():
    m = PEER(SMALL, seed=5).eval()
    x = torch.randn(9, 8)
    opt = peerlayer.optim.AdamW(m, lr=1e-3)
    down = m.experts.down
    with torch.no_grad():
        y32 = m(x)
        m.to(torch.bfloat16)
        assert m.layer.config["weight_dtype"] == "bf16"
        assert m.experts.down is down and down.dtype == torch.bfloat16  # same Parameter
        assert m.query.weight.dtype == torch.float32  # compute stays f32
        assert m.experts.down.data_ptr() == m.layer.tensors["experts.down"][0]
        y16 = m(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)
        m.float()
        assert m.layer.config["weight_dtype"] == "f32" and m.experts.down.dtype == torch.float32
    assert opt.param_groups[-1]["params"][0] is m.experts.down
    m.train()
    m(x).sum().backward()
    opt.step()


def test_device_only_moves_keep_bf16_expert_tables():
    m = PEER(SMALL + ",weight_dtype=bf16", seed=5)
    down = m.experts.down.detach().clone()
    for move in (m.cpu, lambda: m.to("cpu"), lambda: torch.nn.Sequential(m).to("cpu")):
        move()
        assert m.layer.config["weight_dtype"] == "bf16" and m.experts.down.dtype == torch.bfloat16
        assert torch.equal(m.experts.down, down)
    m.float()
    assert m.layer.config["weight_dtype"] == "f32"


def test_unsupported_moves_are_refused_at_the_call():
    m = PEER(SMALL, seed=5)
    for move in (m.double, m.half, lambda: m.to(torch.float16)):
        with pytest.raises(TypeError, match="float32"):
            move()
    assert m.experts.down.dtype == torch.float32
    if not peerlayer.lib.has_cuda:
        with pytest.raises(RuntimeError, match="without the CUDA backend"):
            m.to("cuda")
    m.cpu()  # already there: nothing to do
    m.to(torch.float32)
    assert m.experts.down.data_ptr() == m.layer.tensors["experts.down"][0]


def test_functional_call_is_refused_with_the_fix():
    m = PEER(SMALL, seed=5)
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(RuntimeError, match="load_state_dict"):
        torch.func.functional_call(m, params, (torch.randn(2, 8),))


# ----------------------------------------------------- backward twice, errors

@pytest.mark.parametrize("config", [SMALL, BN])
def test_backward_twice_with_retain_graph(config):
    m = PEER(config, seed=8)
    x = torch.randn(6, 8, requires_grad=True)
    y = m(x)
    running = {n: b.clone() for n, b in m.named_buffers()}
    y.square().sum().backward(retain_graph=True)
    first, dx = grads_of(m), x.grad.clone()
    m.zero_grad()
    x.grad = None
    y.square().sum().backward()
    second = grads_of(m)
    for n in first:
        torch.testing.assert_close(second[n], first[n], rtol=0, atol=0, msg=n)
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=0)
    for n, b in m.named_buffers():  # the second backward did not move them again
        assert torch.equal(b, running[n]), n


def test_dense_only_optimizer_meeting_sparse_grads_names_the_fix():
    m = PEER(SMALL, seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 8)).sum().backward()
    with pytest.raises(TypeError, match=r"peerlayer\.optim\.AdamW.*sparse_grads=False"):
        opt.step()
    # With dense gradients any optimizer works (every row is updated).
    d = PEER(SMALL, seed=1, sparse_grads=False)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    before = d.experts.down.detach().clone()
    d(torch.randn(4, 8)).sum().backward()
    assert not d.experts.down.grad.is_sparse
    opt.step()
    assert not torch.equal(d.experts.down, before)


# ------------------------------------------------------- dropout, counts

def test_dropout_in_training_only():
    torch.manual_seed(0)
    m = PEER("d_model=64,n_heads=2,d_key=8,n_subkeys=6,top_k=3", seed=2, dropout=0.5)
    plain = PEER("d_model=64,n_heads=2,d_key=8,n_subkeys=6,top_k=3", seed=2)
    x = torch.randn(50, 64)
    with torch.no_grad():
        y, ref = m(x), plain(x)
        dropped = y == 0
        assert 0.4 < dropped.float().mean() < 0.6
        torch.testing.assert_close(y[~dropped], 2 * ref[~dropped])
        m.eval(), plain.eval()
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        PEER(SMALL, dropout=1.0)


def test_active_parameter_count():
    m = PEER("d_model=16,n_heads=4,d_key=8,n_subkeys=16,top_k=2,query_bias=1", seed=0)
    H, dk, n, k, d = 4, 8, 16, 2, 16
    query = H * dk * d + H * dk
    keys = H * 2 * n * (dk // 2)
    assert m.n_active_parameters() == query + keys + H * k * 2 * d
    assert m.n_parameters() == sum(p.numel() for p in m.parameters())


def test_training_contexts_live_as_long_as_the_graph():
    from peerlayer.nn import _Saved
    m = PEER(BN, seed=2)
    base = len(_Saved._live)
    for _ in range(3):
        m(torch.randn(4, 8)).sum().backward()
    assert len(_Saved._live) == base  # used up and freed with their graphs
    y = m(torch.randn(4, 8))
    assert len(_Saved._live) == base + 1
    del y  # a graph dropped without backward frees its context too
    assert len(_Saved._live) == base
    with torch.no_grad():
        m(torch.randn(4, 8))  # training batch norm without grad: nothing kept
    assert len(_Saved._live) == base
