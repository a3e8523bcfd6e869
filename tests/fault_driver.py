"""Run a training script with a fault injected from outside (the shipped code has no test hooks).

    python tests/fault_driver.py FAULTS SCRIPT [ARGS...]
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_driver.py FAULTS SCRIPT [ARGS...]

FAULTS is "none" or a comma-separated list; N is an optimizer step as the scripts count it (from 1: the `step` they
pass to loop.step_or_skip, and the step a train state is saved at):
    kill=N            SIGKILL in step N, after its backward, before its optimizer step (every rank)
    kill=N@R          the same, on rank R only
    nan-loss=N        the loss of step N is NaN, and so are its gradients
    nan-grad=N        one gradient of step N is NaN under a finite loss
    crash-in-save=N   SIGKILL inside the save of step N, with half of train_state.pt's temporary file on disk
    dist-timeout=S    the process group's timeout (loop.DIST_TIMEOUT), in seconds

The driver patches nanoalign.loop.step_or_skip, nanoalign.checkpoint.save_train_state and loop.DIST_TIMEOUT, then
runs SCRIPT as __main__ (runpy), as `python SCRIPT ARGS` would; under torchrun each rank is one driver. Tests that
run a script in-process call install(FAULTS, monkeypatch.setattr) instead, so the patches are undone afterwards.
"""
import datetime
import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from nanoalign import checkpoint, loop  # noqa: E402


def install(faults: str, patch=setattr):
    """Patch the faults in; patch(obj, name, value) is setattr, or pytest's monkeypatch.setattr."""
    spec = dict(f.split("=", 1) for f in faults.split(",") if f and f != "none")
    unknown = set(spec) - {"kill", "nan-loss", "nan-grad", "crash-in-save", "dist-timeout"}
    assert not unknown, f"unknown fault {unknown}"
    rank = os.environ.get("RANK", "0")  # set by torchrun
    step_or_skip, save_train_state = loop.step_or_skip, checkpoint.save_train_state

    def faulty_step(opt, params, loss, lr, step, cfg):
        if spec.get("kill") in (str(step), f"{step}@{rank}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if spec.get("nan-loss") == str(step):  # what a real NaN loss leaves: NaN loss, NaN gradients
            loss = loss * float("nan")
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        if spec.get("nan-grad") == str(step):
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("nan")
        return step_or_skip(opt, params, loss, lr, step, cfg)

    def faulty_save(out_dir, state):
        if spec.get("crash-in-save") != str(state["step"]):
            return save_train_state(out_dir, state)

        def write_half_and_die(tmp):
            buf = io.BytesIO()
            torch.save(state, buf)
            with open(tmp, "wb") as f:
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.atomic_write(os.path.join(out_dir, "train_state.pt"), write_half_and_die)  # its temporary name

    patch(loop, "step_or_skip", faulty_step)
    patch(checkpoint, "save_train_state", faulty_save)
    if "dist-timeout" in spec:
        patch(loop, "DIST_TIMEOUT", datetime.timedelta(seconds=float(spec["dist-timeout"])))


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = sys.argv[2:]  # what the script sees: [SCRIPT, ARGS...]
    runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
