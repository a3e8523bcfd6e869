"""train_dpo.py on the tiny random model: DPO starts at ln 2, learns a separable preference and generalises to
held-out prompts, every --loss lowers its loss, log-probs ignore padding and batch order, resume is bit-exact,
--precompute-ref equals the live reference, and bad input is one error line. Plus the preference collation."""
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
import train_dpo  # noqa: E402
from nanoalign import hub  # noqa: E402
from nanoalign.data import read_prefs  # noqa: E402
from nanoalign.packing import collate_shared  # noqa: E402
from nanoalign.prefs import collate_pairs, collate_unpaired, pairs_to_unpaired  # noqa: E402
from nanoalign.prefs import tokenize_prefs  # noqa: E402
from nanoalign.prefs import tokenize_unpaired  # noqa: E402
from nanoalign.loop import TrainingError  # noqa: E402
from nanoalign.lora import apply_lora  # noqa: E402
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


def test_kto_mismatched_batch_pairs_prompt_i_with_completion_i_plus_1(tmp_path):
    tok = byte_tokenizer()
    rows = pairs_to_unpaired(read_prefs(write_prefs(tmp_path / "p.jsonl", n=2)))
    ex = tokenize_unpaired(tok, rows, 128)
    b = collate_unpaired(ex, tok.pad_id, 128, mismatched=True)
    assert b["labels"].tolist() == [True, False, True, False]
    for i, e in enumerate(ex):
        nxt = ex[(i + 1) % len(ex)]["completion"]
        n = len(e["prompt"]) + len(nxt)
        assert b["kl_input_ids"][i, :n].tolist() == e["prompt"] + nxt
        assert b["kl_response_mask"][i].sum() == len(nxt)


