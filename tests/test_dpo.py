"""train_dpo.py on the tiny random model: every --loss starts at its hand-worked value (DPO at ln 2) and learns a
separable preference, DPO generalises to held-out prompts, the prompt-shared and two-row layouts train alike, grad
accumulation and DDP equal one big batch, resume is bit-exact, --precompute-ref equals the live reference, and bad
input is one error line. Plus the preference tokenization and collation (the shared layout: tests/test_packing.py)."""
import dataclasses
import json
import math
import os
import random
import sys

import pytest
import torch

from conftest import ONE_THREAD, ROOT, assert_user_error, run_cli

sys.path.insert(0, ROOT)
import fault_driver  # noqa: E402
import train_dpo  # noqa: E402
from nanoalign import hub  # noqa: E402
from nanoalign.cli import UserError  # noqa: E402
from nanoalign.data import read_prefs  # noqa: E402
from nanoalign.loop import TrainingError  # noqa: E402
from nanoalign.lora import apply_lora  # noqa: E402
from nanoalign.packing import collate_shared  # noqa: E402
from nanoalign.data import collate_pairs, collate_unpaired, read_kto, tokenize_prefs  # noqa: E402
from nanoalign.tokenizer import byte_tokenizer  # noqa: E402


TRAIN_TOPICS = ["cats", "dogs", "rain", "tea", "maps", "bikes", "songs", "trees"]
EVAL_TOPICS = ["stars", "bread", "clocks", "boats"]  # disjoint: held-out prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def write_prefs(path, n=16, topics=TRAIN_TOPICS, seed=0):
    """A separable toy set: chosen answers say yes (in several ways), rejected ones say no; lengths vary."""
    rng = random.Random(seed)
    yes, no = ["yes, gladly", "yes", "yes of course, always"], ["no", "no, never", "nope, no way at all"]
    with open(path, "w") as f:
        for i in range(n):
            t = rng.choice(topics)
            row = {"prompt": f"Do you like {t}?" + " please" * (i % 3), "chosen": rng.choice(yes) + f" {t}",
                   "rejected": rng.choice(no) + f" {t}"}
            f.write(json.dumps(row) + "\n")
    return str(path)


def cfg(tmp_path, name, **kw):
    base = dict(init="tiny", data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / name), max_steps=4, batch_size=4,
                lr=1e-2, warmup=0, max_len=128, log_every=1, lora_rank=4, lora_alpha=8.0, device="cpu")
    return train_dpo.Config(**{**base, **kw})


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def weights(out):
    model, _ = hub.load(out)
    return model.state_dict()


# --- collation --------------------------------------------------------------------------------------------------
def test_collate_pairs_chosen_first_masks_by_position_and_ends_with_eos(tmp_path):
    tok = byte_tokenizer()
    rows = read_prefs(write_prefs(tmp_path / "p.jsonl", n=3))
    ex = tokenize_prefs(tok, rows, 128)
    b = collate_pairs(ex, tok.pad_id, 128)
    B = len(ex)
    assert b["input_ids"].shape[0] == 2 * B
    for i, e in enumerate(ex):
        for row, resp in ((i, e["chosen"]), (B + i, e["rejected"])):
            n = len(e["prompt"]) + len(resp)
            assert b["input_ids"][row, :n].tolist() == e["prompt"] + resp
            assert b["attention_mask"][row].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert b["response_mask"][row].tolist() == [0] * len(e["prompt"]) + [1] * len(resp) + [0] * (
                b["input_ids"].shape[1] - n)
            assert resp[-1] == tok.eos_id  # the response ends with <|im_end|> (not the template's "\n")
    assert tok.decode(ex[0]["chosen"]) == rows[0]["chosen"][0]["content"]
    # the rendered prompt + response is exactly the rendered conversation, minus the trailing "\n"
    ids, _ = tok.render_chat(rows[0]["prompt"] + rows[0]["chosen"])
    assert ex[0]["prompt"] + ex[0]["chosen"] == ids[:-1]


def test_unusable_rows_are_dropped_and_none_left_is_an_error(tmp_path, capsys):
    tok = byte_tokenizer()
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hi", "chosen": "same", "rejected": "same"},
        {"prompt": "x" * 200, "chosen": "a", "rejected": "b"},
        {"prompt": "ok", "chosen": "a", "rejected": "b"}]) + "\n")
    ex = tokenize_prefs(tok, read_prefs(str(p)), 64, str(p))
    assert [e["line"] for e in ex] == [3]
    err = capsys.readouterr().err
    assert "1 with a prompt longer than --max-len 64" in err and "1 with chosen == rejected" in err
    with pytest.raises(Exception, match="no usable rows"):
        tokenize_prefs(tok, read_prefs(str(p))[:2], 64, str(p))


