"""Lifetimes, ownership, threads and hostile arguments in the numpy binding
(issue 14): nothing a Python caller does with a closed layer, another layer's
objects, two threads or in-place outputs may crash the process or give a
wrong result; each is refused with a clear exception or works."""

import threading

import numpy as np
import pytest

import peerlayer
from peerlayer import Layer, Optimizer, PeerError

SMALL = dict(d_model=16, n_heads=2, d_key=8, n_subkeys=8, top_k=2)


def batch(t=8, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((t, d)).astype(np.float32)


def trained_once(layer, x):
    ctx = layer.context(x.shape[0])
    y = layer.forward_train(ctx, x)
    _, g = layer.backward(ctx, np.ones_like(y))
    return ctx, g


def test_closed_layer_refuses_calls_on_it_and_its_objects():
    layer = Layer(SMALL, seed=1)
    x = batch()
    ctx, g = trained_once(layer, x)
    opt = Optimizer(layer, kind="sgd", expert_kind="sgd", lr=0.1)
    layer.close()
    with pytest.raises(ValueError, match="closed"):
        layer.forward(x)
    with pytest.raises(ValueError, match="closed"):
        opt.step(g)  # was a use after free (segfault or a hang)
    with pytest.raises(ValueError, match="closed"):
        opt.save_checkpoint("never.safetensors")
    with pytest.raises(ValueError, match="closed"):
        layer.forward_train(ctx, x)
    with pytest.raises(ValueError, match="closed"):
        Optimizer(layer)
    layer.close()  # twice is fine


def test_views_keep_the_memory_alive_after_close():
    layer = Layer(SMALL, seed=2)
    w = layer.params["query.weight"]
    before = w.copy()
    layer.close()
    assert layer.params == {}
    # the view still reads and writes live memory (was freed memory)
    np.testing.assert_array_equal(w, before)
    w[...] = 3.0
    assert float(w.sum()) == 3.0 * w.size
    del w  # the C layer goes now


def test_objects_of_another_layer_are_refused():
    big = Layer(dict(SMALL, n_subkeys=16), seed=3)
    small = Layer(SMALL, seed=4)
    x = batch()
    ctx_small, g_small = trained_once(small, x)
    ctx_big, g_big = trained_once(big, x)
    opt_big = Optimizer(big)
    # Grads of a smaller layer: a heap overflow before
    with pytest.raises(ValueError, match="another layer"):
        opt_big.step(g_small)
    y = big.forward_train(ctx_big, x)
    with pytest.raises(ValueError, match="another layer"):
        big.backward(ctx_big, np.ones_like(y), g_small)
    with pytest.raises(ValueError, match="another layer"):
        big.forward_train(ctx_small, x)
    # the rightful ones work
    big.backward(ctx_big, np.ones_like(y), g_big)
    opt_big.step(g_big)


def test_in_place_forward_is_refused_and_separate_buffers_work():
    layer = Layer(SMALL, seed=5)
    x = batch(seed=1)
    want = layer.forward(x)
    with pytest.raises(ValueError, match="overlaps"):
        layer.forward(x, out=x)  # silently wrong in every row before
    buf = np.concatenate([x, x[:1]])
    with pytest.raises(ValueError, match="overlaps"):
        layer.forward(buf[:-1], out=buf[1:])
    np.testing.assert_array_equal(x, batch(seed=1))  # x untouched
    out = np.empty_like(x)
    np.testing.assert_array_equal(layer.forward(x, out=out), want)


def test_in_place_in_c_is_refused_too():
    """The library itself refuses y over x, whatever the binding checks."""
    layer = Layer(SMALL, seed=6)
    x = batch()
    lib = peerlayer.core.lib
    status = lib.peer_forward(layer.handle, x.shape[0], x.ctypes.data, x.ctypes.data, None, None)
    assert status == 1  # PEER_ERR_INVALID_ARGUMENT
    assert b"overlap" in lib.peer_last_error()


def test_one_layer_shared_by_threads_gives_right_results():
    layer = Layer(SMALL, seed=7)
    xs = [batch(t=32 + 16 * i, seed=10 + i) for i in range(4)]
    wants = [layer.forward(x) for x in xs]
    errors, wrong = [], []

    def work(i):
        try:
            for _ in range(100):
                if not np.array_equal(layer.forward(xs[i]), wants[i]):
                    wrong.append(i)
        except Exception as e:  # noqa: BLE001 - any exception is a failure here
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong


def test_keyword_values_with_commas_are_refused():
    with pytest.raises(ValueError, match="','"):
        Layer(SMALL, activation="relu,d_model=32")  # set d_model before
    with pytest.raises(ValueError, match="'='"):
        Layer(dict(SMALL, gate="relu=1"))
    layer = Layer(SMALL, activation="relu")
    assert layer.config["d_model"] == 16 and layer.config["activation"] == "relu"


def test_unknown_optimizer_kind_is_a_value_error():
    layer = Layer(SMALL, seed=8)
    with pytest.raises(ValueError, match="'rmsprop' is not one of 'sgd', 'adam'"):
        Optimizer(layer, kind="rmsprop")  # a KeyError before
    with pytest.raises(ValueError, match="expert_kind"):
        Optimizer(layer, expert_kind="adagrad")


def test_usage_metrics_of_nothing_says_what_it_needs():
    with pytest.raises(ValueError, match="one gate-mass entry per expert"):
        peerlayer.usage_metrics([])
    usage, uneven = peerlayer.usage_metrics(np.ones(16))
    assert usage == 1.0 and abs(uneven) < 1e-12


def test_busy_status_has_a_name_in_python():
    assert peerlayer.core.lib.peer_status_string(12) == b"layer busy"
    assert PeerError(12, "forward: the layer is busy").status_name == "layer busy"
