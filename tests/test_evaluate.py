import json
import math
import random
import re

import pytest
import torch
from conftest import assert_user_error, run_cli

from nanoalign import evaluate, hub, judge, tasks
from nanoalign.checkpoint import save_checkpoint
from nanoalign.cli import UserError
from nanoalign.data import read_prompts, read_prefs

EXPECTED_KEYS = {"gold_mean", "gold_stderr", "win_rate", "kl", "mean_length", "eos_rate", "n", "unrequested_rate"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite")
    tasks.make(str(d), seed=0, n_sft=0, n_prefs=8, n_prompts=0, n_eval=24)
    return d


# ------------------------------------------------------------------------------------------ pure functions
def test_win_rate_counts_ties_as_half_and_buckets_by_length():
    scores, ref = [1, 0.5, 0, 1, 1], [0, 0.5, 1, 1, 0]  # win, tie, loss, tie, win
    lengths, ref_lengths = [10, 10, 30, 10, 20], [10, 30, 10, 11, 10]
    # (len+1) ratios: 1 similar, 11/31 shorter, 31/11 longer, 11/12 similar, 21/11 longer
    res = evaluate.win_rate(scores, ref, lengths, ref_lengths)
    assert (res["wins"], res["ties"], res["losses"]) == (2, 2, 1)
    assert res["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert res["win_rate_non_tied"] == pytest.approx(2 / 3)
    assert res["win_rate_by_length"] == pytest.approx({"longer": 0.5, "shorter": 0.5, "similar": 0.75})
    assert res["n_by_length"] == {"longer": 2, "shorter": 1, "similar": 2}


def test_win_rate_all_ties_is_one_half():
    res = evaluate.win_rate([0.0, 0.5, 1.0], [0.0, 0.5, 1.0], [1] * 3, [1] * 3)
    assert res["win_rate"] == 0.5 and res["win_rate_non_tied"] == 0.5 and res["ties"] == 3
    res = evaluate.win_rate([1.0, 1.0], [0.0, 0.0], [1, 1], [1, 1])
    assert res["win_rate"] == 1.0 and res["losses"] == 0


def test_mean_stderr_hand_worked():
    m, se = evaluate.mean_stderr([1, 2, 3, 4])
    assert m == 2.5 and se == pytest.approx(math.sqrt((5 / 3) / 4))  # sample variance 5/3, n 4
    assert evaluate.mean_stderr([0.25]) == (0.25, 0.0)
    assert evaluate.mean_stderr([1, 1, 1]) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------------ KL
def exact_kl_and_k1(policy, ref, samples, temperature):
    """Per-token KL(policy_T || ref_T) summed over the full vocabulary at each sampled context, and the k1 estimate
    log policy_T(y) - log ref_T(y), both from unbatched forward passes (no padding involved)."""
    exact, k1 = [], []
    for p, r, _, _ in samples:
        ids = torch.tensor([p + r])
        with torch.no_grad():  # position len(p)-1+t predicts response token t
            a, b = (m(ids)[0, len(p) - 1:-1].float() / temperature for m in (policy, ref))
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        exact += (la.exp() * (la - lb)).sum(-1).tolist()
        k1 += (la - lb).gather(-1, torch.tensor(r)[:, None]).squeeze(-1).tolist()
    return exact, k1


def peaky_pair(suite):
    """Two different tiny models with a wider init (peakier distributions, a KL well above the noise), 8 prompts."""
    (policy, tok), (ref, _) = hub.load("tiny"), hub.load("tiny", seed=1)
    for m, seed in ((policy, 0), (ref, 1)):
        m.init_weights(seed, std=0.06).eval()
    return policy, ref, tok, read_prompts(str(suite / "eval.jsonl"))[:8]


def test_kl_matches_a_fresh_forward_at_the_sampling_temperature_and_is_positive(suite):
    policy, ref, tok, rows = peaky_pair(suite)
    cfg = evaluate.Config(model="tiny", prompts="-", temperature=0.7, max_new_tokens=24, seed=0)
    judge = evaluate.make_judge("gold")
    ref_samples = evaluate.sample(ref, tok, [r["prompt"] for r in rows], 1, 0.7, 24, 0)
    res = evaluate.evaluate_model(policy, tok, rows, judge, cfg, ref, ref_samples, judge(rows, [s[2] for s in
                                                                                             ref_samples]))
    samples = evaluate.sample(policy, tok, [r["prompt"] for r in rows], 1, 0.7, 24, 0)  # the same draw (same seed)
    exact, k1 = exact_kl_and_k1(policy, ref, samples, 0.7)
    _, k1_t1 = exact_kl_and_k1(policy, ref, samples, 1.0)
    n = len(k1)
    mean_k1 = sum(k1) / n
    se = math.sqrt(sum((x - mean_k1) ** 2 for x in k1) / (n - 1) / n)
    kl_exact = sum(exact) / n
    assert n == sum(len(s[1]) for s in samples) > 100
    assert res["kl"] == pytest.approx(mean_k1, abs=1e-4)  # log-probs at T = 0.7, read off the sampled tokens
    assert abs(res["kl"] - sum(k1_t1) / n) > 0.05  # ... not at T = 1
    assert abs(res["kl"] - kl_exact) < 3 * se  # an unbiased estimate of the KL at the sampling temperature
    assert kl_exact > 0.1  # the two models differ enough for the checks above to tell estimates apart


def test_kl_forwards_under_bf16_autocast_stay_near_fp32(suite):
    policy, ref, tok, rows = peaky_pair(suite)
    samples = evaluate.sample(policy, tok, [r["prompt"] for r in rows], 1, 0.7, 24, 0)
    lp32, lp16 = (evaluate.response_logprobs(policy, samples, tok.pad_id, 0.7, bf16=b) for b in (False, True))
    rl32, rl16 = (evaluate.response_logprobs(ref, samples, tok.pad_id, 0.7, bf16=b) for b in (False, True))
    n = [len(s[1]) for s in samples]
    tokens = sum(n)
    _, k1 = exact_kl_and_k1(policy, ref, samples, 0.7)  # unbatched, unpadded: the batched fp32 path must match it
    assert (sum(lp32) - sum(rl32)) / tokens == pytest.approx(sum(k1) / tokens, abs=1e-5)
    one = [evaluate.response_logprobs(policy, [s], tok.pad_id, 0.7)[0] for s in samples]  # no padding, no sorting
    assert len({len(s[0]) + len(s[1]) for s in samples}) > 1 and lp32 == pytest.approx(one, abs=1e-4)  # in its place
    assert evaluate.response_logprobs(policy, samples, tok.pad_id, 0.7, batch_size=3) == pytest.approx(one, abs=1e-4)
    assert lp16 != lp32  # the trunk did run in bf16
    assert max(abs(a - b) / c for a, b, c in zip(lp16, lp32, n)) < 0.02  # nats per token, per response
    kl32, kl16 = ((sum(p) - sum(r)) / tokens for p, r in ((lp32, rl32), (lp16, rl16)))
    assert kl32 > 0.1 and kl16 == pytest.approx(kl32, rel=0.03)


def test_kl_of_a_model_to_itself_is_exactly_zero_and_greedy_has_no_kl(suite):
    (a, tok), (b, _) = hub.load("tiny"), hub.load("tiny")
    rows = read_prompts(str(suite / "eval.jsonl"))[:4]
    judge = evaluate.make_judge("gold")
    for temperature, want in ((1.0, 0.0), (0.0, None)):
        cfg = evaluate.Config(model="tiny", prompts="-", temperature=temperature, max_new_tokens=12)
        rs = evaluate.sample(b.eval(), tok, [r["prompt"] for r in rows], 1, temperature, 12, 0)
        res = evaluate.evaluate_model(a.eval(), tok, rows, judge, cfg, b, rs, judge(rows, [s[2] for s in rs]))
        assert res["kl"] == want
        assert res["ties"] == 4 and res["win_rate"] == 0.5  # same weights, same seed: the same responses


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_end_to_end_on_tiny(suite, tmp_path):
    out = tmp_path / "res.json"
    r = run_cli(["-m", "nanoalign.evaluate", "--model", "tiny", "--ref", "tiny", "--prompts",
                 str(suite / "eval.jsonl"), "--limit", "8", "--max-new-tokens", "16", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(res)
    assert res["n"] == 8 and 1 <= res["mean_length"] <= 16 and 0 <= res["eos_rate"] <= 1
    assert res["kl"] == 0.0 and res["win_rate"] == 0.5  # a model against itself
    assert 0 <= res["gold_mean"] <= 1 and res["gold_stderr"] >= 0
    assert set(res["by_family"]) <= set(tasks.FAMILIES)
    assert "| model |" in r.stdout and not list(tmp_path.glob("*.tmp"))


def test_cli_compare_writes_one_entry_per_model(suite, tmp_path):
    out = tmp_path / "cmp.json"
    r = run_cli(["-m", "nanoalign.evaluate", "--compare", "same=tiny", "other=small", "--ref", "tiny", "--prompts",
                 str(suite / "eval.jsonl"), "--limit", "4", "--max-new-tokens", "8", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"same", "other"}
    for v in res.values():
        assert EXPECTED_KEYS <= set(v) and v["n"] == 4
    assert res["same"]["kl"] == 0.0 and res["other"]["kl"] != 0.0
    assert "| same |" in r.stdout and "| other |" in r.stdout
    assert re.search(r"^same: gold .* \| 1/2 models \| eta \d+s$", r.stdout, re.M)  # progress with an ETA
    assert re.search(r"^other: gold .* \| 2/2 models \| eta 0s$", r.stdout, re.M)


# stub responses: under the gold judge, scores 1, 1/2 and 0 for the tiny task rows below
GOOD, HALF, BAD = "tea is warm and calm.", "Tea is warm and calm.", "Tea, warm, ok."


def stub_rows(n):
    cons = [{"type": "case", "value": "lower"}, {"type": "no_commas", "value": True}]
    return [{"prompt": f"Describe tea number {i}.", "constraints": cons} for i in range(n)]


def stub_sample(model, tok, prompts, n=1, temperature=0.7, max_new_tokens=96, seed=0, batch_size=16, bf16=False):
    """A sampler whose draws are a pure function of (prompt, sample index, seed), like the real one."""
    out = []
    for p in prompts:
        for j in range(n):
            h = random.Random(f"{p}/{j}/{seed}").randrange(3)
            text = (GOOD, HALF, BAD)[h]
            out.append(([1], [5] * (3 + h), text, True))
    return out


def test_best_of_n_is_at_least_the_single_sample_mean_for_the_draws(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in stub_rows(30)))
    monkeypatch.setattr(evaluate, "sample", stub_sample)
    best_file = tmp_path / "best.jsonl"
    res = evaluate.main(evaluate.Config(model="tiny", prompts=str(prompts), best_of_n=4, seed=3,
                                        write_best=str(best_file)))
    rows = stub_rows(30)
    gold = lambda t, r: judge.score(t, r)
    single = [gold(s[2], r) for s, r in zip(stub_sample(None, None, [r["prompt"] for r in rows], seed=3), rows)]
    assert res["gold_mean"] == pytest.approx(sum(single) / 30)
    # best-of-n draws its own 4 samples (seed + 1); its mean is the mean over prompts of the best of THOSE samples
    draws = stub_sample(None, None, [r["prompt"] for r in rows], 4, seed=4)
    best = [max(gold(draws[4 * i + j][2], r) for j in range(4)) for i, r in enumerate(rows)]
    assert res["best_of_n_gold_mean"] == pytest.approx(sum(best) / 30)
    assert res["best_of_n_gold_mean"] >= sum(gold(d[2], rows[i // 4]) for i, d in enumerate(draws)) / 120
    assert res["best_of_n_gold_mean"] >= res["gold_mean"]  # true for these draws: 30 prompts, best of 4
    written = [json.loads(line) for line in best_file.read_text().splitlines()]
    assert [gold(w["messages"][-1]["content"], r) for w, r in zip(written, rows)] == best


def test_unrequested_format_rate_overall_and_per_format(tmp_path, monkeypatch, capsys):
    keyword, quotes = [{"type": "keyword", "value": "calm"}], [{"type": "quotes", "value": True}]
    answers = {"Describe tea.": '"Tea is calm."', "Describe milk.": "TEA IS CALM.", "Describe ice.": "Tea is calm.",
               "Quote tea.": '"Tea is calm."'}  # quotes and capitals nobody asked for; the last one asked for quotes
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "constraints": quotes if p == "Quote tea." else keyword}) + "\n"
                               for p in answers))
    monkeypatch.setattr(evaluate, "sample", lambda model, tok, ps, n=1, *a, **k: [([1], [5], answers[p], True)
                                                                                   for p in ps for _ in range(n)])
    res = evaluate.main(evaluate.Config(model="tiny", prompts=str(prompts), out=str(tmp_path / "res.json")))
    assert res["unrequested_rate"] == 0.5  # 2 of the 4 answers
    assert res["unrequested_by_format"] == pytest.approx(  # per format, among the prompts that did not ask for it
        {"quotes": 1 / 3, "bullets": 0.0, "capitals": 1 / 4, "json": 0.0, "lowercase": 0.0})
    assert res["gold_mean"] == pytest.approx((1 / 2 + 1 / 2 + 1 + 1) / 4)  # "calm" is there: 1 of 2
    assert json.loads((tmp_path / "res.json").read_text())["unrequested_by_format"]["capitals"] == 0.25
    table = capsys.readouterr().out.splitlines()[-3:]
    assert table[0] == "| model | gold | ± se | unrequested | length | EOS rate |"
    assert table[2] == "| tiny | 0.750 | 0.144 | 0.500 | 1.0 | 1.00 |"  # se: sd 0.289 / sqrt(4)


# --------------------------------------------------------------------------------------- reward-model judge
def test_rm_scores_are_read_at_the_closing_token_whatever_the_padding(rm_dir):
    rm, tok = hub.load(str(rm_dir))
    prompts, texts = ["Describe tea.", "Hi"], ["Tea is a warm drink made from leaves.", "ok"]
    batched = evaluate.rm_scores(rm.eval(), tok, prompts, texts)
    alone = [evaluate.rm_scores(rm, tok, [p], [t])[0] for p, t in zip(prompts, texts)]
    assert batched == pytest.approx(alone, abs=1e-5) and batched[0] != pytest.approx(batched[1])
    for p, t, closed in zip(prompts, texts, batched):  # one unpadded forward of the whole conversation
        ids, mask = tok.render_chat([{"role": "user", "content": p}, {"role": "assistant", "content": t}])
        end = max(i for i, m in enumerate(mask) if m)  # the closing <|im_end|>; causal: later tokens change nothing
        with torch.no_grad():
            h = rm(torch.tensor([ids]), return_hidden=True)[0]
        assert ids[end] == tok.eos_id and closed == pytest.approx(rm.score(h[end]).item(), abs=1e-5)
        assert closed != pytest.approx(rm.score(h[end - 1]).item(), abs=1e-5)  # not at the response's last token


def test_rm_scores_batched_by_length_come_back_in_input_order(rm_dir):
    rm, tok = hub.load(str(rm_dir))
    texts = ["Tea is a warm drink made from leaves and hot water.", "ok", "Tea is warm.", "Tea.", "Tea is a drink."]
    got = evaluate.rm_scores(rm.eval(), tok, ["Describe tea."] * 5, texts, batch_size=2)  # 3 batches, reordered
    alone = [evaluate.rm_scores(rm, tok, ["Describe tea."], [t])[0] for t in texts]
    assert got == pytest.approx(alone, abs=1e-5) and len({round(x, 4) for x in got}) == 5


def test_table_labels_each_score_by_its_judge():
    a = {"gold_mean": 0.5, "gold_stderr": 0.1, "win_rate": 0.75, "kl": None, "mean_length": 12.0, "eos_rate": 1.0}
    b = {**a, "kl": 0.25}
    gold = evaluate.format_table({"a": a, "b": b}, "gold").splitlines()
    assert gold[:2] == ["| model | gold | ± se | win vs ref (gold) | KL to ref | length | EOS rate |",
                        "| --- | --- | --- | --- | --- | --- | --- |"]
    assert gold[2:] == ["| a | 0.500 | 0.100 | 0.750 | — | 12.0 | 1.00 |",
                        "| b | 0.500 | 0.100 | 0.750 | 0.250 | 12.0 | 1.00 |"]
    rm = evaluate.format_table({"a": {**a, "gold_mean": None, "gold_stderr": None, "judge_mean": -1.25}}, "out/rm")
    assert rm.splitlines()[0] == "| model | RM score | win vs ref (RM) | length | EOS rate |"  # no number: no column
    assert rm.splitlines()[2] == "| a | -1.250 | 0.750 | 12.0 | 1.00 |"


def test_an_rm_judge_without_task_metadata_reports_no_gold(rm_dir, tmp_path, monkeypatch, capsys):
    rows = [{"prompt": f"Describe tea number {i}."} for i in range(6)]  # no constraints: no gold judge possible
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(evaluate, "sample", stub_sample)
    res = evaluate.main(evaluate.Config(model="small", ref="tiny", prompts=str(prompts), judge=str(rm_dir)))
    rm, tok = hub.load(str(rm_dir))
    texts = [s[2] for s in stub_sample(None, None, [r["prompt"] for r in rows])]
    want = evaluate.rm_scores(rm.eval(), tok, [r["prompt"] for r in rows], texts)
    assert res["gold_mean"] is None and res["gold_stderr"] is None and "by_family" not in res
    assert res["judge_mean"] == pytest.approx(sum(want) / 6, abs=1e-5)
    assert res["win_rate"] == 0.5 and res["ties"] == 6  # the stub gives both models the same texts
    out = capsys.readouterr().out
    assert re.search(r"^small: RM score -?\d+\.\d{3} ± \d+\.\d{3} .*\| 1/1 models \| eta 0s$", out, re.M)
    assert "| model | RM score | win vs ref (RM) |" in out and "gold" not in out


def test_rm_judge_reports_accuracy_on_prefs(suite, rm_dir, tmp_path):
    rm, tok = hub.load(str(rm_dir))
    prefs = read_prefs(str(suite / "prefs.jsonl"))
    score = lambda key: [evaluate.rm_scores(rm.eval(), tok, [r["prompt"]], [r[key][-1]["content"]])[0] for r in prefs]
    ch, rj = score("chosen"), score("rejected")
    want = sum(a > b for a, b in zip(ch, rj)) / len(prefs)
    swapped = tmp_path / "swapped.jsonl"  # chosen <-> rejected: the accuracy becomes 1 - accuracy
    swapped.write_text("".join(json.dumps({**json.loads(line), "chosen": json.loads(line)["rejected"],
                                           "rejected": json.loads(line)["chosen"]}) + "\n"
                               for line in (suite / "prefs.jsonl").read_text().splitlines()))
    for path, acc in ((suite / "prefs.jsonl", want), (swapped, 1 - want)):
        out = tmp_path / "rm.json"
        res = evaluate.main(evaluate.Config(model="tiny", prompts=str(suite / "eval.jsonl"), judge=str(rm_dir),
                                            prefs=str(path), limit=1, max_new_tokens=2, out=str(out)))
        assert res["rm_n"] == 8 and res["rm_accuracy"] == pytest.approx(acc)
        assert json.loads(out.read_text())["rm_accuracy"] == pytest.approx(acc)
        assert "judge_mean" in res and EXPECTED_KEYS - {"win_rate", "kl"} <= set(res)
    assert res["rm_margin"] == pytest.approx(sum(b - a for a, b in zip(ch, rj)) / len(prefs), abs=1e-5)


def test_rm_accuracy_under_bf16_autocasts_the_rm(suite, rm_dir):
    """--bf16 reads the RM's pair accuracy under the autocast the RM trains with: the bf16 margins, not fp32's."""
    rm, tok = hub.load(str(rm_dir))
    prefs = read_prefs(str(suite / "prefs.jsonl"))
    with torch.autocast("cpu", torch.bfloat16):
        want = evaluate.rm_accuracy(rm.eval(), tok, prefs)
    fp32 = evaluate.rm_accuracy(rm, tok, prefs)
    res = evaluate.main(evaluate.Config(model="tiny", prompts=str(suite / "eval.jsonl"), rm=str(rm_dir),
                                        prefs=str(suite / "prefs.jsonl"), limit=1, max_new_tokens=2, bf16=True))
    assert res["rm_margin"] == pytest.approx(want["rm_margin"], abs=1e-6)
    assert res["rm_accuracy"] == want["rm_accuracy"]
    assert abs(want["rm_margin"] - fp32["rm_margin"]) > 1e-5  # bf16 rounding shows: the autocast path was taken


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of --model or --compare"),
    (["--model", "tiny", "--compare", "a=tiny"], "exactly one of --model or --compare"),
    (["--model", "tiny", "--temperature", "-1"], "--temperature"),
    (["--model", "tiny", "--samples", "0"], "--samples"),
    (["--model", "tiny", "--best-of-n", "-2"], "--best-of-n"),
    (["--model", "tiny", "--write-best", "B"], "--write-best needs --best-of-n"),
    (["--model", "tiny", "--prefs", "P"], "--prefs"),
    (["--model", "tiny", "--out", "NODIR/res.json"], "directory does not exist"),
    (["--model", "tiny", "--limit", "lots"], "--limit"),
    (["--model", "nonesuch"], "nonesuch"),
    (["--model", "tiny", "--judge", "TINYDIR"], "no score head"),
    (["--model", "tiny", "--prompts", "MISSING"], "no such file"),
])
def test_bad_input_exits_2_with_one_line(suite, tmp_path, capsys, args, needle):
    tiny_dir = tmp_path / "tiny"
    save_checkpoint(str(tiny_dir), *hub.load("tiny"))
    subst = {"B": str(tmp_path / "b.jsonl"), "P": str(suite / "prefs.jsonl"), "TINYDIR": str(tiny_dir),
             "NODIR/res.json": str(tmp_path / "nodir" / "res.json"), "MISSING": str(tmp_path / "missing.jsonl")}
    argv = [subst.get(a, a) for a in args]
    if "--prompts" not in argv:
        argv += ["--prompts", str(suite / "eval.jsonl")]
    with pytest.raises(SystemExit) as e:
        evaluate.run(evaluate.main, evaluate.Config, argv + ["--limit", "1", "--max-new-tokens", "2"]
                     if "--limit" not in argv else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    assert not list(tmp_path.glob("*.json"))


def test_every_input_is_checked_before_any_sampling(suite, rm_dir, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before every input was checked")
    monkeypatch.setattr(evaluate, "sample", no_sampling)
    policy = tmp_path / "policy"
    save_checkpoint(str(policy), *hub.load("tiny"))
    bad_prefs = tmp_path / "bad_prefs.jsonl"
    bad_prefs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    ok = dict(prompts=str(suite / "eval.jsonl"), ref="tiny", limit=2, max_new_tokens=2)
    for kw, needle in [(dict(model="tiny", rm=str(rm_dir), prefs=str(bad_prefs)), f"{bad_prefs}:2"),
                       (dict(model="tiny", rm=str(policy), prefs=str(suite / "prefs.jsonl")), "no score head"),
                       (dict(compare=["a=tiny", f"b={tmp_path / 'nope'}"]), "nope"),
                       (dict(compare=["a=tiny", f"b={tmp_path}"]), "config.json"),
                       (dict(compare=["a=tiny", "a=small"]), "same NAME"),
                       (dict(compare=["a=tiny", "b="]), "empty MODEL"),
                       (dict(model="tiny", ref=str(tmp_path / "noref")), "noref")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            evaluate.main(evaluate.Config(**{**ok, **kw}))


def test_bad_prompts_file_from_the_command_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = run_cli(["-m", "nanoalign.evaluate", "--model", "tiny", "--prompts", str(bad)])
    assert_user_error(r, f"{bad}:2", "prompt")
