"""The `make demo` pipeline on a tiny model: SFT -> RM -> DPO -> PPO, each stage initialised from the SFT
checkpoint as in the Makefile, and each stage's own metric must move the right way."""
import json
import sys

import pytest
from conftest import ROOT

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
