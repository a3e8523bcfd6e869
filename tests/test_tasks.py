import json
import statistics

import pytest

from nanoalign import tasks
from nanoalign.tasks import check, score, score_by_family


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
    assert len(tasks.words(text)) == 5
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
    return d, {n: read(d, n) for n in ("sft", "prefs", "prompts", "eval")}


def test_make_writes_default_counts_and_formats(made):
    _, f = made
    assert {n: len(rows) for n, rows in f.items()} == {"sft": 2000, "prefs": 2000, "prompts": 512, "eval": 200}
    for r in f["sft"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["split"] == "train"
    for r in f["prefs"]:
        assert isinstance(r["prompt"], str) and r["chosen"] != r["rejected"]
    for n in ("prompts", "eval"):
        assert len({r["prompt"] for r in f[n]}) == len(f[n])  # distinct prompts
        assert all(r["split"] == ("eval" if n == "eval" else "train") for r in f[n])


def test_judge_scores_every_demo_1_and_every_rejected_below_1(made):
    _, f = made
    for r in f["sft"]:
        assert score(r["messages"][1]["content"], r) == 1.0, r
    for r in f["prefs"]:
        assert score(r["chosen"], r) == 1.0, r
        assert score(r["rejected"], r) < 1.0, r
    for r in f["eval"]:
        assert score(r["reference"], r) == 1.0, r
    # every family gets negatives: the rejected responses fail each family somewhere
    rates = score_by_family([r["rejected"] for r in f["prefs"]], f["prefs"])
    assert set(rates) == set(tasks.FAMILIES) and max(rates.values()) < 0.7


def test_constraints_are_compatible_and_stated_in_the_prompt(made):
    _, f = made
    for name, rows in f.items():
        seen = set()
        for r in rows:
            prompt = r["prompt"] if "prompt" in r else r["messages"][0]["content"]
            types = [x["type"] for x in r["constraints"]]
            seen.update(types)
            assert 1 <= len(types) <= 3 and len(set(types)) == len(types)
            assert types == ["arithmetic"] or "arithmetic" not in types
            assert not any(frozenset((a, b)) in tasks.CONFLICTS for a in types for b in types)
            if "json" in types:
                assert {"type": "case", "value": "upper"} not in r["constraints"]
            for x in r["constraints"]:
                assert x["type"] == "arithmetic" and x["expr"] in prompt or tasks.describe(x) in prompt
        assert seen == set(tasks.FAMILIES), name


def test_demonstrations_are_short(made):
    _, f = made
    n = sorted(len(tasks.words(r["messages"][1]["content"])) for r in f["sft"])
    assert statistics.mean(n) <= 30 and n[int(0.9 * len(n))] <= 45 and n[-1] <= 70


def test_eval_split_is_held_out(made):
    _, f = made
    train = f["sft"] + f["prefs"] + f["prompts"]

    def values(rows, family):
        return {x.get("expr", x["value"]) for r in rows for x in r["constraints"] if x["type"] == family}

    topics = lambda rows: {r["topic"] for r in rows} - {"arithmetic"}
    assert topics(f["eval"]) and not topics(f["eval"]) & topics(train)
    for family in ("keyword", "avoid", "arithmetic"):
        assert values(f["eval"], family) and not values(f["eval"], family) & values(train, family), family
    assert set(tasks.TOPIC_SPLIT["eval"]) == topics(f["eval"])


def test_make_is_deterministic_per_seed(tmp_path):
    counts = ["--n-sft", "150", "--n-prefs", "150", "--n-prompts", "50", "--n-eval", "40"]
    for d, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        tasks.main(["make", "--out", str(tmp_path / d), "--seed", seed, *counts])
    for n in ("sft", "prefs", "prompts", "eval"):
        a, b, c_ = ((tmp_path / d / f"{n}.jsonl").read_bytes() for d in "abc")
        assert a == b and a != c_, n
    assert not list(tmp_path.glob("*/*.tmp"))
    assert len(read(tmp_path / "a", "prefs")) == 150


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
