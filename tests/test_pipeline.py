"""The `make demo` pipeline on a tiny model: SFT -> RM -> DPO -> PPO, each stage initialised from the SFT
checkpoint as in the Makefile, and each stage's own metric must move the right way; and `make iterate`'s rounds."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ONE_THREAD, ROOT

sys.path.insert(0, ROOT)
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from nanoalign import hub  # noqa: E402
from nanoalign.cli import parse_cli  # noqa: E402
from test_dpo import EVAL_TOPICS, write_prefs  # noqa: E402
from test_ppo import write_prompts  # noqa: E402
from test_sft import write_sft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_rm_dpo_ppo_pipeline_on_a_tiny_model(tmp_path):
    common = dict(device="cpu", warmup=0, max_len=128, log_every=5)
    # 1. SFT from the random tiny preset (full fine-tune): the training loss falls, and the checkpoint reloads
    sft = train_sft.main(train_sft.Config(init="tiny", data=write_sft(tmp_path / "sft.jsonl", n=32),
                                          out=str(tmp_path / "sft"), max_steps=20, batch_size=8, lr=3e-3,
                                          lora_dropout=0.0, **common))
    assert sft["loss"] < sft["first_loss"] - 0.5, sft
    model, _ = hub.load(str(tmp_path / "sft"))
    assert model.score is None

    # 2. reward model from the SFT checkpoint: held-out pair accuracy well above chance
    prefs = write_prefs(tmp_path / "prefs.jsonl", n=32)
    held_out = write_prefs(tmp_path / "eval_prefs.jsonl", n=12, topics=EVAL_TOPICS, seed=1)
    rm = train_rm.main(train_rm.Config(init=str(tmp_path / "sft"), data=prefs, eval_data=held_out,
                                       out=str(tmp_path / "rm"), max_steps=20, batch_size=8, lr=3e-3, lora_rank=4,
                                       lora_alpha=8.0, **common))
    assert rm["eval_accuracy"] >= 0.9 and rm["loss"] < rm["first_loss"], rm

    # 3. DPO from the SFT checkpoint (reference = SFT with the adapter off): held-out implicit-reward accuracy and
    #    margin rise from their step-0 values (0.5-ish and 0: policy == reference)
    dpo = train_dpo.main(train_dpo.Config(init=str(tmp_path / "sft"), data=prefs, eval_data=held_out,
                                          out=str(tmp_path / "dpo"), max_steps=12, batch_size=4, lr=1e-2,
                                          lora_rank=4, lora_alpha=8.0, **common))
    assert dpo["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2 at step 0
    assert dpo["eval_accuracy"] >= 0.75 and dpo["eval_margin"] > 0, dpo

    # 4. PPO from the SFT checkpoint with the gold judge as the reward (lowercase, no commas): the score rises
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    cfg = parse_cli(train_ppo.Config, ["--init", str(tmp_path / "sft"), "--prompts", prompts, "--reward", "gold",
                                       "--out", str(tmp_path / "ppo"), "--device", "cpu", "--max-new-tokens", "16",
                                       "--lr", "1e-2", "--kl-coef", "0.01", "--missing-eos-penalty", "0",
                                       "--rollout-batch", "32", "--minibatch-size", "16", "--max-steps", "12"])
    train_ppo.main(cfg)
    with open(tmp_path / "ppo" / "log.jsonl") as f:
        scores = [json.loads(line)["score"] for line in f]
    assert sum(scores[-3:]) / 3 >= sum(scores[:2]) / 2 + 0.15, scores


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_iterate_chains_rounds_of_sampling_judging_and_dpo(tmp_path, rm_dir):
    """`make iterate` on the tiny model: 2 rounds of k=2 samples -> RM judge -> best-vs-worst pairs -> 2 DPO steps,
    each round from the last round's policy, then every round evaluated on the paraphrase split with KL to BASE."""
    from nanoalign import evaluate, tasks
    tasks.make(str(tmp_path / "data"), seed=0, n_sft=0, n_prefs=0, n_prompts=6, n_eval=4)
    out = tmp_path / "it"
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "iterate", f"BIN={os.path.dirname(sys.executable)}",
                        "BASE=tiny", f"PROMPTS={tmp_path / 'data' / 'prompts.jsonl'}", f"OUT={out}", "K=2",
                        f"JUDGE={rm_dir}", "ROUNDS=2", "ROUND_STEPS=2", "PER_ROUND=3", "PAIRS_ARGS=--max-new-tokens 8",
                        "DPO_ARGS=--lora-rank 4 --lora-alpha 8 --lr 1e-2 --batch-size 2 --warmup 0 --max-len 512 "
                        "--device cpu", "EVAL_ARGS=--limit 4 --max-new-tokens 8"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for n, init in ((1, "tiny"), (2, str(out / "round1"))):  # each round starts from, and is anchored to, the last
        run = json.loads((out / f"round{n}" / "run.json").read_text())
        assert run["init"] == init and run["data"] == str(out / f"pairs{n}.jsonl")
        metrics = json.loads((out / f"round{n}" / "metrics.json").read_text())
        assert metrics["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # π == π_ref at step 0: ln 2
    # round 2's pairs are the RM's best and worst of round 1's samples (seed 2, at ROUND_T = 0.7) on the next 3
    # prompts, not of the starting policy's
    every = [json.loads(line) for line in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines()]
    prompts = every[3:6]
    first = {json.loads(line)["prompt"] for line in (out / "pairs1.jsonl").read_text().splitlines()}
    assert first and first <= {p["prompt"] for p in every[:3]}  # round 1 had the first 3
    drawn = {}
    for name in (str(out / "round1"), "tiny"):
        model, tok = hub.load(name)
        drawn[name] = [s[2] for s in evaluate.sample(model.eval(), tok, [p["prompt"] for p in prompts], 2, 0.7, 8, 2)]
    assert drawn[str(out / "round1")] != drawn["tiny"]  # the first round moved the policy
    pairs = [json.loads(line) for line in (out / "pairs2.jsonl").read_text().splitlines()]
    rm, tok = hub.load(str(rm_dir))
    for p in pairs:
        i = next(i for i, q in enumerate(prompts) if q["prompt"] == p["prompt"])
        assert {p["chosen"], p["rejected"]} <= set(drawn[str(out / "round1")][2 * i:2 * i + 2])
        assert evaluate.rm_scores(rm.eval(), tok, [p["prompt"]], [p["chosen"]])[0] > p["rejected_score"]
    res = json.loads((out / "results.json").read_text())
    paraphrase = {json.loads(line)["prompt"] for line in open(tmp_path / "data" / "paraphrase.jsonl")}
    assert list(res) == ["round0", "round1", "round2"] and res["round0"]["kl"] == 0.0  # round0 is BASE itself
    for name in ("round1", "round2"):
        assert res[name]["n"] == 4 and res[name]["kl"] != 0.0 and "unrequested_rate" in res[name]
        assert res[name]["examples"][0]["prompt"] in paraphrase


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_demo_online_adds_one_counterfactual_round_from_the_dpo_to_the_table():
    """`make demo ONLINE=1`, dry-run: one `make iterate` round from the demo's DPO, on its PPO prompts, with
    counterfactual pairs and 30 steps, no evaluation of its own, and its policy a row of the demo's table. The round's
    make does not set up the venv again: `-o` (the demo's own prerequisite, already made) does not reach a sub-make."""
    venv = "/nonexistent-venv"  # a stamp that is never up to date, unless -o says so
    dry = lambda *args: subprocess.run(["make", "-n", "-o", f"{venv}/.installed", "demo", f"VENV={venv}", "BIN=bin",
                                        *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    plain, online = dry(), dry("ONLINE=1")
    assert plain.returncode == online.returncode == 0, online.stderr
    assert "online" not in plain.stdout and "pip install" not in online.stdout
    text = online.stdout.replace("\\\n", " ")
    assert "policy=out/demo/dpo;" in text and "for r in $(seq 1);" in text
    assert re.search(r"nanoalign\.tasks pairs --model \$policy [^;]* --counterfactuals;", text)
    assert "$(( r * 96 ))p\" out/demo/data/prompts.jsonl > out/demo/online/prompts$r.jsonl" in text  # 96 prompts
    assert re.search(r"train_dpo.py --init \$policy [^;]*--out out/demo/online/round\$r\s+--max-steps 30 ", text)
    evaluations = [line for line in text.splitlines() if "nanoalign.evaluate" in line]
    assert len(evaluations) == 1 and "online=out/demo/online/round1" in evaluations[0]  # the demo's, not the round's


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_onpolicy_rm_trains_on_off_policy_and_sampled_pairs_then_probes(tmp_path, rm_dir):
    """`make onpolicy-rm` on a tiny "SFT": every non-tied pair of its own samples on ON_PROMPTS prompts (judged by
    the tiny RM here: the gold judge ties every 8-token sample), one pass of an RM over the first ON_OFF off-policy
    pairs and those, then its accuracy on the eval split's on-policy pairs."""
    from nanoalign import evaluate, tasks
    from nanoalign.checkpoint import save_checkpoint
    from nanoalign.data import read_prefs
    demo = tmp_path / "demo"
    tasks.make(str(demo / "data"), seed=0, n_sft=0, n_prefs=6, n_prompts=4, n_eval=3)
    model, tok = hub.load("tiny")
    save_checkpoint(str(demo / "sft"), model, tok)
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "onpolicy-rm", f"BIN={os.path.dirname(sys.executable)}",
                        f"DEMO={demo}", "ON_PROMPTS=6", "ON_OFF=3", "N_EVAL=3",
                        f"PAIRS_ARGS=--max-new-tokens 8 --judge {rm_dir}", "RM_ARGS=--lora-rank 4 --lora-alpha 8 "
                        "--batch-size 2 --warmup 0 --max-len 512 --device cpu"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = lambda p: p.read_text().splitlines()
    on = demo / "onpolicy_data"
    assert lines(on / "prompts.jsonl")[:4] == lines(demo / "data" / "prompts.jsonl")  # the demo's prompts, then more
    pairs = [json.loads(x) for x in lines(on / "pairs.jsonl")]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert {p["prompt"] for p in pairs} <= {json.loads(x)["prompt"] for x in lines(on / "prompts.jsonl")}
    assert len(pairs) > len({p["prompt"] for p in pairs})  # all pairs: more than best vs worst's one a prompt
    mix = lines(on / "mix.jsonl")
    assert mix == lines(demo / "data" / "prefs.jsonl")[:3] + lines(on / "pairs.jsonl")
    run = json.loads((demo / "rm_onpolicy" / "run.json").read_text())
    assert run["init"] == str(demo / "sft") and run["data"] == str(on / "mix.jsonl")
    assert run["lr"] == 3e-4
    assert json.loads((demo / "rm_onpolicy" / "metrics.json").read_text())["steps"] == len(mix) // 4  # one pass
    rm, tok = evaluate.load_rm(str(demo / "rm_onpolicy"))
    probe = json.loads((demo / "probe_onpolicy.json").read_text())
    assert probe["pairs"] == evaluate.rm_accuracy(rm, tok, read_prefs(str(demo / "onpolicy_pairs.jsonl")))
