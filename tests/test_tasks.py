import json
import math
import random
import re
import statistics

import pytest

from nanoalign import answers, judge, tasks
from nanoalign.tasks import best_vs_worst
from nanoalign.judge import check, score, score_by_family


def c(type_, value=True, **extra):
    return {"type": type_, "value": value, **extra}


def meta(*cons, prompt="Describe tea."):
    return {"prompt": prompt, "constraints": list(cons)}


# ------------------------------------------------------------------------------------------------ checkers
def test_case_ignores_non_letters_and_handles_unicode():
    lower, upper = c("case", "lower"), c("case", "upper")
    assert check(lower, "tea is nice, 100% - really!\n")
    assert check(lower, "école et café") and check(lower, "你好 world")
    assert not check(lower, "tea is nice. Really.") and not check(lower, "École")
    assert check(upper, "TEA IS NICE, 100%!") and check(upper, "ÉCOLE ÜBER")
    assert not check(upper, "TEA IS NICe") and not check(upper, "ÉCOLe")
    assert not check(lower, "123 !?") and not check(upper, "")  # no letters at all is not a case answer


def test_keyword_and_avoid_match_whole_words_case_insensitively():
    kw, av = c("keyword", "calm"), c("avoid", "calm")
    for text in ("It is calm.", "CALM, it is", "so (Calm)", "calm"):
        assert check(kw, text) and not check(av, text)
    for text in ("calmness helps", "becalmed", "nothing here", ""):
        assert not check(kw, text) and check(av, text)
    assert check(c("keyword", "café"), "A Café! Nice.") and not check(c("keyword", "café"), "cafés")
    assert check(c("keyword", "tomorrow"), "tomorrow's weather")


def test_no_commas_includes_fullwidth_comma():
    assert check(c("no_commas"), "no commas here. none.")
    assert not check(c("no_commas"), "one, two")
    assert not check(c("no_commas"), "中文，逗号")


def test_start_and_end_are_exact_up_to_surrounding_whitespace():
    start, end = c("start", "Sure thing."), c("end", "Hope this helps.")
    assert check(start, "  Sure thing. Tea is nice.") and check(end, "Tea is nice. Hope this helps.  \n")
    assert not check(start, "sure thing. Tea is nice.")  # exact: case matters
    assert not check(start, "Sure thing Tea is nice.") and not check(start, "Well. Sure thing.")
    assert not check(end, "Tea is nice. Hope this helps") and not check(end, "Hope this helps. Tea.")


def test_word_limit_counts_words_not_punctuation():
    text = '- "Hello, world!" It\'s fine — 42 { }'  # Hello world It's fine 42 = 5 words
    assert len(judge.words(text)) == 5
    assert check(c("word_limit", 5, relation="at_most"), text)
    assert not check(c("word_limit", 4, relation="at_most"), text)
    assert check(c("word_limit", 5, relation="at_least"), text)
    assert not check(c("word_limit", 6, relation="at_least"), text)


def test_bullets_counts_dash_space_lines_exactly():
    three = "- one\n- two\n  - three\n"
    assert check(c("bullets", 3), three)
    assert check(c("bullets", 3), "Here you go:\n" + three)  # an intro line is allowed
    assert not check(c("bullets", 2), three) and not check(c("bullets", 4), three)
    assert not check(c("bullets", 2), "* one\n* two") and not check(c("bullets", 2), "-one\n-two")
    assert not check(c("bullets", 2), "- one - two")  # one line, one bullet
    assert not check(c("bullets", 1), "- ")


def test_quotes_wrap_the_whole_answer():
    q = c("quotes")
    assert check(q, '"tea is nice."') and check(q, '  "tea is nice."\n') and check(q, "“tea is nice.”")
    assert not check(q, 'tea is "nice"') and not check(q, '"tea is nice') and not check(q, '"')
    assert not check(q, "'tea is nice'")


def test_json_accepts_code_fences_and_requires_the_key():
    j = c("json", "answer")
    assert check(j, '{"answer": "tea"}') and check(j, ' {"answer": 1, "x": 2}\n')
    assert check(j, '```json\n{"answer": "tea"}\n```') and check(j, '```\n{"answer": "tea"}\n```')
    assert not check(j, '{"Answer": "tea"}') and not check(j, '[{"answer": "tea"}]')
    assert not check(j, '{"answer": "tea"} thanks') and not check(j, "answer: tea") and not check(j, "")
    assert not check(j, '```json\n{"answer": "tea",}\n```')


