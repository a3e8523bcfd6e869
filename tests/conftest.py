import os
import subprocess
import sys

import pytest
import torch

from nanoalign import hub

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny():
    """A random-init tiny model (byte-level tokenizer) in eval mode."""
    model, tok = hub.load("tiny")
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted from the GGUF once per cache."""
    model, tok = hub.load(hub.ALIAS)
    return model.eval(), tok


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory):
    """A tiny reward-model checkpoint (random score head, seed 0), for tests that need an RM judge."""
    from nanoalign.checkpoint import save_checkpoint
    d = tmp_path_factory.mktemp("rm")
    model, tok = hub.load("tiny")
    model.add_score_head(seed=0)
    save_checkpoint(str(d), model, tok)
    return d


def run_cli(args, cwd=ROOT, env=None, timeout=600):
    """Run `python ARGS...` in a subprocess; returns CompletedProcess with text output."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=e, timeout=timeout)


def assert_user_error(r, *needles):
    """Exit code 2, exactly one `error:` line naming what is wrong, and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    err_lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in err_lines[0], (n, err_lines[0])


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for subprocesses: on 2 cores, 2 spinning OpenMP threads lose to 1 for tiny models


@pytest.fixture
def one_thread():
    """Tiny-model tests run faster on 1 thread (no OpenMP spin-wait); restores the count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