def test_long_rows_keep_the_prompt_and_lose_the_response_tail(tmp_path):
    tok = byte_tokenizer()
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "chosen": "a" * 100, "rejected": "b"}) + "\n")
    ex = tokenize_prefs(tok, read_prefs(str(p)), 40)
    b = collate_pairs(ex, tok.pad_id, 40)
    assert b["input_ids"].shape[1] == 40
    assert b["response_mask"][0].sum() == 40 - len(ex[0]["prompt"])


def test_kto_rows_from_pairs_and_the_mismatched_batch_pairs_prompt_i_with_completion_i_plus_1(tmp_path):
    tok = byte_tokenizer()
    pairs = read_prefs(write_prefs(tmp_path / "p.jsonl", n=2))
    rows = read_kto(str(tmp_path / "p.jsonl"))  # each pair -> its chosen (label true), then its rejected
    assert [(r["completion"], r["label"]) for r in rows] == [(pairs[0]["chosen"], True), (pairs[0]["rejected"], False),
                                                            (pairs[1]["chosen"], True), (pairs[1]["rejected"], False)]
    ex = tokenize_prefs(tok, rows, 128)
    b = collate_unpaired(ex, tok.pad_id, 128)
    assert b["labels"].tolist() == [True, False, True, False]
    for i, e in enumerate(ex):
        nxt = ex[(i + 1) % len(ex)]["completion"]
        n = len(e["prompt"]) + len(nxt)
        assert b["kl_input_ids"][i, :n].tolist() == e["prompt"] + nxt
        assert b["kl_response_mask"][i].sum() == len(nxt)


# --- the losses on the real model --------------------------------------------------------------------------------
def naive_logps(model, ex, tok):
    """(chosen, rejected) summed and per-token-average log-probs, each (B,), from the full (B, T, V) logits of each
    pair's two rows: an independent path to what packing.pair_logprobs computes."""
    b = collate_pairs(ex, tok.pad_id, 128)
    ids, resp = b["input_ids"], b["response_mask"][:, 1:]
    with torch.no_grad():
        lp = model(ids, b["attention_mask"])[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    sums, n = (lp * resp).sum(-1), resp.sum(-1)
    return sums.chunk(2), (sums / n).chunk(2)


def test_dpo_loss_is_ln2_for_every_pair_when_policy_equals_reference(tmp_path):
    model, tok = hub.load("tiny")
    apply_lora(model, 4, 8.0)  # a fresh adapter (B = 0): the policy IS the reference
    ex = tokenize_prefs(tok, read_prefs(write_prefs(tmp_path / "prefs.jsonl", n=5)), 128)
    for collate in (collate_shared, collate_pairs):
        batch = collate(ex, tok.pad_id, 128)
        losses, chosen, rejected = train_dpo.pair_losses(model, model, batch, ex, cfg(tmp_path, "x"))
        assert torch.allclose(losses, torch.full((5,), math.log(2)), atol=1e-6)
        assert chosen.abs().max() < 1e-6 and rejected.abs().max() < 1e-6
    # RPO: + α times the chosen response's token-average NLL, here from the full logits
    _, (chosen_avg, _) = naive_logps(model, ex, tok)
    rpo, _, _ = train_dpo.pair_losses(model, model, batch, ex, cfg(tmp_path, "x", rpo_alpha=0.5))
    torch.testing.assert_close(rpo.double(), math.log(2) - 0.5 * chosen_avg, atol=1e-5, rtol=0)


def expected_first_loss(loss, c):
    """The mean loss of the first step, worked by hand: the policy still equals π_ref (a fresh adapter), so every
    log-ratio is 0; the reference-free simpo and orpo need the (independently computed) average log-probs."""
    model, tok = hub.load("tiny")
    _, (chosen, rejected) = naive_logps(model, tokenize_prefs(tok, read_prefs(c.data), 128), tok)
    if loss == "simpo":  # −log σ(β·(avg_w − avg_l) − γ)
        return float(-torch.nn.functional.logsigmoid(c.beta * (chosen - rejected) - c.simpo_gamma).mean())
    if loss == "orpo":  # NLL(y_w) − λ·log σ(log odds_w − log odds_l), odds = p / (1 − p)
        odds = [x - torch.log(-torch.expm1(x)) for x in (chosen, rejected)]
        return float((-chosen - c.orpo_lambda * torch.nn.functional.logsigmoid(odds[0] - odds[1])).mean())
    # h = 0: DPO, cDPO and robust DPO are ln 2 for any ε; IPO is (0 − 1/(2β))²; KTO is 1 − σ(0), as z0 = 0
    return {"ipo": (1 / (2 * c.beta)) ** 2, "kto": 0.5}.get(loss, math.log(2))


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("cdpo", {"label_smoothing": 0.1}),
                                        ("robust", {"label_smoothing": 0.2}), ("ipo", {"beta": 0.5}),
                                        ("simpo", {"beta": 2.0}), ("orpo", {}), ("kto", {"batch_size": 16})])
