"""How libpeer's threads coexist with PyTorch's in one process.

The policy (tools/python/README.md "Threads next to PyTorch"): libpeer runs
its calls on its own workers (peer/pool.h), asleep between calls, and takes
its thread count from OpenMP: libpeer and a PyTorch CPU build that uses GNU
OpenMP share ONE libgomp (both ask for libgomp.so.1 and the loader gives the
second the copy already loaded, in either import order), so a layer made
with threads=0 asks that runtime at each call and follows
torch.set_num_threads() (made on the same Python thread); an explicit thread
count is kept whatever torch is set to.  After calls with n threads libpeer
holds at most n - 1 workers, all asleep.
"""

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import peerlayer  # noqa: E402

TINY = "d_model=64,n_heads=2,d_key=16,n_subkeys=16,top_k=4"


def _openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process."""
    with open("/proc/self/maps") as f:
        names = {line.split()[-1] for line in f if "/" in line}
    return sorted(p for p in names if any(r in os.path.basename(p) for r in ("libgomp", "libiomp", "libomp")))


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _needs_gnu_openmp():
    runtimes = _openmp_runtimes()
    if not any("libgomp" in os.path.basename(p) for p in runtimes) or len(runtimes) != 1:
        pytest.skip(f"torch and libpeer do not share one GNU OpenMP runtime here: {runtimes}")


def test_one_openmp_runtime_in_either_import_order():
    code = textwrap.dedent("""
        import os, sys
        if sys.argv[1] == "torch":
            import torch, peerlayer
        else:
            import peerlayer, torch
        peerlayer.Layer("%s", seed=1).forward  # the library is loaded
        maps = open("/proc/self/maps").read().splitlines()
        print(len({l.split()[-1] for l in maps if "libgomp" in l or "libiomp" in l or "libomp" in l}))
    """ % TINY)
    for first in ("torch", "peerlayer"):
        out = subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True,
                             env=os.environ.copy())
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1", f"{first} imported first: {out.stdout.strip()} OpenMP runtimes"


def test_threads_zero_follows_torch_set_num_threads(torch_threads):
    _needs_gnu_openmp()
    layer = peerlayer.Layer(TINY, seed=1)
    assert layer.threads == torch.get_num_threads()
    torch.set_num_threads(1)
    assert layer.threads == 1
    torch.set_num_threads(3)
    assert layer.threads == 3
    x = torch.randn(8, 64).numpy()
    y = layer.forward(x)  # runs with the runtime's 3 threads: same bits as 1 thread
    torch.set_num_threads(1)
    assert (layer.forward(x) == y).all()


def test_explicit_threads_ignore_torch(torch_threads):
    layer = peerlayer.Layer(TINY, seed=1, threads=2)
    torch.set_num_threads(1)
    assert layer.threads == 2
    layer.threads = 1
    torch.set_num_threads(4)
    assert layer.threads == 1


def _peer_workers():
    """(count, awake) of libpeer's worker threads (named peer-pool)."""
    count = awake = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("peer-pool"):
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        count += 1
        awake += state != "S"
    return count, awake


def test_workers_follow_the_count_and_sleep(torch_threads):
    _needs_gnu_openmp()
    import time
    torch.set_num_threads(3)
    layer = peerlayer.Layer(TINY, seed=1)
    layer.forward(torch.randn(64, 64).numpy())
    torch.randn(256, 256) @ torch.randn(256, 256)  # torch's pool runs too
    count, awake = _peer_workers()
    assert count <= 2, f"{count} libpeer workers for calls of 3 threads"
    for _ in range(100):  # one just finishing its item may still be on its way
        if awake == 0:
            break
        time.sleep(0.01)
        count, awake = _peer_workers()
    assert awake == 0, f"{awake} libpeer worker(s) awake 1 s after the call"
