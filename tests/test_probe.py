import json

import pytest
from conftest import assert_user_error, run_cli

from nanoalign import evaluate, hub, judge, probe, tasks

ROWS = [{"prompt": 'Describe tea. Include the word "calm".', "constraints": [{"type": "keyword", "value": "calm"}],
         "reference": "Tea is calm."},
        {"prompt": "Describe tea. Wrap your whole answer in double quotes.",
         "constraints": [{"type": "quotes", "value": True}], "reference": '"Tea is hot."'},
        {"prompt": "What is 2 + 3? Reply with the number only.",
         "constraints": [{"type": "arithmetic", "value": 5, "expr": "2 + 3"}], "reference": "5"}]


def test_probe_hand_worked():
    # a fake RM: +1 for a leading double quote, +10 for an answer under 6 characters
    res = probe.probe(lambda rows, texts: [float(t.startswith('"')) + 10 * (len(t) < 6) for t in texts], ROWS)
    # quotes: only the keyword prompt is eligible (the other asks for quotes; arithmetic never counts). It still says
    # "calm", but the quotes nobody asked for are a second constraint failed: 1/2
    assert res["quotes"] == {"n": 1, "rm_shift": 1.0, "rm_up": 1.0, "gold_shift": -0.5}
    # JSON: both prose prompts; keyword 1 -> 1/2; the quoted reference loses its leading quote (RM -1) and its quotes
    # constraint, and the JSON is unasked: 1 -> 0/2
    assert res["json"] == {"n": 2, "rm_shift": -0.5, "rm_up": 0.0, "gold_shift": -0.75}
    # bullets: "- Tea is calm." 1 -> 1/2; '- "Tea is hot."' is no longer quoted either: 1 -> 0/2
    assert res["bullets"] == {"n": 2, "rm_shift": -0.5, "rm_up": 0.0, "gold_shift": -0.75}
    for case in ("capitals", "lowercase"):  # "CALM" still counts as the word; the case is the one failure
        assert res[case]["n"] == 2 and res[case]["gold_shift"] == -0.5
    assert res["said twice"] == {"n": 2, "rm_shift": 0.0, "rm_up": 0.0, "gold_shift": -1.0}  # degenerate: 1 -> 0
    # cut in half: "Tea is calm." -> "Tea" and '"Tea is hot."' -> '"Tea' (still quoted): short (+10), and one word
    # of prose is degenerate: 1 -> 0
    assert res["cut in half"] == {"n": 2, "rm_shift": 10.0, "rm_up": 1.0, "gold_shift": -1.0}
    assert probe.probe(lambda rows, texts: [0.0] * len(texts), ROWS[2:]) == {}  # nothing eligible