def test_arithmetic_wants_the_number_only():
    a = c("arithmetic", 42, expr="40 + 2")
    for good in ("42", " 42.\n", "42.0", "+42"):
        assert check(a, good), good
    for bad in ("41", "The answer is 42.", "40 + 2 = 42", "4 2", "42!", "", "forty-two"):
        assert not check(a, bad), bad
    assert check(c("arithmetic", -3), "\u22123") and check(c("arithmetic", -3), "-3")


def test_unknown_constraint_type_is_an_error():
    with pytest.raises(ValueError, match="unknown constraint type"):
        check(c("rhyme"), "tea")


# ------------------------------------------------------------------------------------------------ the judge
def test_score_is_fraction_satisfied():
    m = meta(c("case", "lower"), c("keyword", "calm"), c("no_commas"))
    assert score("tea is calm and warm.", m) == 1.0
    assert score("Tea is calm and warm.", m) == pytest.approx(2 / 3)
    assert score("Tea, hot and sweet.", m) == 0.0


def test_degenerate_responses_score_zero():
    m = meta(c("no_commas"), c("avoid", "coffee"))
    assert score("Tea is a warm drink.", m) == 1.0
    for r in ("", "   \n", "tea drink", "Describe tea.", "describe TEA please and more",
              "tea is good " * 10):
        assert score(r, m) == 0.0, r
    # short is fine where a number or a JSON object is the answer
    assert score('{"a": 1}', meta(c("json", "a"))) == 1.0
    assert score("7", meta(c("arithmetic", 7), prompt="What is 3 + 4?")) == 1.0
    assert score(" ", meta(c("arithmetic", 7), prompt="What is 3 + 4?")) == 0.0
    # the required phrases are not an answer: alone they would get avoid, no_commas and word_limit at_most free
    m = meta(c("start", "Sure thing."), c("end", "Hope this helps."), c("avoid", "coffee"), c("no_commas"))
    assert score("Sure thing. Hope this helps.", m) == 0.0
    assert score('"Hope this helps."', m) == 0.0  # the end phrase alone, quoted: 3 words, but none of its own
    assert score("sure thing. tea rocks. hope this helps.", m) == 0.0  # 2 words of its own; any case
    assert score("Sure thing. Tea is warm. Hope this helps.", m) == 1.0
    assert score("Sure thing. Tea is warm. Hope this helps. Sure thing. Tea is warm. Hope this helps.", m) == 0.0
    assert score("Tea is warm. Green tea is warm. Tea is warm!", m) == 0.0  # a sentence said twice, any ending
    assert score("Tea is warm. Tea is warm and calm. Tea is.", meta(c("no_commas"))) == 1.0  # alike is not the same
    # prompts given as message lists (as data.read_prefs returns them) are handled too
    assert score("Describe tea.", {"prompt": [{"role": "user", "content": "Describe tea."}],
                                   "constraints": [c("no_commas")]}) == 0.0


def test_score_by_family_hand_worked():
    metas = [meta(c("case", "lower"), c("no_commas")), meta(c("case", "upper")), meta(c("no_commas"))]
    rates = score_by_family(["tea is fine, warm.", "TEA IS FINE.", ""], metas)
    assert rates == {"case": 1.0, "no_commas": 0.0}  # the empty answer fails all of its constraints
    rates = score_by_family(["tea is fine warm.", "Tea is fine.", "tea is warm"], metas)
    assert rates == {"case": 0.5, "no_commas": 1.0}


