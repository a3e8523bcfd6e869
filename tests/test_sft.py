"""train_sft.py end to end on the tiny random model: gradient accumulation, loss goes down, checkpoint reloads,
bit-exact resume (in a copied run directory), 2-process data parallel == 1 process, one-line errors, NaN handling,
--help and the progress log; and a real SmolLM2 LoRA run."""
import dataclasses
import json
import os
import random
import shutil
import sys

import pytest
import torch

import fault_driver
from conftest import ONE_THREAD, ROOT, assert_user_error, run_cli

sys.path.insert(0, ROOT)
import train_sft  # noqa: E402
from nanoalign import hub  # noqa: E402
from nanoalign.cli import Logger, build_parser, run  # noqa: E402
from nanoalign.data import collate_sft, read_sft, tokenize_sft  # noqa: E402
from nanoalign.packing import pack_sft  # noqa: E402
from nanoalign.loop import TrainingError  # noqa: E402
from nanoalign.tokenizer import byte_tokenizer  # noqa: E402


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_sft(path, n=16, seed=0):
    """Small conversations of varied length (with system prompts and two turns), so per-row token counts differ."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            w = rng.sample(WORDS, 3)
            msgs = [{"role": "user", "content": f"Say {w[0]}"}, {"role": "assistant", "content": " ".join(w[:1 + i % 3])}]
            if i % 2:
                msgs = [{"role": "system", "content": "Be brief."}] + msgs
            if i % 4 == 3:
                msgs += [{"role": "user", "content": "again"}, {"role": "assistant", "content": w[2]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def cfg(tmp_path, name, **kw):
    base = dict(init="tiny", data=str(tmp_path / "sft.jsonl"), out=str(tmp_path / name), max_steps=4, batch_size=4,
                lr=3e-3, warmup=0, max_len=128, log_every=1, lora_dropout=0.0, device="cpu")
    return train_sft.Config(**{**base, **kw})


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def weights(out):
    model, _ = hub.load(out)
    return model.state_dict()


def test_grad_accum_gradients_equal_the_big_batch_gradient(tmp_path):
    """The per-token normalisation by the GLOBAL count makes 8 micro-batches of 1 add up to one batch of 8."""
    tok_model, tok = hub.load("tiny")
    examples = tokenize_sft(tok, read_sft(write_sft(tmp_path / "sft.jsonl", n=8)), 128)
    c = train_sft.Config(device="cpu")

    def grads(micro, norm):
        tok_model.zero_grad()
        for m in micro:
            n = m["loss_mask"][:, 1:].sum() if norm == "micro" else sum(e[1][1:].count(1) for e in examples)
            (train_sft.batch_loss(tok_model, m, n, c, "cpu") / (len(micro) if norm == "micro" else 1)).backward()
        return torch.cat([p.grad.flatten() for p in tok_model.parameters()])

    big = grads([collate_sft(examples, 2)], "global")
    accum = grads([collate_sft([e], 2) for e in examples], "global")
    torch.testing.assert_close(accum, big, atol=1e-6, rtol=1e-5)
    naive = grads([collate_sft([e], 2) for e in examples], "micro")  # mean per micro-batch: transformers #34191
    assert (naive - big).abs().max() > 1e-3


def test_batch8_accum1_equals_batch1_accum8(tmp_path):
    write_sft(tmp_path / "sft.jsonl", n=8)
    a = train_sft.main(cfg(tmp_path, "a", batch_size=8, grad_accum=1, max_steps=2))
    b = train_sft.main(cfg(tmp_path, "b", batch_size=1, grad_accum=8, max_steps=2))
    la, lb = losses(a_out := str(tmp_path / "a")), losses(str(tmp_path / "b"))
    assert la.keys() == lb.keys() == {1, 2}
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-5
    assert abs(a["loss"] - b["loss"]) <= 1e-5
    wa, wb = weights(a_out), weights(str(tmp_path / "b"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_main_lowers_the_loss_and_the_checkpoint_reloads(tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", n=16)
    # global batch = the whole set, so every step sees the same rows and the losses are comparable
    m = train_sft.main(cfg(tmp_path, "out", batch_size=8, grad_accum=2, max_steps=12, log_every=4, eval_data=data))
    out = str(tmp_path / "out")
    assert m["loss"] < m["first_loss"] - 1.0, m
    log = losses(out)
    assert sorted(log) == [1, 4, 8, 12] and log[12] == pytest.approx(m["loss"])
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["eval_loss"] == pytest.approx(m["eval_loss"])
    # the saved model gives the same held-out loss as the model that was trained
    model, tok = hub.load(out)
    ex = tokenize_sft(tok, read_sft(data), 128)
    batch = collate_sft(ex, tok.pad_id)
    with torch.no_grad():
        nll = train_sft.batch_loss(model.eval(), batch, batch["loss_mask"][:, 1:].sum(), train_sft.Config(), "cpu")
    assert float(nll) == pytest.approx(m["eval_loss"], abs=1e-5)
    assert m["eval_loss"] < m["first_loss"] - 1.0


def test_qlora_run_saves_adapter_and_merged_checkpoint(tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", n=8)
    m = train_sft.main(cfg(tmp_path, "q", lora_rank=4, lora_alpha=8.0, nf4=True, lr=1e-2, batch_size=8, max_steps=3,
                           eval_data=data))
    out = tmp_path / "q"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    model, tok = hub.load(str(out))  # merged: dequantized NF4 base + B A, a plain checkpoint
    batch = collate_sft(tokenize_sft(tok, read_sft(data), 128), tok.pad_id)
    with torch.no_grad():
        nll = train_sft.batch_loss(model.eval(), batch, batch["loss_mask"][:, 1:].sum(), train_sft.Config(), "cpu")
    assert float(nll) == pytest.approx(m["eval_loss"], abs=1e-4)
    assert m["loss"] < m["first_loss"]


def test_resume_follows_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    write_sft(tmp_path / "sft.jsonl", n=12)
    # LoRA with dropout: the resumed run must also restore the RNG
    kw = dict(max_steps=6, save_every=3, lora_rank=4, lora_dropout=0.2, lr=1e-2, warmup=2, batch_size=3, grad_accum=2)
    train_sft.main(cfg(tmp_path, "straight", **kw))
    with monkeypatch.context() as m:
        fault_driver.install("nan-loss=5", m.setattr)  # dies at step 5; train_state.pt holds step 3
        with pytest.raises(TrainingError, match="non-finite loss"):
            train_sft.main(cfg(tmp_path, "killed", **kw))
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    # where a run lives is not one of its settings: a copied run directory resumes as well
    shutil.copytree(tmp_path / "killed", tmp_path / "resumed")
    train_sft.main(cfg(tmp_path, "resumed", resume=True, **kw))
    straight, resumed = losses(str(tmp_path / "straight")), losses(str(tmp_path / "resumed"))
    assert sorted(straight) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]  # bit-exact
    ws, wr = weights(str(tmp_path / "straight")), weights(str(tmp_path / "resumed"))
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_ddp_two_processes_match_one_process(tmp_path):
    write_sft(tmp_path / "sft.jsonl", n=8)
    train_sft.main(cfg(tmp_path, "one", batch_size=4, max_steps=3))
    c = cfg(tmp_path, "two", batch_size=2, max_steps=3)
    flags = [f"--{f.name.replace('_', '-')}={getattr(c, f.name)}" for f in dataclasses.fields(c)]
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py", *flags],
                env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert one.keys() == two.keys() == {1, 2, 3}
    for s in one:
        assert abs(one[s] - two[s]) <= 1e-5, (one, two)
    w1, w2 = weights(str(tmp_path / "one")), weights(str(tmp_path / "two"))
    for k in w1:  # losses agree to 1e-5; Adam's normalised steps turn summation-order noise into ~1e-5 on weights
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=0)


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--max-len", "-5"], "--max-len must be > 0"),
    (["--max-steps", "0"], "--max-steps must be > 0"),
    (["--grad-accum", "0"], "--grad-accum must be > 0"),
    (["--truncate", "right"], "--truncate: invalid choice: 'right' (choose from 'drop', 'left')"),
    (["--pack", "maybe"], "--pack: expected true/false, got 'maybe'"),
    (["--nf4"], "--nf4 needs --lora-rank > 0"),
    (["--max-len", "5000"], "exceeds the model's 1024 positions"),
    (["--data", "PREFS"], "this looks like a preference file"),
    (["--data", "MISSING"], "no such file"),
    (["--max-len", "8"], "no usable rows"),
    (["--data", "MALFORMED"], "bad.jsonl:2: malformed JSON"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, flags, needle):
    data = write_sft(tmp_path / "sft.jsonl", n=4)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    flags = [{"PREFS": str(prefs), "MISSING": str(tmp_path / "nope.jsonl"), "MALFORMED": str(bad)}.get(f, f)
             for f in flags]
    argv = ["--init", "tiny", "--data", data, "--out", str(tmp_path / "o"), "--device", "cpu", *flags]
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, train_sft.Config, argv)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()  # nothing written


def test_cli_subprocess_bad_input(tmp_path):
    """The real entry point: `python train_sft.py` prints one `error:` line, no traceback, exit 2."""
    data = write_sft(tmp_path / "sft.jsonl", n=4)
    r = run_cli(["train_sft.py", "--init", "tiny", "--data", data, "--out", str(tmp_path / "o"), "--lr", "-1"],
                env=ONE_THREAD)
    assert_user_error(r, "--lr must be > 0")


def test_no_arguments_name_the_missing_flag():
    r = run_cli(["train_sft.py"], env=ONE_THREAD)
    assert_user_error(r, "--data is required")


def test_nan_loss_exits_1_and_keeps_the_last_checkpoint(tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", n=8)
    out = tmp_path / "o"
    r = run_cli(["tests/fault_driver.py", "nan-loss=3", "train_sft.py", "--init", "tiny", "--data", data, "--out",
                 str(out), "--max-steps", "6", "--save-every", "2", "--log-every", "1", "--batch-size", "2"],
                env=ONE_THREAD)
    assert r.returncode == 1, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "non-finite loss" in err[0] and "step 3" in err[0] and "Traceback" not in r.stderr
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert not (out / "model.safetensors").exists()
    assert sorted(losses(str(out))) == [1, 2]


def test_skip_nonfinite_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    write_sft(tmp_path / "sft.jsonl", n=8)
    # global batch = the data set: every step sees the same rows, so a skipped step leaves the loss where it was
    kw = dict(max_steps=3, batch_size=8, skip_nonfinite=True)
    fault_driver.install("nan-loss=2", monkeypatch.setattr)  # NaN loss and NaN gradients at step 2
    m = train_sft.main(cfg(tmp_path, "o", **kw))
    assert m["skipped_steps"] == 1
    with open(tmp_path / "o" / "log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["skipped"] for r in rows] == [0, 1, 1] and rows[1]["grad_norm"] != rows[1]["grad_norm"]  # nan
    # no update at step 2: step 3 sees the weights step 2 saw (the same rows, in another order)
    assert abs(rows[2]["loss"] - rows[1]["loss"]) < 1e-5 and rows[1]["loss"] < rows[0]["loss"] - 0.01
    assert all(torch.isfinite(v).all() for v in weights(str(tmp_path / "o")).values())


def test_help_shows_each_fields_comment_default_and_choices(capsys):
    p = build_parser(train_sft.Config, prog="train_sft.py")
    text = " ".join(p.format_help().split())  # argparse wraps lines
    assert "Supervised fine-tuning on chat demonstrations" in text  # the Config docstring
    assert "--warmup WARMUP linear warmup steps, then cosine decay to 10% of --lr (default: 10)" in text
    assert "--truncate {drop,left} {drop, left}: rows over --max-len are dropped" in text
    assert "[--nf4]" in p.format_usage() and "--nf4 QLoRA: freeze the base in 4-bit NF4" in text  # a flag
    assert "(default: off)" in text and "[NF4]" not in text
    # a bool flag alone means true; true/false spelled out works too
    assert (p.parse_args(["--nf4"]).nf4, p.parse_args(["--nf4", "false"]).nf4, p.parse_args([]).nf4) == (True, False,
                                                                                                         False)
    with pytest.raises(SystemExit) as e:  # --help itself exits 0
        run(train_sft.main, train_sft.Config, ["--help"])
    assert e.value.code == 0 and "--skip-nonfinite" in capsys.readouterr().out


def test_logger_shows_some_fields_and_writes_all(tmp_path, capsys):
    log = Logger(str(tmp_path), total_steps=10, show=("score", "kl"))
    log.log(1, loss=torch.tensor(0.5), kl=0.25, score=1, clipfrac=0.125)
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 1/10 | score 1 | kl 0.25 | eta ") and "loss" not in line and "clipfrac" not in line
    row = json.loads((tmp_path / "log.jsonl").read_text())
    assert {k: row[k] for k in ("step", "loss", "kl", "score", "clipfrac")} == {"step": 1, "loss": 0.5, "kl": 0.25,
                                                                               "score": 1, "clipfrac": 0.125}
    # a resumed run at step 1 drops the rows after it and a line cut short by a kill
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    Logger(str(tmp_path), total_steps=10, start_step=1)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]


def test_a_run_shorter_than_its_warmup_says_so(tmp_path, capsys):
    write_sft(tmp_path / "sft.jsonl", n=4)
    train_sft.main(cfg(tmp_path, "o", max_steps=2, warmup=10, lr=2e-4))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --warmup 10 outlasts --max-steps 2: the lr peaks at 4e-05, not --lr 0.0002"]
    assert [json.loads(line)["lr"] for line in open(tmp_path / "o" / "log.jsonl")] == [2e-5, 4e-5]


def test_packing_trains_on_the_same_tokens(tmp_path):
    data = write_sft(tmp_path / "sft.jsonl", n=8)
    n_packed = len(pack_sft(tokenize_sft(byte_tokenizer(), read_sft(data), 128), 128))
    assert n_packed < 8
    # one step over the whole set: packed rows hold the same targets, so the first loss is the same
    a = train_sft.main(cfg(tmp_path, "plain", batch_size=8, max_steps=1))
    b = train_sft.main(cfg(tmp_path, "packed", pack=True, batch_size=n_packed, max_steps=1))
    assert (a["train_rows"], b["train_rows"]) == (8, n_packed)
    assert abs(a["first_loss"] - b["first_loss"]) < 1e-5


@pytest.mark.slow
def test_lora_sft_on_smollm2_lowers_the_loss(tmp_path):
    write_sft(tmp_path / "sft.jsonl", n=2)
    torch.set_num_threads(2)
    # the same 2 rows every step (global batch = the data set), so the first and last losses are comparable
    m = train_sft.main(cfg(tmp_path, "o", init="smollm2-135m-instruct", lora_rank=8, lora_alpha=16.0, lr=2e-3,
                           batch_size=2, max_steps=3, max_len=64))
    assert m["loss"] < m["first_loss"] - 0.3, m
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").exists()