def test_every_loss_starts_at_its_hand_worked_value_and_learns_the_preference(tmp_path, loss, extra):
    write_prefs(tmp_path / "prefs.jsonl", n=8)  # the global batch is the whole set: every step sees the same rows
    c = cfg(tmp_path, loss, loss=loss, max_steps=8, **{"batch_size": 8, **extra})
    m = train_dpo.main(c)
    steps = log(c.out)
    assert steps[1]["loss"] == pytest.approx(expected_first_loss(loss, c), abs=1e-5)
    # every variant ends up ranking each chosen response above its rejected one (kto, whose rows are unpaired and
    # measured against z0: most rewards of the label's sign), from a tie (0) or, reference-free, from chance
    assert steps[8]["accuracy"] >= (0.75 if loss == "kto" else 1.0) > steps[1]["accuracy"], (loss, steps[8])
    assert steps[8]["margin"] > steps[1]["margin"], (loss, steps[8])
    assert m["train_examples"] == (16 if loss == "kto" else 8)  # kto: each pair is two unpaired rows


def test_kto_reads_unpaired_rows(tmp_path):
    p = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)} for i in range(8)]
    p.write_text("\n".join(map(json.dumps, rows)) + "\n")
    m = train_dpo.main(cfg(tmp_path, "k", data=str(p), loss="kto", batch_size=8, max_steps=4))
    assert m["train_examples"] == 8 and m["first_loss"] == pytest.approx(0.5, abs=1e-6)  # 1 − σ(0) at π = π_ref
    assert m["loss"] < 0.5 and m["chosen_rewards"] > 0 > m["rejected_rewards"]


def test_share_prompt_run_follows_the_two_row_run(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=16)
    shared = train_dpo.main(cfg(tmp_path, "shared", max_steps=3))
    train_dpo.main(cfg(tmp_path, "rows", max_steps=3, share_prompt=False))
    a, b = log(str(tmp_path / "shared")), log(str(tmp_path / "rows"))
    for step in (1, 2, 3):
        for key in ("loss", "margin", "chosen_rewards", "rejected_rewards"):
            assert a[step][key] == pytest.approx(b[step][key], abs=2e-4), (step, key)
    assert shared["margin"] > 0.01  # and they did move


# --- end to end ------------------------------------------------------------------------------------------------
def test_dpo_learns_the_preference_and_generalises_to_held_out_prompts(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=32)
    ev = write_prefs(tmp_path / "eval.jsonl", n=12, topics=EVAL_TOPICS, seed=1)
    before = train_dpo.main(cfg(tmp_path, "before", max_steps=1, lr=1e-9, eval_data=ev))
    after = train_dpo.main(cfg(tmp_path, "after", max_steps=25, batch_size=8, lr=1e-2, eval_data=ev, log_every=5))
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # π ≈ π_ref: no preference yet
    assert after["eval_accuracy"] >= 0.9, after
    assert after["eval_margin"] > 0.5 and after["eval_chosen_rewards"] > after["eval_rejected_rewards"]
    assert after["eval_loss"] < math.log(2) - 0.2 and after["loss"] < after["first_loss"] - 0.3
    assert (tmp_path / "after" / "adapter" / "adapter_model.safetensors").exists()
    rows = log(str(tmp_path / "after"))
    assert {"loss", "accuracy", "margin", "chosen_rewards", "rejected_rewards", "tokens_per_s"} <= set(rows[25])


