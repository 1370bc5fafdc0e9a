"""peerlayer without its optional extra: importing peerlayer.nn without torch
names the extra to install instead of a bare ModuleNotFoundError."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_nn_without_torch_names_the_extra():
    # torch made unimportable in a child interpreter, installed or not.
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n"
            "    from peerlayer.nn import PEER\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e.name, '|', e)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("torch | "), r.stdout
    assert "pip install 'peerlayer[torch]'" in r.stdout, r.stdout
