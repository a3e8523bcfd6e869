"""train_rm.py on the tiny random model: the Bradley-Terry RM learns a separable preference and generalises, the
reward is read at the last real token (padding cannot move it), the saved RM is an HF
LlamaForSequenceClassification that transformers scores identically, and --center-rewards centres the rewards."""
import json
import os
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, assert_user_error, run_cli

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_rm  # noqa: E402
from nanoalign import hub  # noqa: E402
from nanoalign.data import read_prefs  # noqa: E402
from nanoalign.packing import collate_shared  # noqa: E402
from nanoalign.data import collate_pairs, tokenize_prefs  # noqa: E402
from test_dpo import EVAL_TOPICS, write_prefs  # noqa: E402  (the same separable yes/no toy set)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(tmp, name, **kw):
    base = dict(init="tiny", data=str(tmp / "prefs.jsonl"), out=str(tmp / name), max_steps=20, batch_size=8, lr=3e-3,
                warmup=0, max_len=128, log_every=5, lora_rank=4, lora_alpha=8.0, device="cpu")
    return train_rm.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LoRA RM run shared by the tests below: (tmp dir, metrics)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("rm")
    write_prefs(tmp / "prefs.jsonl", n=32)
    ev = write_prefs(tmp / "eval.jsonl", n=12, topics=EVAL_TOPICS, seed=1)
    m = train_rm.main(cfg(tmp, "rm", eval_data=ev))
    torch.set_num_threads(n)
    return tmp, m


def test_rm_reaches_high_accuracy_on_held_out_pairs(trained):
    tmp, m = trained
    assert m["eval_accuracy"] >= 0.9, m
    assert m["eval_margin"] > 1.0 and m["loss"] < m["first_loss"]
    with open(tmp / "rm" / "log.jsonl") as f:
        rows = [json.loads(l) for l in f]
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20]
    assert {"loss", "accuracy", "margin", "reward_mean", "reward_std", "eval_accuracy"} <= set(rows[-1])
    assert json.loads((tmp / "rm" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert json.loads((tmp / "rm" / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


def test_reward_is_read_at_the_last_real_token(trained):
    tmp, _ = trained
    model, tok = hub.load(str(tmp / "rm"))
    model.eval()
    ex = tokenize_prefs(tok, read_prefs(str(tmp / "eval.jsonl")), 128)[:4]
    with torch.no_grad():
        base = torch.cat(train_rm.rewards_of(model, collate_pairs(ex, tok.pad_id, 128), "cpu"))  # (8,)
        padded = torch.cat(train_rm.rewards_of(model, collate_pairs(ex, tok.pad_id, 128, multiple_of=100), "cpu"))
        shared = torch.cat(train_rm.rewards_of(model, collate_shared(ex, tok.pad_id, 128, multiple_of=100), "cpu"))
        # by hand: the score head on the hidden state of the response's final <|im_end|>, one unpadded row at a time
        manual = []
        for part in ("chosen", "rejected"):
            for e in ex:
                ids = torch.tensor([e["prompt"] + e[part]])
                assert ids[0, -1] == tok.eos_id
                manual.append(model.score(model(ids, return_hidden=True)[0, -1]).item())
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(base, torch.tensor(manual), atol=1e-5, rtol=0)


def test_saved_rm_loads_in_transformers_with_the_same_scores(trained):
    transformers = pytest.importorskip("transformers")
    tmp, _ = trained
    out = str(tmp / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    model, tok = hub.load(out)
    ex = tokenize_prefs(tok, read_prefs(str(tmp / "eval.jsonl")), 128)[:3]
    with torch.no_grad():
        for e in ex:
            ours = train_rm.rewards_of(model.eval(), collate_shared([e], tok.pad_id, 128), "cpu")  # (chosen, rejected)
            for part, r in zip(("chosen", "rejected"), ours):
                ids = torch.tensor([e["prompt"] + e[part]])  # unpadded: HF finds the last token via pad_token_id
                assert float(hf(input_ids=ids).logits[0, 0]) == pytest.approx(float(r[0]), abs=1e-4)


def test_center_rewards_pulls_the_mean_reward_toward_zero(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=32)
    ev = write_prefs(tmp_path / "eval.jsonl", n=12, topics=EVAL_TOPICS, seed=1)
    plain = train_rm.main(cfg(tmp_path, "plain", eval_data=ev))
    centred = train_rm.main(cfg(tmp_path, "centred", eval_data=ev, center_rewards=0.1))
    assert abs(plain["eval_reward_mean"]) > 0.5, plain  # BT alone leaves the offset free; it drifted
    assert abs(centred["eval_reward_mean"]) < 0.1 * abs(plain["eval_reward_mean"]), (plain, centred)
    assert centred["eval_accuracy"] >= 0.9  # and still ranks the pairs


def test_first_loss_is_the_margin_and_centering_loss_of_the_initial_rewards(tmp_path):
    """--margin m and --center-rewards λ, by hand: step 1's loss is the mean over the pairs of
    −log σ(r_c − r_r − m) + λ·(r_c + r_r)², with the rewards of the initial model (the SFT model + a seed-0 head)."""
    data = write_prefs(tmp_path / "prefs.jsonl", n=8)
    m = train_rm.main(cfg(tmp_path, "o", max_steps=1, batch_size=8, lora_rank=0, margin=3.0, center_rewards=0.05))
    model, tok = hub.load("tiny")
    model.add_score_head(seed=0)
    with torch.no_grad():
        chosen, rejected = train_rm.rewards_of(model, collate_pairs(tokenize_prefs(tok, read_prefs(data), 128),
                                                                    tok.pad_id, 128), "cpu")
    by_hand = (-torch.nn.functional.logsigmoid(chosen - rejected - 3.0) + 0.05 * (chosen + rejected) ** 2).mean()
    assert m["first_loss"] == pytest.approx(float(by_hand), abs=1e-5)
    plain = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert abs(float(by_hand) - float(plain)) > 1.0  # the two flags really move it


def test_prompts_only_file_is_one_error_line_and_exit_2(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    r = run_cli(["train_rm.py", "--init", "tiny", "--data", str(p), "--out", str(tmp_path / "o")], env=ONE_THREAD)
    assert_user_error(r, "prompts.jsonl:1", "missing field 'chosen'")
