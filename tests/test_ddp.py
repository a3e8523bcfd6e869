"""Data parallel under `torchrun --nproc_per_node=2` (gloo, CPU): train_rm.py and train_ppo.py take the same steps as one
process with the same global batch (SFT and DPO have theirs in test_sft.py / test_dpo.py), only rank 0 writes, and
a rank killed mid-run ends the whole job quickly with a non-zero exit instead of a hang."""
import dataclasses
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD, ROOT, run_cli

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_ppo  # noqa: E402
from nanoalign.packing import local_rows  # noqa: E402
import train_rm  # noqa: E402
from nanoalign import hub, loop  # noqa: E402
from nanoalign.checkpoint import load_train_state  # noqa: E402
from nanoalign.cli import parse_cli  # noqa: E402
from test_dpo import write_prefs  # noqa: E402
from test_ppo import write_prompts  # noqa: E402
from test_sft import write_sft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def log_rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def two_processes(script, argv, env=None, timeout=300):
    return run_cli([*TORCHRUN, script, *argv], env={**ONE_THREAD, **(env or {})}, timeout=timeout)


def test_rm_two_processes_match_one_process_and_only_rank_0_writes(tmp_path):
    """Pairs sharded by rank, the loss normalised by the GLOBAL pair count, gradients summed over ranks."""
    data = write_prefs(tmp_path / "prefs.jsonl", n=8)
    common = ["--init", "tiny", "--data", data, "--device", "cpu", "--max-steps", "3", "--lr", "3e-3", "--warmup",
              "0", "--max-len", "128", "--log-every", "1", "--save-every", "2", "--lora-rank", "4", "--lora-dropout",
              "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_rm.main(parse_cli(train_rm.Config, [*common, "--out", str(one), "--batch-size", "4"]))
    r = two_processes("train_rm.py", [*common, "--out", str(two), "--batch-size", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = log_rows(one), log_rows(two)
    assert [row["step"] for row in b] == [1, 2, 3]  # one row per step: rank 1 logs nothing
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and x["accuracy"] == y["accuracy"], (x, y)
        for key in ("margin", "reward_mean", "reward_std", "grad_norm"):  # rewards of O(1): summation noise ~1e-5
            assert abs(x[key] - y[key]) <= 1e-4, (key, x, y)
    # only rank 0 writes: the 2-process directory holds exactly what the 1-process one does, no temporaries
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert load_train_state(str(two))["step"] == 2
    w1, w2 = hub.load(str(one))[0].state_dict(), hub.load(str(two))[0].state_dict()
    for k in w1:  # Adam's normalised steps turn summation-order noise in the losses into ~1e-5 on the weights
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=0)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_two_processes_match_one_process(tmp_path, estimator):
    """Three iterations at T = 0.7, 2 epochs x 2 minibatches: every logged metric within 1e-5, and the weights.
    Exact by construction: the sampling uniforms and the minibatch shuffles are drawn for the global batch, the
    whitening moments (advantages and, with gae here, rewards) are summed over ranks, and every loss and metric is a
    share of a global token or response mean. Minibatches of 2 out of 4 responses often sit wholly on one rank, so
    the other's share is empty; the responses end at different lengths (EOS), so the ranks' token counts differ."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    common = ["--init", "tiny", "--prompts", prompts, "--device", "cpu", "--reward", "gold", "--max-steps", "3",
              "--rollout-batch", "4", "--minibatch-size", "2", "--ppo-epochs", "2", "--max-new-tokens", "8",
              "--temperature", "0.7", "--lr", "1e-2", "--log-every", "1", "--estimator", estimator]
    if estimator == "gae":  # + PPO-ptx: 2 demonstration rows per update, one per rank, of different lengths
        common += ["--whiten-rewards", "--entropy-coef", "0.01", "--ptx-coef", "0.5", "--ptx-batch", "2",
                   "--ptx-data", write_sft(tmp_path / "sft.jsonl")]
    else:  # GRPO: the k samples of a prompt stay on one rank; + the k3 KL term in the loss
        common += ["--samples-per-prompt", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_ppo.main(parse_cli(train_ppo.Config, [*common, "--out", str(one)]))
    r = two_processes("train_ppo.py", [*common, "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = log_rows(one), log_rows(two)
    assert [row["step"] for row in b] == [1, 2, 3]  # rank 1 logs nothing
    timing = ("elapsed_s", "generate_s", "score_s", "train_s", "tokens_per_s")
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x.keys() - set(timing):
            assert abs(x[key] - y[key]) <= 1e-5, (key, x, y)
    assert a[1]["kl"] > 0.1 and a[-1]["ratio"] != 1 and min(row["grad_norm"] for row in a) > 0.01  # real updates
    assert len({row["resp_len"] for row in a}) > 1  # the sampled lengths vary: T = 0.7 is real sampling
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 0 alone wrote (value_head.safetensors too)
    for name in ("model.safetensors", "value_head.safetensors") if estimator == "gae" else ("model.safetensors",):
        w1, w2 = load_file(str(one / name)), load_file(str(two / name))
        for k in w1:  # Adam's normalised steps turn summation-order noise into ~1e-6 on the weights
            torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=0)


def test_local_rows_pick_this_ranks_rows_of_a_global_minibatch():
    """The global batch is k rows per prompt, prompts dealt out by loop.shard; local_rows maps global rows to the
    rank's own rows, in the order given, and the ranks' picks partition the minibatch."""
    k, world, prompts = 2, 3, 6
    rows = [(p, j) for p in range(prompts) for j in range(k)]  # global row -> (prompt, sample)
    mine = [[(p, j) for p in loop.shard(list(range(prompts)), r, world) for j in range(k)] for r in range(world)]
    minibatch = torch.tensor([7, 0, 11, 4, 5])
    picked = [[mine[r][i] for i in local_rows(minibatch, k, r, world).tolist()] for r in range(world)]
    assert picked == [[rows[7], rows[0]], [], [rows[11], rows[4], rows[5]]]
    assert local_rows(minibatch, k, 0, 1).tolist() == minibatch.tolist()  # one process: all of them


def test_killed_rank_ends_the_job_with_a_message(tmp_path):
    """Rank 1 is SIGKILLed in step 2 (tests/fault_driver.py is each rank's entry point). Rank 0's next collective
    fails (gloo sees the closed connection; a hung peer would hit the 20 s timeout) and torchrun stops the job and
    names the rank that died: it ends well inside run_cli's timeout instead of hanging."""
    data = write_sft(tmp_path / "sft.jsonl", n=8)
    out = tmp_path / "o"
    r = two_processes("tests/fault_driver.py", ["kill=2@1,dist-timeout=20", "train_sft.py", "--init", "tiny", "--data",
                                                 data, "--out", str(out), "--device", "cpu", "--max-steps", "6",
                                                 "--batch-size", "2", "--log-every", "1", "--save-every", "1"],
                      timeout=120)
    assert r.returncode != 0
    assert "SIGKILL" in r.stderr and "rank      : 1" in r.stderr, r.stderr[-3000:]  # torchrun's root cause
    assert not (out / "model.safetensors").exists()
    assert load_train_state(str(out))["step"] == 1  # the last state saved before the kill is intact
    # rank 0 may log step 2 (its own half) before its next collective fails, unless torchrun stopped it first
    assert [row["step"] for row in log_rows(out)] in ([1], [1, 2])


def test_a_failed_process_group_is_one_error_line_and_exit_1(capsys, monkeypatch):
    """What rank 0 prints when its peer is gone and torchrun has not stopped it yet: one line, no gloo traceback."""
    @dataclasses.dataclass
    class Flags:
        x: int = 0

    def main(cfg):
        raise torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:29500\nmore detail")

    monkeypatch.setattr(sys, "argv", ["train_x.py", "--x", "1"])
    with pytest.raises(SystemExit) as e:
        loop.main_guard(main, Flags)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank 0: the process group failed (Connection closed by peer")
    assert "--resume" in err[0]
