"""Tests of the numpy binding: results equal those of the C library run
through the `peer` tool, a float64 reference for the forward, errors as
PeerError with the library's message, and arrays passed without copies."""

import math

import numpy as np
import pytest
from conftest import read_safetensors, write_safetensors

import peerlayer
from peerlayer import Layer, PeerError

SMALL = "d_model=12,n_heads=3,d_key=8,n_subkeys=6,top_k=3,subkey_top_k=4"


def ref_forward(layer, x):
    """Float64 PEER by brute force over all N experts (no batch norm)."""
    c, P = layer.config, {k: v.astype(np.float64) for k, v in layer.params.items()}
    H, dk, n, k = c["n_heads"], c["d_key"], c["n_subkeys"], c["top_k"]
    x = x.astype(np.float64)
    q = x @ P["query.weight"].T + P.get("query.bias", 0.0)
    keys = P["keys"]
    y = np.zeros_like(x)
    ids = np.zeros((x.shape[0], H, k), np.int64)
    for t in range(x.shape[0]):
        for h in range(H):
            g = 0 if c["shared_keys"] else h
            qh = q[t, h * dk : (h + 1) * dk]
            s1, s2 = keys[g, 0] @ qh[: dk // 2], keys[g, 1] @ qh[dk // 2 :]
            s = (s1[:, None] + s2[None, :]).ravel()
            best = sorted(range(n * n), key=lambda i: (-s[i], i))[:k]
            ids[t, h] = best
            z = s[best]
            gate = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            for j, i in enumerate(best):
                a = P["experts.down"][i] @ x[t]
                act = 0.5 * a * (1 + math.erf(a / math.sqrt(2)))  # gelu
                y[t] += gate[j] * act * P["experts.up"][i]
    return y, ids


def test_forward_matches_float64_reference_and_brute_force():
    layer = Layer(SMALL, seed=3)
    x = np.random.default_rng(0).standard_normal((7, 12), dtype=np.float32)
    y, ids, gates = layer.forward(x, indices=True, gates=True)
    y_ref, ids_ref = ref_forward(layer, x)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    r_ids, r_scores, r_gates = layer.retrieve(x)
    b_ids, b_scores, b_gates = layer.retrieve(x, brute=True)
    np.testing.assert_array_equal(r_ids, ids)
    np.testing.assert_array_equal(b_ids, ids)
    np.testing.assert_array_equal(r_gates, gates)
    assert np.all(np.diff(r_scores, axis=-1) <= 0)


CONFIGS = [
    SMALL + ",query_norm=batchnorm,query_bias=1",
    SMALL + ",shared_keys=1,activation=relu,gate=sigmoid",
]


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_and_backward_equal_the_c_tool(tmp_path, peer_cli, config):
    layer = Layer(config, seed=5)
    w = tmp_path / "w.safetensors"
    layer.save(w)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 12), dtype=np.float32)
    dy = rng.standard_normal((9, 12), dtype=np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"x": x})
    write_safetensors(tmp_path / "dy.safetensors", {"dy": dy})

    peer_cli("forward", "--weights", w, "--input", tmp_path / "x.safetensors",
             "--output", tmp_path / "y.safetensors", "--indices")
    c_out, _ = read_safetensors(tmp_path / "y.safetensors")
    y, ids, gates = layer.forward(x, indices=True, gates=True)
    np.testing.assert_array_equal(y, c_out["y"])
    np.testing.assert_array_equal(ids, c_out["indices"])
    np.testing.assert_array_equal(gates, c_out["gates"])

    peer_cli("grad", "--weights", w, "--input", tmp_path / "x.safetensors",
             "--dy", tmp_path / "dy.safetensors", "--output", tmp_path / "g.safetensors")
    c_grad, _ = read_safetensors(tmp_path / "g.safetensors")
    train = Layer.load(w)  # forward_train updates running statistics: use a copy
    ctx = train.context(9)
    y_train = train.forward_train(ctx, x)
    dx, g = train.backward(ctx, dy)
    np.testing.assert_array_equal(y_train, c_grad["y"])
    np.testing.assert_array_equal(dx, c_grad["dx"])
    for name, a in g.dense().items():
        np.testing.assert_array_equal(a, c_grad[name], err_msg=name)
    assert np.all(np.diff(g.expert_rows) > 0)
    # Expert gradients are not compared with the tool's: `peer grad` adds them
    # into uninitialised (malloc'd) [N, d] buffers, so its expert tensors can
    # hold garbage.  Instead: dense accumulation into zeroed [N, d] buffers
    # equals the sparse rows scattered (the float64 comparison is in
    # test_torch.py).
    train2 = Layer.load(w)
    ctx2 = train2.context(9)
    train2.forward_train(ctx2, x)
    gd = train2.grads(9, experts_dense=True)
    train2.backward(ctx2, dy, gd, dx=False)
    for name, rows, got in (("experts.down", g.experts_down, gd.experts_down),
                            ("experts.up", g.experts_up, gd.experts_up)):
        dense = np.zeros((train.n_experts, 12), np.float32)
        dense[g.expert_rows] = rows
        np.testing.assert_array_equal(got, dense, err_msg=name)


