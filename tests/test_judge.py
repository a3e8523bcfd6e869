import pytest

from nanoalign.cli import UserError
from nanoalign.judge import check_rows, score, unrequested, unrequested_rates


def c(type_, value=True, **extra):
    return {"type": type_, "value": value, **extra}


def meta(*cons, prompt="Describe tea."):
    return {"prompt": prompt, "constraints": list(cons)}


KEYWORD = meta(c("keyword", "calm"))
SUM = meta(c("arithmetic", 42, expr="40 + 2"), prompt="What is 40 + 2?")


def test_unrequested_names_each_format_the_prompt_did_not_ask_for():
    assert unrequested("Tea is calm and warm.", KEYWORD) == []
    assert unrequested('"Tea is calm."', KEYWORD) == ["quotes"] == unrequested("“Tea is calm.”", KEYWORD)
    assert unrequested("- Tea is calm.\n- It is warm.", KEYWORD) == ["bullets"]
    assert unrequested("Here:\n* Tea is calm.", KEYWORD) == ["bullets"]  # any bullet line, any common mark
    assert unrequested("TEA IS CALM.", KEYWORD) == ["capitals"]
    assert unrequested('{"answer": "Tea is calm."}', KEYWORD) == ["json"]
    assert unrequested('```json\n{"a": 1}\n```', KEYWORD) == ["json"]
    assert unrequested("tea is calm and warm.", KEYWORD) == ["lowercase"]
    assert unrequested('"TEA IS CALM."', KEYWORD) == ["quotes", "capitals"]
    # near misses: quoted words inside, a dash mid-line, an acronym, a JSON list, a short lowercase reply
    for text in ('Tea is "calm".', "Tea - calm - warm.", "NASA likes tea.", "[1, 2]", "calm tea", "OK TEA", "42"):
        assert unrequested(text, KEYWORD) == [], text


def test_a_requested_format_is_never_unrequested():
    assert unrequested('"Tea is calm."', meta(c("quotes"))) == []
    assert unrequested("- Tea is calm.\n- It is warm.", meta(c("bullets", 2))) == []
    assert unrequested('{"answer": "Tea is calm."}', meta(c("json", "answer"))) == []
    # a case prompt's answer in the other case breaks "case"; it is not an unrequested format on top of that
    lower = meta(c("case", "lower"))
    assert unrequested("tea is calm.", lower) == [] == unrequested("TEA IS CALM.", lower)
    assert unrequested("tea is calm.", meta(c("case", "upper"))) == []


def test_case_is_never_judged_on_numbers_or_json():
    j = meta(c("json", "answer"))
    assert unrequested('{"answer": "tea is calm and warm."}', j) == [] == unrequested('{"answer": "TEA IS CALM."}', j)
    assert unrequested('{"answer": "tea is calm and warm."}', KEYWORD) == ["json"]  # JSON, not lowercase prose
    assert unrequested("the answer is forty two.", SUM) == []
    assert unrequested("42", SUM) == [] and unrequested(" -7.\n", SUM) == []
    assert unrequested('"42"', SUM) == ["quotes"] and unrequested('{"answer": 42}', SUM) == ["json"]


def test_score_counts_each_unrequested_format_as_one_more_failed_constraint():
    m = meta(c("keyword", "calm"), c("no_commas"))
    assert score("Tea is calm and warm.", m) == 1.0  # nothing unrequested: as before
    assert score('"Tea is calm and warm."', m) == pytest.approx(2 / 3)
    assert score('"TEA IS CALM AND WARM."', m) == pytest.approx(2 / 4)
    assert score('"Tea is calm, warm."', m) == pytest.approx(1 / 3)  # the comma fails too
    assert score("42", SUM) == 1.0 and score('"42"', SUM) == 0.0  # the number only, and no quotes
    j = meta(c("json", "answer"), c("case", "lower"))
    assert score('{"answer": "tea is calm."}', j) == 1.0
    assert score('"tea is calm."', meta(c("quotes"), c("case", "lower"))) == 1.0
    # quoted, it no longer begins with the phrase: one requested constraint broken and one format unasked
    assert score('"Sure thing. Tea is calm."', meta(c("start", "Sure thing."), c("keyword", "calm"))) == 1 / 3


def test_unrequested_rates_hand_worked():
    metas = [KEYWORD, KEYWORD, meta(c("quotes")), meta(c("case", "lower")), SUM]
    texts = ['"Tea is calm."', "tea is calm.", '"tea is calm."', "tea is calm.", "42"]
    res = unrequested_rates(texts, metas)
    assert res["unrequested_rate"] == pytest.approx(3 / 5)  # the 1st, 2nd and 3rd (lowercase, not its quotes)
    assert res["unrequested_by_format"] == pytest.approx({
        "quotes": 1 / 4,  # every prompt but the quotes one
        "bullets": 0.0, "json": 0.0,
        "capitals": 0.0,  # all but the case prompt
        "lowercase": 2 / 3})  # not for the case prompt nor for arithmetic
    assert "bullets" not in unrequested_rates(["- a b c"], [meta(c("bullets", 1))])["unrequested_by_format"]


def test_check_rows_names_a_row_the_judge_cannot_score():
    check_rows([KEYWORD, SUM], "f.jsonl")
    for bad in ([], [c("rhyme")], [{"value": 1}]):  # no constraints at all is not a score of 1 either
        with pytest.raises(UserError, match="f.jsonl:3: task metadata the gold judge cannot use"):
            check_rows([KEYWORD, {"prompt": "Describe tea.", "constraints": bad, "line": 3}], "f.jsonl")