# ----------------------------------------------------------------------------------------------- the data
def read(d, name):
    with open(d / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One run of `make` with the default counts."""
    d = tmp_path_factory.mktemp("tasks")
    tasks.main(["make", "--out", str(d), "--seed", "3"])
    return d, {n: read(d, n) for n in ("sft", "prefs", "prompts", "eval", "paraphrase")}


def test_make_writes_default_counts_and_formats(made):
    _, f = made
    assert {n: len(rows) for n, rows in f.items()} == {"sft": 2000, "prefs": 2000, "prompts": 512, "eval": 200,
                                                      "paraphrase": 200}
    for r in f["sft"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["split"] == "train"
    for r in f["prefs"]:
        assert isinstance(r["prompt"], str) and r["chosen"] != r["rejected"]
    for n in ("prompts", "eval", "paraphrase"):
        assert len({r["prompt"] for r in f[n]}) == len(f[n])  # distinct prompts
        assert all(r["split"] == ("train" if n == "prompts" else n) for r in f[n])


def test_judge_scores_every_demo_1_and_every_rejected_below_1(made):
    _, f = made
    demos = ([(r["messages"][1]["content"], r) for r in f["sft"]] + [(r["chosen"], r) for r in f["prefs"]]
             + [(r["reference"], r) for r in f["eval"] + f["paraphrase"]])
    for text, r in demos:  # 4,400 demonstrations: none in a format nobody asked for
        assert score(text, r) == 1.0 and judge.unrequested(text, r) == [], r
    for r in f["prefs"]:
        assert score(r["rejected"], r) < 1.0, r
    # every family gets negatives: the rejected responses fail each family somewhere
    rates = score_by_family([r["rejected"] for r in f["prefs"]], f["prefs"])
    assert set(rates) == set(tasks.FAMILIES) and max(rates.values()) < 0.7


def test_constraints_are_compatible_and_stated_in_the_prompt(made):
    _, f = made
    for name, rows in f.items():
        seen, counts = set(), set()
        for r in rows:
            prompt = r["prompt"] if "prompt" in r else r["messages"][0]["content"]
            types = [x["type"] for x in r["constraints"]]
            seen.update(types)
            assert len(set(types)) == len(types)  # no family twice in one prompt
            counts.add(len(types))
            assert types == ["arithmetic"] or "arithmetic" not in types
            assert not any(frozenset((a, b)) in tasks.CONFLICTS for a in types for b in types)
            if "json" in types:
                assert {"type": "case", "value": "upper"} not in r["constraints"]
            for x in r["constraints"]:
                assert any(w in prompt for w in tasks.wordings(x, tasks.TEMPLATES[r["split"]])), (x, prompt)
                assert x["type"] != "arithmetic" or x["expr"] in prompt
        assert seen == set(tasks.FAMILIES), name
        assert counts == {1, 2, 3}, (name, counts)  # one to three constraints per prompt, each count occurring


def test_demonstrations_are_short(made):
    _, f = made
    n = sorted(len(judge.words(r["messages"][1]["content"])) for r in f["sft"])
    assert statistics.mean(n) <= 30 and n[int(0.9 * len(n))] <= 45 and n[-1] <= 70


def test_eval_split_is_held_out(made):
    _, f = made
    train = f["sft"] + f["prefs"] + f["prompts"]

    def values(rows, family):
        return {x.get("expr", x["value"]) for r in rows for x in r["constraints"] if x["type"] == family}

    topics = lambda rows: {r["topic"] for r in rows} - {"arithmetic"}
    for held in ("eval", "paraphrase"):
        assert topics(f[held]) and not topics(f[held]) & topics(train)
        for family in ("keyword", "avoid", "arithmetic"):
            assert values(f[held], family) and not values(f[held], family) & values(train, family), family
        assert set(tasks.TOPIC_SPLIT["eval"]) == topics(f[held])


def test_make_is_deterministic_per_seed(tmp_path):
    counts = ["--n-sft", "150", "--n-prefs", "150", "--n-prompts", "50", "--n-eval", "40"]
    for d, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        tasks.main(["make", "--out", str(tmp_path / d), "--seed", seed, *counts])
    for n in ("sft", "prefs", "prompts", "eval", "eval_prefs", "paraphrase"):
        a, b, c_ = ((tmp_path / d / f"{n}.jsonl").read_bytes() for d in "abc")
        assert a == b and a != c_, n
    assert not list(tmp_path.glob("*/*.tmp"))
    assert len(read(tmp_path / "a", "prefs")) == 150


def test_more_eval_rows_extend_the_held_out_files_and_keep_their_first_rows(made, tmp_path):
    # `make transfer` scores the demo's models on a longer paraphrase file whose first rows are the demo's own
    d, _ = made
    tasks.main(["make", "--out", str(tmp_path), "--seed", "3", "--n-eval", "260"])
    for n in ("eval", "eval_prefs", "paraphrase"):
        longer, short = read(tmp_path, n), read(d, n)
        assert len(longer) == 260 and longer[:len(short)] == short, n
    assert len({r["prompt"] for r in read(tmp_path, "paraphrase")}) == 260
    assert (tmp_path / "sft.jsonl").read_bytes() == (d / "sft.jsonl").read_bytes()


def literal(template):  # the longest fixed piece of a template: what any prompt worded by it must contain
    return max(re.split(r"\{\}", template), key=len)


def test_paraphrase_wordings_never_appear_in_training_and_vice_versa(made):
    _, f = made
    texts = lambda rows: [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in rows]
    train, para = texts(f["sft"] + f["prefs"] + f["prompts"]), texts(f["paraphrase"])
    for own, other, rows in (("train", "paraphrase", train), ("paraphrase", "train", para)):
        for key, templates in tasks.TEMPLATES[other].items():
            for t in templates:
                assert len(literal(t)) >= 8 and not any(literal(t) in p for p in rows), (own, key, t)
        for t in (t for templates in tasks.TEMPLATES[own].values() for t in templates):
            assert any(literal(t) in p for p in rows), (own, t)  # and every wording of its own is used


def test_validation_wordings_word_the_same_tasks_and_appear_in_no_default_file(made, tmp_path):
    # `make --wordings validation` words the training files with a third set, to tune for other phrasings on a seed
    # of one's own: the same seed draws the same tasks (only the sentences change), and no default file uses them
    d, f = made
    tasks.main(["make", "--out", str(tmp_path), "--seed", "3", "--n-sft", "50", "--n-prefs", "50", "--n-eval", "20",
                "--wordings", "validation"])
    texts = lambda rows: [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in rows]
    default = texts(f["sft"] + f["prefs"] + f["prompts"] + f["eval"] + f["paraphrase"])
    own = texts(read(tmp_path, "sft") + read(tmp_path, "prefs") + read(tmp_path, "prompts"))
    for key, templates in tasks.TEMPLATES["validation"].items():
        for t in templates:
            assert len(literal(t)) >= 6 and not any(literal(t) in p for p in default), (key, t)
    for t in (t for split in ("train", "paraphrase") for ts in tasks.TEMPLATES[split].values() for t in ts):
        assert not any(literal(t) in p for p in own), t
    assert sorted(tasks.TEMPLATES["validation"]) == sorted(tasks.TEMPLATES["train"])
    for name in ("sft", "prefs", "prompts"):
        mine, theirs = read(tmp_path, name), f[name][:len(read(tmp_path, name))]
        assert [(r["constraints"], r["topic"]) for r in mine] == [(r["constraints"], r["topic"]) for r in theirs]
        assert all(p != q for p, q in zip(texts(mine), texts(theirs)))
    assert read(tmp_path, "eval") == f["eval"][:20] and read(tmp_path, "paraphrase") == f["paraphrase"][:20]
    for name, key in (("sft", lambda r: r["messages"][1]["content"]), ("prefs", lambda r: r["chosen"])):
        assert [key(r) for r in read(tmp_path, name)] == [key(r) for r in f[name][:50]]  # the same demonstrations


def test_training_prompts_vary_their_wording_and_where_the_constraints_go(made):
    _, f = made
    for key, templates in tasks.TEMPLATES["train"].items():
        assert len(templates) >= 3, key  # several wordings of every request and every constraint
    requests = [t for key in ("describe", "tip", "compute") for t in tasks.TEMPLATES["train"][key]]
    first = [any(r["prompt"].startswith(literal(t)) for t in requests) for r in f["prompts"]]
    assert 0.35 < sum(first) / len(first) < 0.65  # the request first in about half, the constraints first otherwise


def test_counterfactual_negatives_by_default(made):
    _, f = made
    prefs, asked = f["prefs"], lambda r: {x["type"] for x in r["constraints"]}
    misfires = [r for r in prefs if judge.unrequested(r["rejected"], r)]
    assert 0.33 < len(misfires) / len(prefs) < 0.47
    quoted = [r for r in misfires if judge.unrequested(r["rejected"], r) == ["quotes"]]
    assert 0.45 < len(quoted) / len(misfires) < 0.7  # half go to quotes first; others reach quotes in the random order
    capitals = [r for r in misfires if judge.unrequested(r["rejected"], r) == ["capitals"]]
    assert 0.12 < len(capitals) / len(misfires) < 0.3  # 30% go to capitals first, less the prompts that ask for a case
    for r in misfires:  # the demonstration itself, in a format nobody asked for
        assert r["rejected"] in [rewrite(r["chosen"]) for rewrite in answers.MISFIRES.values()], r
    assert {fmt for r in misfires for fmt in judge.unrequested(r["rejected"], r)} == set(judge.FORMATS)
    assert any(asked(r) == {"arithmetic"} for r in misfires)  # '"42"' is not the number only either
    # a prompt that asks for a format and more: some rejected answers keep every format and break something else
    formats = [r for r in prefs if asked(r) & answers.FORMAT_FAMILIES and asked(r) - answers.FORMAT_FAMILIES]
    kept = [r for r in formats if r not in misfires
            and all(check(x, r["rejected"]) for x in r["constraints"] if x["type"] in answers.FORMAT_FAMILIES)]
    assert len(kept) / len(formats) > 0.3


def test_said_twice_and_the_phrases_alone_are_rejected_in_a_tenth_of_the_prompts_each(made):
    _, f = made
    text = [r for r in f["prefs"] if r["topic"] != "arithmetic"]
    twice = [r for r in text if r["rejected"] in (r["chosen"] + " " + r["chosen"], r["chosen"] + "\n" + r["chosen"])]
    phrases = lambda r: [x["value"] for x in r["constraints"] if x["type"] in ("start", "end")]
    with_phrases = [r for r in text if phrases(r)]
    alone = [r for r in with_phrases if r["rejected"] == " ".join(phrases(r))]
    assert 0.07 < len(twice) / len(text) < 0.13 and 0.05 < len(alone) / len(with_phrases) < 0.15
    assert all(score(r["rejected"], r) == 0.0 for r in twice + alone)  # degenerate to the judge; chosen scores 1
    m = {"prompt": "Describe tea.", "constraints": [{"type": "start", "value": "Sure."}, {"type": "no_commas"}]}
    assert answers.shortcut(m, "- Tea.\n- Warm.", "x", p=1.0) == "- Tea.\n- Warm.\n- Tea.\n- Warm."  # bullets: a new line
    assert answers.shortcut(m, "Sure. Tea is warm.", "x", p=0.0) == "x"


@pytest.mark.parametrize("argv, needle", [
    (["make", "--out", "X", "--n-sft", "-1"], "--n-sft must be >= 0"),
    (["make", "--out", "X", "--n-eval", "-5"], "--n-eval must be >= 0"),
    (["make", "--seed", "1"], "--out is required"),
    (["make", "--out", "X", "--n-prefs", "many"], "--n-prefs"),
    (["frobnicate"], "usage"),
])
def test_bad_flags_exit_2_with_one_error_line(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / "out") if a == "X" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        tasks.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_help_exits_0_and_says_what_each_command_does():
    from conftest import run_cli
    r = run_cli(["-m", "nanoalign.tasks", "--help"])
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("usage: python -m nanoalign.tasks {make,pairs}")
    assert "nanoalign.tasks make --out" in r.stdout and "nanoalign.tasks pairs --model" in r.stdout
    for command, says in (("make", "deterministically from --seed"), ("pairs", "best vs worst of --k samples")):
        r = run_cli(["-m", "nanoalign.tasks", command, "--help"])
        assert r.returncode == 0 and says in r.stdout and "Config(" not in r.stdout, r.stdout
        assert "--n-eval" in r.stdout if command == "make" else "--label-noise" in r.stdout


# ----------------------------------------------------------------------------------------- on-policy pairs
def test_pairs_are_best_vs_worst_and_ties_are_dropped_and_counted():
    msgs = [{"role": "user", "content": "Hi"}]
    rows = [{"prompt": "p0", "topic": "tea", "line": 1}, {"prompt": "p1", "topic": "tea", "line": 2},
            {"prompt": msgs, "topic": "x", "reference": "r", "line": 3}, {"prompt": "p3", "line": 4}]
    texts = ["a", "b", "c", "d", "e", "f", "g", "h", "g", "y", "y", "y"]
    scores = [0.5, 1.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.25, 1.0, 0.2, 0.1, 0.2]  # row 3: one text, RM float noise
    pairs, stats = best_vs_worst(rows, texts, scores, k=3)
    assert stats == {"pairs": 2, "ties": 2, "flipped": 0, "prompts": 4}
    assert pairs == [
        {"prompt": "p0", "chosen": "b", "rejected": "c", "topic": "tea", "chosen_score": 1.0, "rejected_score": 0.0},
        {"prompt": msgs, "chosen": "g", "rejected": "h", "topic": "x", "chosen_score": 1.0, "rejected_score": 0.25}]


def test_all_pairs_are_every_non_tied_pair_of_distinct_texts_best_first():
    rows = [{"prompt": f"p{i}", "line": i + 1} for i in range(4)]
    texts = ["a", "b", "c", "d", "e", "f", "g", "h", "g", "y", "y", "y"]
    scores = [0.5, 1.0, 0.0, 0.5, 0.5, 0.5, 1.0, 0.25, 1.0, 0.2, 0.1, 0.2]
    pairs, stats = best_vs_worst(rows, texts, scores, k=3, all_pairs=True)
    assert stats == {"pairs": 4, "ties": 2, "flipped": 0, "prompts": 4}  # p1: all 0.5; p3: one text
    assert [(p["prompt"], p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == [
        ("p0", "b", "a", 1.0, 0.5), ("p0", "b", "c", 1.0, 0.0), ("p0", "a", "c", 0.5, 0.0),
        ("p2", "g", "h", 1.0, 0.25)]  # p2's second "g" is the same text: one pair, not two
    ends = best_vs_worst(rows, texts, scores, k=3)[0]
    assert [(p["chosen"], p["rejected"]) for p in ends] == [("b", "c"), ("g", "h")]  # best vs worst is a subset


def noisy_flips(T, seed=0, n=2000):
    rows = [{"prompt": f"p{i}"} for i in range(n)]
    pairs, stats = best_vs_worst(rows, ["good", "bad"] * n, [1.0, 0.0] * n, 2, label_noise=T, seed=seed)
    assert stats["flipped"] == sum(p["chosen"] == "bad" for p in pairs)
    assert all((p["chosen_score"] < p["rejected_score"]) == (p["chosen"] == "bad") for p in pairs)
    return pairs, stats["flipped"] / n


def test_label_noise_flips_with_bradley_terry_probability():
    assert noisy_flips(0.0)[1] == 0.0
    assert abs(noisy_flips(1e6)[1] - 0.5) < 0.045  # a coin flip; sd 0.011 at n = 2000
    assert abs(noisy_flips(1.0)[1] - (1 - 1 / (1 + math.exp(-1)))) < 0.04  # 1 - sigmoid(1) = 0.269; sd 0.010
    assert noisy_flips(1.0, seed=5)[0] == noisy_flips(1.0, seed=5)[0] != noisy_flips(1.0, seed=6)[0]


GOOD, HALF, BAD = "tea is warm and calm.", "Tea is warm and calm.", "Tea, warm, ok."  # gold 1, 1/2, 0


def stub_sample(model, tok, prompts, n=1, temperature=0.7, max_new_tokens=96, seed=0, batch_size=16, bf16=False):
    pools = {"Describe tea.": (GOOD, HALF, BAD), "Describe milk.": (HALF, HALF), "Describe ice.": (BAD, HALF)}
    rng = random.Random(seed)
    return [([1], [5], rng.choice(pools[p]), True) for p in prompts for _ in range(n)]


def test_pairs_cli_with_gold_judge(tmp_path, monkeypatch, capsys):
    from nanoalign import evaluate
    cons = [{"type": "case", "value": "lower"}, {"type": "no_commas", "value": True}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe {t}.", "constraints": cons, "id": t}) + "\n"
                               for t in ("tea", "milk", "ice")))
    monkeypatch.setattr(evaluate, "sample", stub_sample)
    out = tmp_path / "sub" / "pairs.jsonl"
    stats = tasks.main(["pairs", "--model", "tiny", "--prompts", str(prompts), "--k", "6", "--out", str(out)])
    assert stats == {"pairs": 2, "ties": 1, "flipped": 0, "prompts": 3}  # milk: every sample scores 1/2
    assert "1 of 3 prompts dropped as ties" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["tea", "ice"] and all(r["constraints"] == cons for r in rows)
    for r in rows:
        assert score(r["chosen"], r) == r["chosen_score"] > score(r["rejected"], r) == r["rejected_score"]
        drawn = [score(s[2], r) for s in stub_sample(0, 0, [r["prompt"]], 6)]  # the same draw (seed 0)
        assert (r["chosen_score"], r["rejected_score"]) == (max(drawn), min(drawn))
    stats = tasks.main(["pairs", "--model", "tiny", "--prompts", str(prompts), "--k", "6", "--all-pairs", "--out",
                        str(out)])  # tea drew all three answers, ice two, milk one: 3 + 1 pairs
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["pairs"] == 4 and stats["ties"] == 1
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [
        ("tea", GOOD, HALF), ("tea", GOOD, BAD), ("tea", HALF, BAD), ("ice", HALF, BAD)]


def test_pairs_counterfactuals_reject_each_chosen_answer_in_a_format_nobody_asked_for(tmp_path, monkeypatch):
    from nanoalign import evaluate
    cons = [{"type": "case", "value": "lower"}, {"type": "no_commas", "value": True}]
    free = [{"type": "no_commas", "value": True}]  # ice leaves the case free: its counterfactual is lowercase
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe {t}.", "constraints": c, "id": t}) + "\n"
                               for t, c in (("tea", cons), ("milk", cons), ("ice", free))))
    monkeypatch.setattr(evaluate, "sample", stub_sample)
    out = tmp_path / "pairs.jsonl"
    tasks.main(["pairs", "--model", "tiny", "--prompts", str(prompts), "--k", "6", "--counterfactuals", "--out",
                str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["tea", "ice", "tea", "ice"]  # the best-vs-worst pairs, then one more each
    for pair, extra in zip(rows[:2], rows[2:]):
        assert (extra["chosen"], extra["chosen_score"]) == (pair["chosen"], pair["chosen_score"])
        assert judge.unrequested(extra["rejected"], extra) and not judge.unrequested(extra["chosen"], extra)
        assert extra["rejected_score"] == score(extra["rejected"], extra) < extra["chosen_score"]
        assert extra["chosen"].rstrip(".").lower() in extra["rejected"].lower()  # the same words, in a new format
    assert (rows[3]["chosen"], rows[3]["rejected"]) == (HALF, HALF.lower())


def test_pairs_on_tiny_model_with_rm_judge_are_deterministic_per_seed(made, rm_dir, tmp_path):
    from nanoalign import evaluate, hub
    d, _ = made
    args = ["pairs", "--model", "tiny", "--prompts", str(d / "prompts.jsonl"), "--k", "3", "--limit", "6",
            "--max-new-tokens", "8", "--judge", str(rm_dir)]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        stats = tasks.main(args + ["--seed", seed, "--out", str(tmp_path / f"{name}.jsonl")])
        assert stats["pairs"] + stats["ties"] == 6
    a, b, c_ = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c_
    rows = [json.loads(line) for line in a.decode().splitlines()]
    rm, tok = hub.load(str(rm_dir))
    for r in rows:
        ch, rj = evaluate.rm_scores(rm.eval(), tok, [r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert ch == pytest.approx(r["chosen_score"], abs=1e-4) and rj == pytest.approx(r["rejected_score"], abs=1e-4)
        assert ch > rj and r["split"] == "train" and r["constraints"]


@pytest.mark.parametrize("extra, needle", [
    (["--k", "1"], "--k must be >= 2"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--label-noise", "-1"], "--label-noise must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--model", ""], "--model is required"),
    (["--judge", "nonesuch"], "nonesuch"),
    ([], "no pairs left"),  # a random tiny model under the gold judge: every completion is degenerate (0)
])
def test_pairs_bad_flags_exit_2_with_one_error_line(made, tmp_path, capsys, extra, needle):
    d, _ = made
    argv = ["pairs", "--model", "tiny", "--prompts", str(d / "prompts.jsonl"), "--out", str(tmp_path / "p.jsonl"),
            "--limit", "2", "--max-new-tokens", "4", *extra]
    with pytest.raises(SystemExit) as e:
        tasks.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.jsonl").exists()
