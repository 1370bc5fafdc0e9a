"""Shared fixtures for the peerlayer tests: the `peer` command-line tool built
beside the library (for results computed by C alone) and a tiny safetensors
reader/writer (numpy only) to exchange tensors with it."""

import json
import os
import struct
import subprocess

import numpy as np
import pytest

import peerlayer

_DT = {"F32": np.float32, "I64": np.int64}


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dt = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=_DT[info["dtype"]]).reshape(
            info["shape"])
    return out, header.get("__metadata__", {})


@pytest.fixture(scope="session")
def peer_cli():
    """Path of build/bin/peer next to the loaded library's build/lib."""
    path = os.path.join(os.path.dirname(peerlayer.lib.path), "..", "bin", "peer")
    if not os.path.exists(path):
        pytest.skip(f"the peer tool is not built beside {peerlayer.lib.path}")

    def run(*args):
        subprocess.run([path, *map(str, args)], check=True, capture_output=True)

    return run