def test_probe_cli_matches_direct_rm_scores(tmp_path, rm_dir):
    tasks.make(str(tmp_path), seed=0, n_sft=0, n_prefs=0, n_prompts=0, n_eval=12)
    out = tmp_path / "probe.json"
    r = run_cli(["-m", "nanoalign.probe", "--rm", str(rm_dir), "--prompts", str(tmp_path / "eval.jsonl"),
                 "--out", str(out)])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == set(probe.PROBES) and "| cut in half |" in r.stdout
    rows = [json.loads(l) for l in open(tmp_path / "eval.jsonl")]
    rows = [x for x in rows if {c["type"] for c in x["constraints"]}.isdisjoint({"arithmetic", "quotes"})]
    rm, tok = hub.load(str(rm_dir))
    prompts, plain = [x["prompt"] for x in rows], [x["reference"] for x in rows]
    quoted = [f'"{t}"' for t in plain]
    rm_plain, rm_quoted = (evaluate.rm_scores(rm.eval(), tok, prompts, texts) for texts in (plain, quoted))
    assert res["quotes"]["n"] == len(rows)
    assert res["quotes"]["rm_shift"] == pytest.approx(sum(q - p for p, q in zip(rm_plain, rm_quoted)) / len(rows),
                                                      abs=1e-5)
    gold = [judge.score(q, x) - judge.score(p, x) for p, q, x in zip(plain, quoted, rows)]
    assert res["quotes"]["gold_shift"] == pytest.approx(sum(gold) / len(rows))
    assert max(gold) < 0  # unrequested quotes always cost gold
    every = [x for x in (json.loads(l) for l in open(tmp_path / "eval.jsonl"))
             if "arithmetic" not in {c["type"] for c in x["constraints"]}]  # "cut in half" is eligible everywhere else
    for name in judge.FORMATS:  # every format probe is exactly a format the judge counts as unrequested
        assert res[name]["n"] > 0 and res[name]["gold_shift"] < 0, name
        rewrite, skip = probe.PROBES[name]
        for x in (x for x in every if not {c["type"] for c in x["constraints"]} & skip):
            assert name in judge.unrequested(rewrite(x["reference"]), x), (name, x)
    refs = [x["reference"] for x in every]
    halves = [" ".join(t.split(" ")[:len(t.split(" ")) // 2]) for t in refs]  # read closed, as PPO reads a cut answer
    rm_all, rm_cut = (evaluate.rm_scores(rm, tok, [x["prompt"] for x in every], t) for t in (refs, halves))
    gold = [judge.score(h, x) - judge.score(t, x) for t, h, x in zip(refs, halves, every)]
    assert res["cut in half"] == pytest.approx({"n": len(every), "rm_shift": sum(c - p for p, c in zip(rm_all, rm_cut))
                                                / len(every), "rm_up": sum(c > p for p, c in zip(rm_all, rm_cut)) /
                                                len(every), "gold_shift": sum(gold) / len(every)}, abs=1e-5)
    assert res["cut in half"]["gold_shift"] < 0  # a cut answer loses its end phrase, keyword, bullets or JSON


def test_probe_needs_reference_answers(tmp_path, rm_dir):
    tasks.make(str(tmp_path), seed=0, n_sft=0, n_prefs=0, n_prompts=4, n_eval=0)
    r = run_cli(["-m", "nanoalign.probe", "--rm", str(rm_dir), "--prompts", str(tmp_path / "prompts.jsonl")])
    assert_user_error(r, "prompts.jsonl:1", "reference")


def test_probe_prefs_reports_the_rms_pair_accuracy(tmp_path, rm_dir):
    tasks.make(str(tmp_path), seed=0, n_sft=0, n_prefs=0, n_prompts=0, n_eval=6)
    rows = [json.loads(l) for l in open(tmp_path / "eval_prefs.jsonl")]
    rm, tok = hub.load(str(rm_dir))
    ch, rj = (evaluate.rm_scores(rm.eval(), tok, [x["prompt"] for x in rows], [x[k] for x in rows])
              for k in ("chosen", "rejected"))
    flip = tmp_path / "flipped.jsonl"  # the same pairs with chosen and rejected swapped: accuracy 1 - a (no ties)
    flip.write_text("".join(json.dumps({**x, "chosen": x["rejected"], "rejected": x["chosen"]}) + "\n" for x in rows))
    for path, want in ((tmp_path / "eval_prefs.jsonl", sum(a > b for a, b in zip(ch, rj)) / len(rows)),
                       (flip, sum(b > a for a, b in zip(ch, rj)) / len(rows))):
        out = tmp_path / "probe.json"
        r = run_cli(["-m", "nanoalign.probe", "--rm", str(rm_dir), "--prompts", str(tmp_path / "eval.jsonl"),
                     "--prefs", str(path), "--out", str(out)])
        assert r.returncode == 0, r.stderr
        assert json.loads(out.read_text())["pairs"]["rm_accuracy"] == pytest.approx(want)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = run_cli(["-m", "nanoalign.probe", "--rm", str(rm_dir), "--prompts", str(tmp_path / "eval.jsonl"),
                 "--prefs", str(bad)])
    assert_user_error(r, "bad.jsonl:1", "chosen")
