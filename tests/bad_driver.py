"""Run many command lines of the scripts in forked children of ONE Python process (used by test_bad_inputs.py).

A subprocess per run would import torch ~400 times (minutes). Instead this process imports torch, nanoalign and
the four training scripts once, then for each job forks a child that runs the script exactly as
`python SCRIPT ARGS` / `python -m MODULE ARGS` would (runpy with run_name="__main__", sys.argv set), with
stdout/stderr captured in files and stdin at /dev/null. The parent waits for the child's exit status.

    python tests/bad_driver.py JOBS.json   ->  one JSON line per job: {"id", "rc", "stderr", "stdout", "seconds"}

A job is {"id": str, "argv": ["train_sft.py", ...] or ["-m", "nanoalign.evaluate", ...], "timeout": seconds}.
rc is the exit code, or -N when the child died of signal N (a hung child gets SIGALRM after its timeout).
"""
import gc
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)  # one thread, so that no OpenMP pool exists when we fork

import nanoalign.chat  # noqa: E402,F401
import nanoalign.evaluate  # noqa: E402,F401
import nanoalign.generate  # noqa: E402,F401
import nanoalign.merge  # noqa: E402,F401
import nanoalign.tasks  # noqa: E402,F401
import train_dpo  # noqa: E402,F401
import train_ppo  # noqa: E402,F401
import train_rm  # noqa: E402,F401
import train_sft  # noqa: E402,F401

# runpy warns that the module it re-runs as __main__ is already imported: true, and harmless here
warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*found in sys.modules.*")


def child(argv: list[str], out_path: str, err_path: str, timeout: int):
    """In the forked child: redirect fds, run the entry point as __main__, exit like the interpreter would."""
    signal.alarm(timeout)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # run_module(alter_sys=True) sets argv[0] to the module's file
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception: traceback, exit 1
        import traceback
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_job(job: dict, scratch: str) -> dict:
    out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        child(job["argv"], out_path, err_path, int(job.get("timeout", 60)))
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    with open(out_path, errors="replace") as f:
        stdout = f.read()
    with open(err_path, errors="replace") as f:
        stderr = f.read()
    return {"id": job["id"], "rc": rc, "stderr": stderr[-4000:], "stdout": stdout[-2000:],
            "seconds": round(time.time() - t0, 3)}


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    gc.freeze()  # the children then never touch (and copy) the parent's objects' pages to collect them
    with tempfile.TemporaryDirectory() as scratch:
        for job in jobs:
            print(json.dumps(run_job(job, scratch)), flush=True)


if __name__ == "__main__":
    main()