def test_collate_shared_puts_prompt_chosen_rejected_in_one_row_hand_worked():
    ex = [{"prompt": [10, 11, 12], "chosen": [20, 21], "chosen_mask": [1, 1], "rejected": [30], "rejected_mask": [1]},
          {"prompt": [13], "chosen": [22], "chosen_mask": [1], "rejected": [31, 32, 33], "rejected_mask": [0, 1, 1]}]
    b = collate_shared(ex, 2, 128, multiple_of=4)  # pad id 2, rows rounded up to 8
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 2, 2], [13, 22, 31, 32, 33, 2, 2, 2]]
    # row 0: the chosen tokens (3, 4) see the prompt and each other; the rejected token (5) sees only the prompt
    # and itself; padding sees only itself
    assert b["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]
    # both responses continue from the prompt's end: rejected restarts at position len(prompt)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 0], [0, 1, 1, 2, 3, 0, 0, 0]]
    assert b["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 2, 2, 2, -1, -1, -1]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0, 0, 0]]
    # each response's first token is predicted from the prompt's last token, every other token from the one before
    assert b["prev_index"][0, :6].tolist() == [0, 0, 1, 2, 3, 2]
    assert b["prev_index"][1, :5].tolist() == [0, 0, 0, 2, 3]
    assert b["last_index"].tolist() == [[4, 5], [1, 4]]
    # --max-len cuts each response to max_len - len(prompt), as collate_pairs does
    cut = collate_shared(ex, 2, 4)
    assert cut["input_ids"][0, :5].tolist() == [10, 11, 12, 20, 30] and cut["response_mask"][0].sum() == 2


# --- the loss and the log-probs ---------------------------------------------------------------------------------
def test_dpo_loss_is_ln2_for_every_pair_when_policy_equals_reference(tmp_path):
    model, tok = hub.load("tiny")
    apply_lora(model, 4, 8.0)  # a fresh adapter (B = 0): the policy IS the reference
    c = cfg(tmp_path, "x")
    batch = collate_pairs(tokenize_prefs(tok, read_prefs(write_prefs(tmp_path / "prefs.jsonl", n=5)), 128),
                          tok.pad_id, 128)
    logps, lengths = train_dpo.sequence_logps(model, batch, c, "cpu")
    ref = train_dpo.reference_logps(model, None, batch, c, "cpu")
    losses, chosen, rejected = train_dpo.pair_losses("sigmoid", c, logps, lengths, ref)
    assert torch.allclose(losses, torch.full((5,), math.log(2)), atol=1e-6)
    assert chosen.abs().max() < 1e-6 and rejected.abs().max() < 1e-6
    # RPO: + α times the chosen response's token-average NLL, here worked from the per-token log-probs
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    logits = model(ids, att)[:, :-1].float()
    tok_lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
    nll = -(tok_lp.sum(1) / resp[:, 1:].sum(1))[:5]  # the chosen half
    rpo, _, _ = train_dpo.pair_losses("sigmoid", dataclasses.replace(c, rpo_alpha=0.5), logps, lengths, ref)
    torch.testing.assert_close(rpo, math.log(2) + 0.5 * nll, atol=1e-5, rtol=0)
    # ... and the first logged loss of a real run is ln 2 too
    m = train_dpo.main(cfg(tmp_path, "run", max_steps=1))
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_logprobs_ignore_extra_padding_and_batch_order(tmp_path):
    model, tok = hub.load("tiny")
    c = cfg(tmp_path, "x")
    ex = tokenize_prefs(tok, read_prefs(write_prefs(tmp_path / "prefs.jsonl", n=4)), 128)
    with torch.no_grad():
        base, lengths = train_dpo.sequence_logps(model, collate_pairs(ex, tok.pad_id, 128), c, "cpu")  # (8,)
        padded, _ = train_dpo.sequence_logps(model, collate_pairs(ex, tok.pad_id, 128, multiple_of=96), c, "cpu")
        order = [2, 0, 3, 1]
        shuffled, _ = train_dpo.sequence_logps(model, collate_pairs([ex[i] for i in order], tok.pad_id, 128), c, "cpu")
        alone = torch.cat([train_dpo.sequence_logps(model, collate_pairs([e], tok.pad_id, 128), c, "cpu")[0]
                           for e in ex]).view(4, 2).T.reshape(-1)  # (chosen..., rejected...)
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, base, atol=1e-5, rtol=0)
    idx = torch.tensor(order + [4 + i for i in order])
    torch.testing.assert_close(shuffled, base[idx], atol=1e-5, rtol=0)
    assert lengths.tolist() == [len(e["chosen"]) for e in ex] + [len(e["rejected"]) for e in ex]


@pytest.mark.parametrize("max_len", [128, 40])
def test_shared_prompt_rows_give_the_two_row_logprobs_and_gradients(tmp_path, max_len):
    model, tok = hub.load("tiny")
    apply_lora(model, 4, 8.0)
    with torch.no_grad():  # a non-zero adapter, so the gradients reach every LoRA matrix
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    c = cfg(tmp_path, "x")
    ex = tokenize_prefs(tok, read_prefs(write_prefs(tmp_path / "prefs.jsonl", n=6)), max_len, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    two, n_two = train_dpo.sequence_logps(model, collate_pairs(ex, tok.pad_id, max_len), c, "cpu")  # (2B,)
    g_two = torch.autograd.grad(two.sum(), params)
    one, n_one = train_dpo.sequence_logps(model, collate_shared(ex, tok.pad_id, max_len, 8), c, "cpu")  # B rows
    g_one = torch.autograd.grad(one.sum(), params)
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-5)
    assert n_one.tolist() == n_two.tolist()
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_share_prompt_run_follows_the_two_row_run(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=16)
    shared = train_dpo.main(cfg(tmp_path, "shared", max_steps=3))
    train_dpo.main(cfg(tmp_path, "rows", max_steps=3, share_prompt=False))
    a, b = log(str(tmp_path / "shared")), log(str(tmp_path / "rows"))
    for step in (1, 2, 3):
        for key in ("loss", "margin", "chosen_rewards", "rejected_rewards"):
            assert a[step][key] == pytest.approx(b[step][key], abs=2e-4), (step, key)
    assert shared["loss"] < shared["first_loss"]


# --- end to end ------------------------------------------------------------------------------------------------
def test_dpo_learns_the_preference_and_generalises_to_held_out_prompts(tmp_path):
    write_prefs(tmp_path / "prefs.jsonl", n=32)
    ev = write_prefs(tmp_path / "eval.jsonl", n=12, topics=EVAL_TOPICS, seed=1)
    before = train_dpo.main(cfg(tmp_path, "before", max_steps=1, lr=1e-9, eval_data=ev))
    after = train_dpo.main(cfg(tmp_path, "after", max_steps=25, batch_size=8, lr=1e-2, eval_data=ev, log_every=5))
    assert abs(before["eval_margin"]) < 1e-4 and before["eval_accuracy"] < 0.5  # π ≈ π_ref: no preference yet
    assert after["eval_accuracy"] >= 0.9, after
    assert after["eval_margin"] > 0.5 and after["eval_chosen_rewards"] > after["eval_rejected_rewards"]
    assert after["loss"] < after["first_loss"] - 0.3
    assert (tmp_path / "after" / "adapter" / "adapter_model.safetensors").exists()
    rows = log(str(tmp_path / "after"))
    assert {"loss", "accuracy", "margin", "chosen_rewards", "rejected_rewards", "tokens_per_s"} <= set(rows[25])


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("cdpo", {"label_smoothing": 0.1}),
                                        ("robust", {"label_smoothing": 0.1}), ("ipo", {"beta": 0.5}),
                                        ("simpo", {"beta": 2.0}), ("orpo", {}), ("kto", {"batch_size": 16})])
def test_every_loss_runs_and_decreases(tmp_path, loss, extra):
    write_prefs(tmp_path / "prefs.jsonl", n=8)  # the global batch is the whole set: every step sees the same rows
    kw = {"batch_size": 8, **extra}
    m = train_dpo.main(cfg(tmp_path, loss, loss=loss, max_steps=6, **kw))
    steps = log(str(tmp_path / loss))
    assert sorted(steps) == list(range(1, 7))
    assert all(math.isfinite(s["loss"]) for s in steps.values())
    assert m["loss"] < m["first_loss"] - 1e-3, (loss, [s["loss"] for s in steps.values()])


def test_kto_reads_unpaired_rows(tmp_path):
    p = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)} for i in range(8)]
    p.write_text("\n".join(map(json.dumps, rows)) + "\n")
    m = train_dpo.main(cfg(tmp_path, "k", data=str(p), loss="kto", batch_size=8, max_steps=4))
    assert m["train_examples"] == 8 and m["loss"] < m["first_loss"]


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
    monkeypatch.setenv("NANOALIGN_INJECT_NAN_STEP", "5")  # dies at step 5; train_state.pt holds step 3
    with pytest.raises(TrainingError, match="non-finite loss"):
        train_dpo.main(cfg(tmp_path, "resumed", **kw))
    monkeypatch.delenv("NANOALIGN_INJECT_NAN_STEP")
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