def test_grad_accum_and_micro_batches_give_the_same_steps(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=8)
    a = train_dpo.main(cfg(tmp_path, "a", batch_size=4, grad_accum=1, max_steps=3))
    b = train_dpo.main(cfg(tmp_path, "b", batch_size=1, grad_accum=4, max_steps=3))
    la, lb = log(str(tmp_path / "a")), log(str(tmp_path / "b"))
    for s in (1, 2, 3):
        assert abs(la[s]["loss"] - lb[s]["loss"]) < 1e-5
    assert abs(a["margin"] - b["margin"]) < 1e-4


def test_resume_follows_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    write_prefs(tmp_path / "prefs.jsonl", n=12)
    kw = dict(max_steps=6, save_every=3, lora_dropout=0.2, warmup=2, batch_size=3, grad_accum=2)  # dropout: RNG too
    train_dpo.main(cfg(tmp_path, "straight", **kw))
    fault_driver.install("nan-loss=5", monkeypatch.setattr)  # the run dies at step 5; train_state.pt holds step 3
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_dpo.main(cfg(tmp_path, "resumed", **kw))
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # the last good state is all that is left
    train_dpo.main(cfg(tmp_path, "resumed", resume=True, **kw))
    straight, resumed = log(str(tmp_path / "straight")), log(str(tmp_path / "resumed"))
    assert [resumed[s]["loss"] for s in range(1, 7)] == [straight[s]["loss"] for s in range(1, 7)]  # bit-exact
    ws, wr = weights(str(tmp_path / "straight")), weights(str(tmp_path / "resumed"))
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_precompute_ref_gives_the_same_losses_as_the_frozen_copy(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=8)
    ev = write_prefs(tmp_path / "eval.jsonl", n=4, topics=EVAL_TOPICS, seed=1)
    kw = dict(lora_rank=0, lr=1e-3, max_steps=3, eval_data=ev)
    a = train_dpo.main(cfg(tmp_path, "copy", **kw))
    b = train_dpo.main(cfg(tmp_path, "pre", precompute_ref=True, **kw))
    la, lb = log(str(tmp_path / "copy")), log(str(tmp_path / "pre"))
    assert la[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for s in (1, 2, 3):
        assert lb[s]["loss"] == pytest.approx(la[s]["loss"], abs=1e-5)
    assert b["eval_margin"] == pytest.approx(a["eval_margin"], abs=1e-4)
    assert a["loss"] < a["first_loss"]  # and the full fine-tune learns


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun: data sharded by rank, losses normalised by the global pair count, gradients summed over ranks."""
    write_prefs(tmp_path / "prefs.jsonl", n=8)
    train_dpo.main(cfg(tmp_path, "one", batch_size=4, max_steps=3))
    c = cfg(tmp_path, "two", batch_size=2, max_steps=3)
    flags = [f"--{f.name.replace('_', '-')}={getattr(c, f.name)}" for f in dataclasses.fields(c)]
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_dpo.py", *flags],
                env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = log(str(tmp_path / "one")), log(str(tmp_path / "two"))
    assert one.keys() == two.keys() == {1, 2, 3}
    for s in one:
        assert abs(one[s]["loss"] - two[s]["loss"]) <= 1e-5 and abs(one[s]["margin"] - two[s]["margin"]) <= 1e-5
    w1, w2 = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for k in w1:  # losses agree to 1e-5; Adam's normalised steps turn summation-order noise into ~1e-5 on weights
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=0)


def test_prompts_only_file_is_one_error_line_and_exit_2(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    r = run_cli(["train_dpo.py", "--init", "tiny", "--data", str(p), "--out", str(tmp_path / "o")], env=ONE_THREAD)
    assert_user_error(r, "prompts.jsonl:1", "missing field 'chosen'")
    assert not (tmp_path / "o").exists()


def test_an_sft_file_or_a_flag_that_does_not_apply_is_a_one_line_hint(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n")
    with pytest.raises(UserError, match=r"sft.jsonl:1: missing field 'chosen'.*use train_sft.py"):
        train_dpo.main(cfg(tmp_path, "o", data=str(p)))
    write_prefs(tmp_path / "prefs.jsonl", n=4)
    with pytest.raises(UserError, match="--label-smoothing does not apply to --loss ipo"):
        train_dpo.main(cfg(tmp_path, "o", loss="ipo", label_smoothing=0.1))
    assert not (tmp_path / "o").exists()
