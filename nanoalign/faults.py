"""Fault injection for the crash-safety tests, read from the environment (steps are 1-based; off when unset):

    NANOALIGN_CRASH_IN_SAVE=STEP       SIGKILL in the save of STEP, with half of the temporary file on disk
    NANOALIGN_KILL_AT_STEP=N           SIGKILL this process in step N, after its backward, before its optimizer step
    NANOALIGN_KILL_RANK_AT_STEP=R:N    the same, on rank R only (the other ranks must notice and end)
    NANOALIGN_INJECT_NAN_GRAD_STEP=N   a NaN in the gradients of step N, with a finite loss
"""
import io
import os
import signal

import torch
import torch.distributed as dist

from .checkpoint import atomic_write


def fault_injection(step: int, params):
    """The hooks of one optimizer step (called by loop.clip_and_step)."""
    env = os.environ.get
    rank = dist.get_rank() if dist.is_initialized() else 0
    if env("NANOALIGN_KILL_AT_STEP") == str(step) or env("NANOALIGN_KILL_RANK_AT_STEP") == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if env("NANOALIGN_INJECT_NAN_GRAD_STEP") == str(step):
        next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("nan")


def crash_in_save(out: str, state: dict, step: int):
    """The hook of one save (called by loop.save_state before the real write)."""
    if os.environ.get("NANOALIGN_CRASH_IN_SAVE") != str(step):
        return

    def write_half_and_die(tmp: str):
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(os.path.join(out, "train_state.pt"), write_half_and_die)
