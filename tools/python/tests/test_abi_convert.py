"""The binding's load-time check of the library (version and the size of
every struct it re-declares, through peer_struct_size), and the PEER-pytorch
conversion calls of the library as the package exposes them."""

import ctypes

import numpy as np
import pytest

import peerlayer
from peerlayer import _lib

from conftest import read_safetensors


def test_every_declared_struct_matches_the_library():
    lib = peerlayer.lib
    for name, cls in _lib.STRUCTS.items():
        assert lib.peer_struct_size(name.encode()) == ctypes.sizeof(cls), name
    assert lib.peer_struct_size(b"peer_no_such_struct") == 0
    major, minor = _lib.ABI_VERSION
    assert lib.peer_version_number() // 100 == major * 100 + minor
    _lib.check_abi(lib, lib.path)  # the loaded library passes


def test_a_struct_of_another_size_is_refused(monkeypatch):
    class short_config(ctypes.Structure):
        _fields_ = [("d_model", ctypes.c_int64)]

    monkeypatch.setitem(_lib.STRUCTS, "peer_config", short_config)
    with pytest.raises(_lib.LibraryMismatch, match=r"sizeof\(peer_config\) is \d+ there, 8 here"):
        _lib.check_abi(peerlayer.lib, "libpeer.so")


def test_another_version_is_refused(monkeypatch):
    monkeypatch.setattr(_lib, "ABI_VERSION", (0, 99))
    with pytest.raises(_lib.LibraryMismatch, match=r"this peerlayer needs 0\.99"):
        _lib.check_abi(peerlayer.lib, "libpeer.so")


def test_a_library_without_the_abi_calls_is_refused():
    class Old:
        pass

    with pytest.raises(_lib.LibraryMismatch, match="lacks peer_version_number, peer_struct_size"):
        _lib.check_abi(Old(), "old/libpeer.so")


def test_pytorch_round_trip(tmp_path):
    a = peerlayer.Layer("d_model=12,n_heads=3,d_key=8,n_subkeys=6,top_k=4", seed=3)
    args = a.save_pytorch(tmp_path / "pt.safetensors")
    assert args.startswith("PEER(dim=12, heads=3, num_experts=36, num_experts_per_head=4")
    tensors, meta = read_safetensors(tmp_path / "pt.safetensors")
    assert sorted(tensors) == ["keys", "to_queries.0.weight", "weight_down_embed.weight",
                               "weight_up_embed.weight"]
    assert tensors["keys"].shape == (3, 6, 2, 4)
    assert meta == {"format": "pt"}
    # keys: ours [H, 2, n, dk], PEER-pytorch's [H, n, 2, dk].
    np.testing.assert_array_equal(tensors["keys"].transpose(0, 2, 1, 3), a.params["keys"])

    b = peerlayer.Layer.load_pytorch(tmp_path / "pt.safetensors", top_k=4)
    assert b.config == a.config
    for name, p in a.params.items():
        np.testing.assert_array_equal(b.params[name], p, err_msg=name)
    x = np.random.default_rng(0).standard_normal((5, 12), dtype=np.float32)
    np.testing.assert_array_equal(b.forward(x), a.forward(x))

    a.save(tmp_path / "a.safetensors")
    peerlayer.convert_to_pytorch(tmp_path / "a.safetensors", tmp_path / "pt2.safetensors")
    peerlayer.convert_from_pytorch(tmp_path / "pt2.safetensors", tmp_path / "c.safetensors",
                                   "top_k=4")
    c = peerlayer.Layer.load(tmp_path / "c.safetensors")
    np.testing.assert_array_equal(c.forward(x), a.forward(x))


def test_pytorch_refusals_raise_peer_error(tmp_path):
    a = peerlayer.Layer("d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,query_bias=1", seed=1)
    with pytest.raises(peerlayer.PeerError, match="query_bias") as e:
        a.save_pytorch(tmp_path / "pt.safetensors")
    assert e.value.status_name == "unsupported"
    a.save(tmp_path / "w.safetensors")
    with pytest.raises(peerlayer.PeerError, match="already a peer weight file"):
        peerlayer.Layer.load_pytorch(tmp_path / "w.safetensors")
