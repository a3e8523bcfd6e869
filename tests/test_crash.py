"""Crash safety of the four training scripts on the tiny model: a SIGKILL in the middle of a save leaves the previous
train_state.pt loadable, a SIGKILL at a (seeded) random step loses nothing, and in both cases --resume gives the
uninterrupted run's log and weights bit for bit; a NaN in the loss or in the gradients stops a run with exit code 1
and the last good state, or with --skip-nonfinite is skipped and counted; log-probs stay fp32 under bf16 autocast.

The faults are patched in from outside by tests/fault_driver.py (the scripts carry no test hooks): the killed runs
are real subprocesses of the driver; the NaN runs, the straight and the resumed runs run in-process (1 thread, as
the subprocesses), with the driver's patches applied through monkeypatch."""
import json
import os
import random
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

import fault_driver
from conftest import ONE_THREAD, ROOT, run_cli

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from nanoalign import hub, loop  # noqa: E402
from nanoalign.checkpoint import load_train_state  # noqa: E402
from nanoalign.cli import parse_cli  # noqa: E402
from nanoalign.logprobs import token_logprobs  # noqa: E402
from nanoalign.packing import pair_logprobs  # noqa: E402
from test_dpo import write_prefs  # noqa: E402
from test_ppo import write_prompts  # noqa: E402
from test_sft import write_sft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = {"sft": train_sft, "rm": train_rm, "dpo": train_dpo, "ppo": train_ppo}
STEPS, SAVE = 6, 2  # 6 steps, train_state.pt every 2
TIMING = ("elapsed_s", "tokens_per_s", "generate_s", "score_s", "train_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    write_sft(d / "sft.jsonl", n=12)
    write_prefs(d / "prefs.jsonl", n=12)
    write_prompts(d / "prompts.jsonl")
    return d


def flags(name, data, out, *extra):
    """Tiny runs that use every piece of resumable state: LoRA with dropout (the RNGs), warmup + decay (the step),
    Adam (the optimizer), and for PPO the adaptive KL controller and the value head."""
    common = ["--init", "tiny", "--out", str(out), "--device", "cpu", "--max-steps", str(STEPS), "--save-every",
              str(SAVE), "--log-every", "1", "--lora-rank", "4", "--lr", "1e-2"]
    pairs = ["--data", str(data / "prefs.jsonl"), "--batch-size", "2", "--warmup", "2", "--max-len", "128",
             "--lora-dropout", "0.2"]
    return common + {
        "sft": ["--data", str(data / "sft.jsonl"), "--batch-size", "2", "--warmup", "2", "--max-len", "128",
                "--lora-dropout", "0.2"],
        "rm": pairs,
        "dpo": pairs,
        "ppo": ["--prompts", str(data / "prompts.jsonl"), "--rollout-batch", "4", "--minibatch-size", "4",
                "--max-new-tokens", "8", "--ppo-epochs", "2", "--target-kl", "1", "--kl-horizon", "100",
                "--ptx-data", str(data / "sft.jsonl"), "--ptx-coef", "0.5", "--ptx-batch", "2"],  # PPO-ptx
    }[name] + list(extra)


def run_in_process(name, argv):
    mod = MODULES[name]
    return mod.main(parse_cli(mod.Config, argv))


def run_killed(name, argv, faults):
    """The real script in a subprocess of the fault driver."""
    return run_cli(["tests/fault_driver.py", faults, f"train_{name}.py", *argv], env=ONE_THREAD, timeout=180)


def log_rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_files(out):
    """Every weight file of the final checkpoint: merged model, adapter, and PPO's value head."""
    out = str(out)
    names = ["model.safetensors", "adapter/adapter_model.safetensors"]
    if os.path.exists(os.path.join(out, "value_head.safetensors")):
        names.append("value_head.safetensors")
    return {n: load_file(os.path.join(out, n)) for n in names}


@pytest.fixture(scope="module")
def straight(data):
    """The uninterrupted run of each script (computed once, shared by the crash tests)."""
    cache = {}

    def get(name):
        if name not in cache:
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            out = data / f"straight-{name}"
            run_in_process(name, flags(name, data, out))
            torch.set_num_threads(n)
            cache[name] = (log_rows(out), final_files(out))
        return cache[name]
    return get


def assert_same_run(out, reference):
    """Resumed == uninterrupted: each step logged exactly once with the same numbers, and the same final weights."""
    ref_rows, ref_files = reference
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step duplicated or missing
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bit for bit
    assert [strip(r) for r in rows] == [strip(r) for r in ref_rows]
    files = final_files(out)
    assert files.keys() == ref_files.keys()
    for n in files:
        assert files[n].keys() == ref_files[n].keys()
        assert all(torch.equal(files[n][k], ref_files[n][k]) for k in files[n]), n


@pytest.mark.parametrize("name", list(MODULES))
def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_state_and_resume_is_exact(name, data, straight):
    out = data / f"save-{name}"
    argv = flags(name, data, out)
    r = run_killed(name, argv, "crash-in-save=4")  # the save of step 4 dies half-way
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert load_train_state(str(out))["step"] == 2  # the previous state is intact and loads
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    tmps = [p for p in os.listdir(out) if ".tmp-" in p]
    # the kill really hit the write: the temporary holds half a state that does not load, under a name that no
    # reader looks at; nothing else is stray
    assert len(tmps) == 1 and tmps[0].startswith("train_state.pt.tmp-"), os.listdir(out)
    assert 0 < (out / tmps[0]).stat().st_size < (out / "train_state.pt").stat().st_size
    with pytest.raises(Exception):
        torch.load(out / tmps[0], weights_only=True)
    assert set(os.listdir(out)) == {"run.json", "log.jsonl", "train_state.pt", tmps[0]}
    assert [row["step"] for row in log_rows(out)] == [1, 2, 3, 4]  # logged before the save that died

    run_in_process(name, argv + ["--resume"])  # replays steps 3 and 4, then 5 and 6
    assert not any(".tmp-" in p for p in os.listdir(out))  # the resumed run cleared the dead temporary
    assert_same_run(out, straight(name))


@pytest.mark.parametrize("name", list(MODULES))
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(name, data, straight):
    kill = random.Random(f"kill-{name}").randint(3, STEPS)  # seeded: the same step on every run of the test
    out = data / f"kill-{name}"
    argv = flags(name, data, out)
    r = run_killed(name, argv, f"kill={kill}")
    assert r.returncode == -signal.SIGKILL, (kill, r.returncode, r.stderr[-2000:])
    saved = (kill - 1) // SAVE * SAVE
    assert load_train_state(str(out))["step"] == saved
    assert not (out / "model.safetensors").exists()
    # the steps before the kill were logged; those after the save are replayed by --resume, and logged once
    assert [row["step"] for row in log_rows(out)] == list(range(1, kill))
    run_in_process(name, argv + ["--resume"])
    assert_same_run(out, straight(name))


# --- NaN in the loss or in the gradients --------------------------------------------------------------------------
# (SFT's NaN loss is covered in test_sft.py and PPO's in test_ppo.py; here the rest)
NAN_CASES = [("rm", "loss"), ("dpo", "loss"), ("sft", "grad"), ("rm", "grad"), ("dpo", "grad"), ("ppo", "grad")]


def guarded(name, argv, monkeypatch, capsys):
    """The scripts' real entry point (main_guard) in-process: -> (exit code, stderr)."""
    mod = MODULES[name]
    monkeypatch.setattr(sys, "argv", [f"train_{name}.py", *argv])
    code = 0
    try:
        loop.main_guard(mod.main, mod.Config)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,where", NAN_CASES)
def test_nan_stops_with_exit_1_naming_the_step_and_keeps_the_last_good_state(name, where, tmp_path, data,
                                                                              monkeypatch, capsys):
    fault_driver.install(f"nan-{where}=3", monkeypatch.setattr)
    out = tmp_path / "o"
    code, err = guarded(name, flags(name, data, out), monkeypatch, capsys)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    what = "non-finite loss" if where == "loss" else "non-finite gradient norm"
    assert len(lines) == 1 and what in lines[0] and "at step 3" in lines[0] and "Traceback" not in err, err
    assert load_train_state(str(out))["step"] == 2  # the last good state
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    st = load_train_state(str(out))
    assert all(torch.isfinite(w).all() for w in st["weights"].values())


@pytest.mark.parametrize("name,where", NAN_CASES)
def test_skip_nonfinite_skips_counts_and_finishes(name, where, tmp_path, data, monkeypatch, capsys):
    fault_driver.install(f"nan-{where}=3", monkeypatch.setattr)
    out = tmp_path / "o"
    code, err = guarded(name, flags(name, data, out, "--skip-nonfinite"), monkeypatch, capsys)
    assert code == 0, err
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    metrics = json.loads((out / "metrics.json").read_text())
    # PPO counts skipped minibatches: step 3 has 2 epochs x 1 minibatch; the others count skipped steps
    n = 2 if name == "ppo" else 1
    assert metrics["skipped" if name == "ppo" else "skipped_steps"] == n
    assert [r["skipped"] for r in rows] == [0, 0, n, n, n, n]
    assert rows[2]["grad_norm"] != rows[2]["grad_norm"]  # NaN: no optimizer step was taken at step 3
    assert all(r["grad_norm"] == r["grad_norm"] for i, r in enumerate(rows) if i != 2)
    assert all(torch.isfinite(w).all() for f in final_files(out).values() for w in f.values())


# --- log-probs and rewards stay fp32 under bf16 autocast, in every script's forward path --------------------------
def test_script_forward_paths_keep_logprobs_fp32_under_bf16(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("hello there, how are you?")[:12]] * 2)
    att = torch.ones_like(ids)
    att[1, :3] = 0  # left padding in row 2
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1
    ref = token_logprobs(model, ids, att, mask)  # fp32 reference
    with torch.autocast("cpu", torch.bfloat16):
        lp = token_logprobs(model, ids, att, mask)
    assert lp.dtype == torch.float32 and (lp - ref).abs().max() < 0.2 and (lp - ref).abs().max() > 0  # bf16 trunk

    batch = {"input_ids": ids, "attention_mask": att, "loss_mask": mask, "response_mask": mask}
    loss = train_sft.batch_loss(model, batch, mask[:, 1:].sum(), train_sft.Config(bf16=True), "cpu")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, -lp.sum() / mask[:, 1:].sum())  # the same bf16 trunk, the same fp32 sum
    with loop.autocast(True, "cpu"):  # DPO's path: (chosen, rejected) = rows 0, 1
        chosen, rejected = pair_logprobs(model, batch)
    assert chosen.dtype == rejected.dtype == torch.float32
    torch.testing.assert_close(torch.cat([chosen, rejected]), lp.sum(-1))

    rm, _ = hub.load("tiny")
    rm.add_score_head()
    chosen, rejected = train_rm.rewards_of(rm, batch, "cpu", bf16=True)
    fp32 = torch.cat(train_rm.rewards_of(rm, batch, "cpu"))
    assert chosen.dtype == torch.float32 and 0 < (torch.cat([chosen, rejected]) - fp32).abs().max() < 0.1

    head = torch.nn.Linear(model.cfg.hidden_size, 1)
    P = 6
    x = train_ppo.Samples(ids, att, mask[:, P:], P)
    logprobs, values, _ = train_ppo.forward(model, head, x, 0.7, bf16=True)
    assert logprobs.dtype == torch.float32 and values.dtype == torch.float32
    fp32, _, _ = train_ppo.forward(model, head, x, 0.7, bf16=False)
    assert 0 < (logprobs - fp32).abs().max() < 0.5  # bf16 trunk, fp32 log-probs of it