def test_errors_are_exceptions_with_the_library_message(tmp_path):
    with pytest.raises(PeerError, match="d_key") as e:
        Layer(SMALL + ",d_key=7")
    assert e.value.status == 2 and e.value.status_name
    with pytest.raises(PeerError, match="activation"):
        Layer(activation="tanh")
    with pytest.raises(PeerError) as e:
        Layer.load(tmp_path / "missing.safetensors")
    assert e.value.status == 4  # PEER_ERR_IO
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(PeerError) as e:
        Layer.load(bad)
    assert e.value.status == 5  # PEER_ERR_FORMAT
    layer = Layer(SMALL, seed=1)
    x = np.ones((2, 12), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(PeerError, match="token 1") as e:
        layer.forward(x)
    assert e.value.status == 6  # PEER_ERR_NONFINITE
    with pytest.raises(ValueError, match="shape"):
        layer.forward(np.ones((2, 5), np.float32))
    with pytest.raises(PeerError) as e:
        Layer(SMALL, backend="cuda") if not peerlayer.lib.has_cuda else Layer(SMALL, threads=-1)
    assert e.value.status in (1, 8)


def test_contiguous_inputs_and_outputs_are_not_copied():
    layer = Layer(SMALL, seed=2)
    x = np.random.default_rng(2).standard_normal((4, 12), dtype=np.float32)
    out = np.empty_like(x)
    assert layer.forward(x, out=out) is out
    ctx = layer.context(4)
    y = layer.forward_train(ctx, x, out=np.empty_like(x))
    assert ctx.x is x  # the context keeps the caller's array, not a copy
    dx = np.empty_like(x)
    got, g = layer.backward(ctx, np.ones_like(y), dx=dx)
    assert got is dx
    # A non-contiguous or float64 input is converted once, and still correct.
    xt = np.asfortranarray(x.astype(np.float64))
    np.testing.assert_array_equal(layer.forward(xt), out)
    with pytest.raises(ValueError, match="writable C-contiguous"):
        layer.forward(x, out=np.empty((4, 12), np.float64))


def test_params_are_views_of_the_layer_memory(tmp_path):
    layer = Layer(SMALL, seed=4)
    p = layer.params
    assert p["query.weight"].ctypes.data == layer.tensors["query.weight"][0]
    assert p["experts.down"].shape == (36, 12) and p["keys"].shape == (3, 2, 6, 4)
    x = np.random.default_rng(3).standard_normal((3, 12), dtype=np.float32)
    p["experts.up"][:] = 0  # writing the view changes the layer
    assert not layer.forward(x).any()
    p["experts.up"][:] = 1
    layer.save(tmp_path / "w.safetensors")
    loaded = Layer.load(tmp_path / "w.safetensors")
    assert loaded.config == layer.config
    for name in p:
        np.testing.assert_array_equal(loaded.params[name], p[name])
    np.testing.assert_array_equal(loaded.forward(x), layer.forward(x))
    view = layer.params["keys"]
    del layer, loaded  # a view keeps its layer alive
    assert np.isfinite(view).all()


def test_optimizer_steps_and_checkpoints(tmp_path):
    layer = Layer(SMALL + ",query_norm=batchnorm", seed=6)
    opt = peerlayer.Optimizer(layer, kind="sgd", expert_kind="sgd", lr=0.1)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 12), dtype=np.float32)
    target = rng.standard_normal((16, 12), dtype=np.float32) * 0.1
    ctx, g = layer.context(16), layer.grads(16)
    losses = []
    for _ in range(20):
        y = layer.forward_train(ctx, x)
        losses.append(float(((y - target) ** 2).mean()))
        w_before = layer.params["query.weight"].copy()
        layer.backward(ctx, 2 * (y - target) / y.size, g, dx=False)
        opt.step(g)
    np.testing.assert_allclose(layer.params["query.weight"], w_before - 0.1 * g.query_weight,
                               rtol=1e-6, atol=1e-7)
    assert losses[-1] < losses[0]
    assert opt.step_count == 20
    opt.save_checkpoint(tmp_path / "c.safetensors")
    other = Layer(SMALL + ",query_norm=batchnorm", seed=0)
    opt2 = peerlayer.Optimizer(other, kind="sgd", expert_kind="sgd", lr=0.1)
    opt2.load_checkpoint(tmp_path / "c.safetensors")
    assert opt2.step_count == 20
    np.testing.assert_array_equal(other.params["experts.down"], layer.params["experts.down"])
    mismatch = peerlayer.Optimizer(Layer(SMALL, seed=0), kind="sgd", expert_kind="sgd")
    with pytest.raises(PeerError, match="query_norm"):
        mismatch.load_checkpoint(tmp_path / "c.safetensors")


def test_usage_metrics():
    z = np.ones(64)
    assert peerlayer.usage_metrics(z) == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(PeerError):
        peerlayer.usage_metrics(np.zeros(64))
