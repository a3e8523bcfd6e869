"""nanoalign.arena: Bradley–Terry ratings against hand-worked cases, votes -> TRL pairs, bad requests that change no
file, a hostile answer shown as text, concurrent votes, a killed server that restarts and appends, the gold annotator,
the loop closed through one train_dpo.py step, and a real headless Chromium voting by mouse and keyboard."""
import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, run_cli

from nanoalign import arena, arena_votes, cli, hub, judge, tasks
from nanoalign.data import read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script></div>& &lt;b&gt;'


def vote_row(a, b, winner, prompt="p", ans=("x", "y")):
    return {"prompt": prompt, "model_a": a, "model_b": b, "answer_a": ans[0], "answer_b": ans[1], "winner": winner}


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def task_rows(data, name="prompts"):
    return read_prompts(str(data / f"{name}.jsonl"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small task suite: prompts.jsonl (task rows) and eval.jsonl (with reference answers)."""
    d = tmp_path_factory.mktemp("data")
    tasks.make(str(d), seed=0, n_sft=1, n_prefs=1, n_prompts=12, n_eval=12)
    return d


@pytest.fixture(scope="module")
def models():
    tiny = hub.load("tiny")
    return {"a": tiny, "b": tiny}


@contextlib.contextmanager
def served(tmp_path, models, rows=(), **kw):
    """An arena on a free loopback port, serving on a background thread; yields (base url, Arena)."""
    cfg = arena.Config(**{"out": str(tmp_path / "votes"), "port": 0, "max_new_tokens": 8, **kw})
    httpd, a = arena.make_server(cfg, models, list(rows), arena_votes.VoteLog(cfg.out))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", a
    finally:
        httpd.shutdown()
        httpd.server_close()


def call(url, body=None, headers=None, method=None):
    """-> (status, parsed JSON reply)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if headers is None else headers
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------------- ratings
def test_bradley_terry_matches_hand_worked_ratings():
    # two models, A beat B 3 times of 4: the MLE has p_A / p_B = 3, so R_A - R_B = 400 log10 3 = 190.85, mean 1000
    r = arena_votes.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), prior=0)
    assert r == pytest.approx([1000 + 200 * math.log10(3), 1000 - 200 * math.log10(3)], abs=1e-3)
    # three models whose results are exactly what strengths 4 : 2 : 1 predict (A-B 2:1, B-C 2:1, A-C 4:1): the score
    # equations hold at p = (4, 2, 1), so the ratings are 120.41 apart (400 log10 2), centred on B
    W = np.array([[0, 2, 4], [1, 0, 2], [1, 1, 0]], dtype=float)
    r = arena_votes.bradley_terry(W, prior=0)
    assert r == pytest.approx([1000 + 400 * math.log10(2), 1000, 1000 - 400 * math.log10(2)], abs=1e-3)
    # the default prior adds one game split half and half: A 3.5 of 5 -> 400 log10(3.5 / 1.5) = 147.19
    r = arena_votes.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert r[0] - r[1] == pytest.approx(400 * math.log10(7 / 3), abs=1e-3)
    # an unbeaten model still gets a finite rating: 1.5 : 0.5 -> 400 log10 3
    r = arena_votes.bradley_terry(np.array([[0.0, 1.0], [0.0, 0.0]]))
    assert r[0] - r[1] == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_leaderboard_counts_ties_as_half_and_bootstrap_narrows_with_votes():
    # x beat y twice (once from each side), lost once, tied once: x scores 2.5 of 4, +0.5 prior -> 3 : 2
    votes = [vote_row("x", "y", "A"), vote_row("y", "x", "B"), vote_row("x", "y", "B"), vote_row("y", "x", "tie")]
    board = arena_votes.leaderboard(votes, n_boot=50)
    assert [r["model"] for r in board] == ["x", "y"] and [r["votes"] for r in board] == [4, 4]
    assert board[0]["rating"] - board[1]["rating"] == pytest.approx(400 * math.log10(3 / 2), abs=1e-3)
    # both-bad counts as a tie too
    assert arena_votes.leaderboard([vote_row("x", "y", "both_bad")] * 3)[0]["rating"] == pytest.approx(1000)
    few = [vote_row("x", "y", "A")] * 6 + [vote_row("x", "y", "B")] * 4
    widths = []
    for k in (1, 8):
        x = next(r for r in arena_votes.leaderboard(few * k, n_boot=300, seed=1) if r["model"] == "x")
        assert x["lo"] <= x["rating"] <= x["hi"]
        widths.append(x["hi"] - x["lo"])
    assert widths[1] < 0.6 * widths[0]  # 8x the votes: about 1/sqrt(8) the width


def test_ratings_command_prints_the_table(tmp_path):
    p = tmp_path / "votes.jsonl"
    p.write_text("".join(json.dumps(v) + "\n" for v in [vote_row("big", "small", "A")] * 3
                         + [vote_row("small", "big", "A")]))
    r = run_cli(["-m", "nanoalign.arena", "ratings", str(p)])
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["big", "small"] and [row[-1] for row in rows] == ["4", "4"]
    assert float(rows[0][1]) - float(rows[1][1]) == pytest.approx(400 * math.log10(3.5 / 1.5), abs=1)
    p.write_text(json.dumps(vote_row("a", "b", "A")) + "\n" + '{"prompt": "p", "winner": "maybe"}\n')
    assert_user_error(run_cli(["-m", "nanoalign.arena", "ratings", str(p)]), f"{p}:2: not a vote")


# ------------------------------------------------------------------------------------------------------ votes
def test_votes_become_trl_pairs_and_prefs_is_rebuilt_from_votes(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert arena_votes.vote_to_pref(vote_row("m", "n", "A", ans=("left", "right"))) == {
        "prompt": "p", "chosen": "left", "rejected": "right"}
    assert arena_votes.vote_to_pref(vote_row("m", "n", "B", prompt=msgs, ans=("left", "right"))) == {
        "prompt": msgs, "chosen": "right", "rejected": "left"}
    assert arena_votes.vote_to_pref(vote_row("m", "n", "tie")) is None
    assert arena_votes.vote_to_pref(vote_row("m", "n", "both_bad")) is None
    log = arena_votes.VoteLog(str(tmp_path))
    for w in ("A", "tie", "B", "both_bad"):
        log.append({"prompt": "q", "id": "row-7"}, ("m", "n"), ("left", "right"), w, "human")
    votes = lines(tmp_path / "votes.jsonl")
    assert [v["winner"] for v in votes] == ["A", "tie", "B", "both_bad"] and votes[0]["prompt_id"] == "row-7"
    assert lines(tmp_path / "prefs.jsonl") == [{"prompt": "q", "chosen": "left", "rejected": "right"},
                                               {"prompt": "q", "chosen": "right", "rejected": "left"}]
    (tmp_path / "prefs.jsonl").write_text("")  # as if the server died between the two appends
    assert len(arena_votes.VoteLog(str(tmp_path)).votes) == 4 and len(lines(tmp_path / "prefs.jsonl")) == 2


# ------------------------------------------------------------------------------------------------------ server
def test_bad_requests_get_a_4xx_reason_and_change_no_file(tmp_path, data, models):
    rows = task_rows(data)
    with served(tmp_path, models, rows) as (url, a):
        code, pair = call(url + "/api/pair", {})
        assert code == 200 and call(url + "/api/vote", {"id": pair["id"], "winner": "A"})[0] == 200
        out = tmp_path / "votes"
        before = {p: (out / p).read_bytes() for p in os.listdir(out)}
        served_id = pair["id"]
        bad = [  # (body, headers, method, path, expected status)
            (b"{not json", None, "POST", "/api/vote", 400),
            (b"[1, 2]", None, "POST", "/api/vote", 400),
            (b'"\\ud800', None, "POST", "/api/vote", 400),
            ({"id": "0123456789abcdef", "winner": "A"}, None, "POST", "/api/vote", 404),  # never served
            ({"id": ["x"], "winner": "A"}, None, "POST", "/api/vote", 404),
            ({"winner": "A"}, None, "POST", "/api/vote", 404),
            ({"id": served_id, "winner": "A"}, None, "POST", "/api/vote", 409),  # already voted on
            ({"id": served_id, "winner": "C"}, None, "POST", "/api/vote", 400),
            ({"prompt": "   "}, None, "POST", "/api/pair", 400),
            ({"prompt": 7}, None, "POST", "/api/pair", 400),
            ({"id": served_id, "winner": "B"}, {"Content-Type": "text/plain"}, "POST", "/api/vote", 415),
            ({}, None, "POST", "/api/nothing", 404),
            (None, None, "GET", "/api/vote", 404),
            (None, None, "GET", "/../../etc/passwd", 404),
            (None, None, "GET", "/votes.jsonl", 404),
        ]
        for body, headers, method, path, status in bad:
            code, reply = call(url + path, body, headers, method)
            assert code == status, (path, body, code, reply)
            assert isinstance(reply["error"], str) and "\n" not in reply["error"] and reply["error"]
        # an oversized body is refused before it is read
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest("POST", "/api/vote")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10 ** 8))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and "Content-Length" in json.loads(resp.read())["error"]
        assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
        assert sorted(os.listdir(tmp_path)) == ["votes"] and len(a.log.votes) == 1


def test_a_hostile_answer_travels_as_json_text_and_the_page_never_parses_markup(tmp_path, models, monkeypatch):
    monkeypatch.setattr(arena, "generate_texts", lambda model, tok, prompts, *a, **k: [HOSTILE] * len(prompts))
    with served(tmp_path, models) as (url, _):
        with urllib.request.urlopen(urllib.request.Request(
                url + "/api/pair", data=json.dumps({"prompt": HOSTILE}).encode(),
                headers={"Content-Type": "application/json"})) as r:
            raw, headers = r.read(), r.headers
        assert headers["Content-Type"].startswith("application/json") and headers["X-Content-Type-Options"] == "nosniff"
        assert b"<" not in raw and json.loads(raw)["a"] == HOSTILE and json.loads(raw)["prompt"] == HOSTILE
        with urllib.request.urlopen(url + "/") as r:
            page, csp = r.read().decode(), r.headers["Content-Security-Policy"]
        with urllib.request.urlopen(url + "/arena.js") as r:
            script = r.read().decode()
    # no inline script may run (the page loads /arena.js), and the script only ever sets text
    assert "script-src" not in csp and "default-src 'self'" in csp and "<script>" not in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script and sink not in page
    assert script.count("textContent =") >= 5


def test_concurrent_votes_from_many_threads_lose_nothing(tmp_path, models, monkeypatch):
    counter = iter(range(10 ** 6))
    monkeypatch.setattr(arena, "generate_texts",
                        lambda model, tok, prompts, *a, **k: [f"answer {next(counter)}" for _ in prompts])
    with served(tmp_path, models) as (url, a):
        pairs = [call(url + "/api/pair", {"prompt": f"prompt {i}"})[1] for i in range(40)]
        results = {}

        def voter(t):  # two threads per pair: exactly one of them gets its vote recorded
            for i, p in enumerate(pairs):
                if i % 4 == t % 4:
                    results[t, i] = call(url + "/api/vote", {"id": p["id"], "winner": arena_votes.WINNERS[i % 4]})[0]

        threads = [threading.Thread(target=voter, args=(t,)) for t in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert sorted(results.values()) == [200] * 40 + [409] * 40
    votes = lines(tmp_path / "votes" / "votes.jsonl")
    by_prompt = {v["prompt"]: v for v in votes}
    assert len(votes) == 40 and sorted(by_prompt) == sorted(p["prompt"] for p in pairs)
    for p in pairs:
        assert (by_prompt[p["prompt"]]["answer_a"], by_prompt[p["prompt"]]["answer_b"]) == (p["a"], p["b"])
    prefs = lines(tmp_path / "votes" / "prefs.jsonl")
    assert prefs == [arena_votes.vote_to_pref(v) for v in votes if v["winner"] in ("A", "B")] and len(prefs) == 20
    assert len(a.log.votes) == 40


def start_server(args, cwd=ROOT):
    """The arena CLI in a subprocess; returns (process, base url) once it listens."""
    p = subprocess.Popen([sys.executable, "-m", "nanoalign.arena", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = p.stdout.readline()
    assert "open http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
    return p, line.split("open ")[1].strip().rstrip("/")


def test_a_killed_server_loses_no_confirmed_vote_and_a_restart_appends(tmp_path, data):
    out = tmp_path / "votes"
    args = ["--models", "a=tiny", "b=tiny", "--prompts", str(data / "prompts.jsonl"), "--out", str(out), "--port", "0",
            "--max-new-tokens", "8"]
    p, url = start_server(args)
    try:
        for w in ("A", "tie", "B"):
            assert call(url + "/api/vote", {"id": call(url + "/api/pair", {})[1]["id"], "winner": w})[0] == 200
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    first = (out / "votes.jsonl").read_bytes()
    with open(out / "votes.jsonl", "ab") as f:  # a kill in the middle of writing a fourth vote, never confirmed
        f.write(b'{"time": "2024-01-01T00:00:00Z", "prompt": "half a vo')
    (out / "prefs.jsonl").write_text("")  # ... and prefs.jsonl lost too
    p, url = start_server(args)
    try:
        for w in ("B", "both_bad"):
            assert call(url + "/api/vote", {"id": call(url + "/api/pair", {})[1]["id"], "winner": w})[0] == 200
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    raw = (out / "votes.jsonl").read_bytes()
    assert raw.startswith(first) and b"half a vo" not in raw
    votes = lines(out / "votes.jsonl")
    assert [v["winner"] for v in votes] == ["A", "tie", "B", "B", "both_bad"]
    assert lines(out / "prefs.jsonl") == [arena_votes.vote_to_pref(v) for v in votes if v["winner"] in ("A", "B")]


def test_bad_flags_are_one_error_line_and_a_public_host_is_announced(tmp_path):
    out = ["--out", str(tmp_path)]
    for argv, needle in ((["--models", "a=tiny", *out], "--models: give two or more"),
                         (["--models", "a=tiny", "tiny", *out], "--models: give two or more"),
                         (["--models", "a=tiny", "a=small", *out], "a name appears twice"),
                         (["--models", "a=tiny", "b=tiny", *out, "--annotator", "gold"], "needs --rounds"),
                         (["--models", "a=tiny", "b=tiny", *out, "--annotator", "robot"], "human or gold")):
        with pytest.raises(cli.UserError, match=needle):
            arena.main(cli.parse_cli(arena.Config, argv))
    assert_user_error(run_cli(["-m", "nanoalign.arena", "ratings", str(tmp_path / "none.jsonl")]), "no such file")
    assert "0.0.0.0" in arena.Arena(arena.Config(host="0.0.0.0"), {}, [], None).warning
    assert arena.Arena(arena.Config(host="127.0.0.1"), {}, [], None).warning == ""


# ---------------------------------------------------------------------------------------- gold annotator, loop
def test_gold_annotator_votes_as_the_judge_scores(tmp_path, data, monkeypatch):
    good, bad = hub.load("tiny"), hub.load("tiny")
    rows = {r["prompt"]: r for r in lines(data / "eval.jsonl")}
    # "good" answers with the task's reference answer, "bad" with an empty one (gold score 0)
    monkeypatch.setattr(arena, "generate_texts", lambda model, tok, prompts, *a, **k: [
        rows[p]["reference"] if model is good[0] else "" for p in prompts])
    cfg = arena.Config(prompts=str(data / "eval.jsonl"), out=str(tmp_path), annotator="gold", rounds=10)
    arena.gold_rounds(cfg, {"good": good, "bad": bad}, task_rows(data, "eval"), arena_votes.VoteLog(cfg.out))
    votes = lines(tmp_path / "votes.jsonl")
    assert len(votes) == 10 and {v["annotator"] for v in votes} == {"gold"}
    for v in votes:
        assert v["winner"] == ("A" if v["model_a"] == "good" else "B")
        assert judge.score(v["answer_a" if v["winner"] == "A" else "answer_b"], rows[v["prompt"]]) > 0
    assert len(lines(tmp_path / "prefs.jsonl")) == 10
    board = arena_votes.leaderboard(votes, n_boot=100)
    assert board[0]["model"] == "good" and board[0]["lo"] > board[1]["hi"]


def test_gold_command_on_tiny_follows_the_judge(tmp_path, data, capsys):
    out = tmp_path / "gold"
    arena.main(arena.Config(models=["a=tiny", "b=tiny"], prompts=str(data / "prompts.jsonl"), out=str(out),
                            annotator="gold", rounds=6, max_new_tokens=8))
    assert "6 gold votes" in capsys.readouterr().out
    metas = {r["prompt"]: r for r in lines(data / "prompts.jsonl")}
    for v in lines(out / "votes.jsonl"):
        sa, sb = judge.score(v["answer_a"], metas[v["prompt"]]), judge.score(v["answer_b"], metas[v["prompt"]])
        assert v["winner"] == ("A" if sa > sb else "B" if sb > sa else "tie" if sa > 0 else "both_bad")


def test_the_loop_closes_votes_to_pairs_to_one_dpo_step(tmp_path, data, models):
    sys.path.insert(0, ROOT)
    import train_dpo
    with served(tmp_path, models, task_rows(data)) as (url, _):
        for w in ("A", "B", "tie", "A", "both_bad", "B"):
            assert call(url + "/api/vote", {"id": call(url + "/api/pair", {})[1]["id"], "winner": w})[0] == 200
    prefs = tmp_path / "votes" / "prefs.jsonl"
    assert len(lines(prefs)) == 4
    m = train_dpo.main(train_dpo.Config(init="tiny", data=str(prefs), out=str(tmp_path / "dpo"), max_steps=1,
                                        batch_size=2, lora_rank=4, lora_alpha=8.0, warmup=0, log_every=1, device="cpu"))
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0: DPO is ln 2
    assert os.path.exists(tmp_path / "dpo" / "config.json")


# ---------------------------------------------------------------------------------------------------- browser
def browser():
    """Headless Chromium through selenium, or a pytest.skip with the one-line reason."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(driver))


def wait_ready(driver, n_votes):
    from selenium.webdriver.support.ui import WebDriverWait
    text = lambda d, k: d.find_element("id", k).text
    WebDriverWait(driver, 60).until(lambda d: text(d, "status") == "Which answer is better?"
                                    and (n_votes == 0 or f"Vote {n_votes} recorded" in text(d, "reveal")))
    return {k: driver.find_element("id", k).get_property("textContent") for k in ("prompt", "a", "b")}


def test_browser_votes_by_mouse_and_keyboard_are_exactly_the_files(tmp_path, data, models):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    d = browser()
    try:
        with served(tmp_path, models, task_rows(data), max_new_tokens=24) as (url, _):
            d.get(url + "/")
            shown, clicks = [], [("mouse", "A"), ("key", "2"), ("key", "3"), ("mouse", "both_bad"),
                                 ("key", Keys.ARROW_LEFT), ("key", "4"), ("mouse", "B")]
            for i, (how, what) in enumerate(clicks):
                shown.append(wait_ready(d, i))
                if how == "mouse":
                    d.find_element("css selector", f'button[data-w="{what}"]').click()
                else:
                    ActionChains(d).send_keys(what).perform()
            wait_ready(d, len(clicks))
            reveal, board = d.find_element("id", "reveal").text, d.find_element("id", "board").text
            d.find_element("id", "typed").send_keys("Name three colors. <b>bold?</b>")  # a typed prompt, then a key
            d.find_element("css selector", 'button[type="submit"]').click()
            typed = wait_ready(d, len(clicks))
            assert typed["prompt"] == "Name three colors. <b>bold?</b>"
            ActionChains(d).send_keys("1").perform()
            wait_ready(d, len(clicks) + 1)
            d.save_screenshot(str(tmp_path / "arena.png"))
    finally:
        d.quit()
    votes = lines(tmp_path / "votes" / "votes.jsonl")
    assert [v["winner"] for v in votes] == ["A", "B", "tie", "both_bad", "A", "both_bad", "B", "A"]
    for v, s in zip(votes, shown + [typed]):
        assert (v["answer_a"], v["answer_b"]) == (s["a"], s["b"]) and arena_votes.vote_to_pref(v) in (None, {
            "prompt": v["prompt"], "chosen": s["a" if v["winner"] == "A" else "b"],
            "rejected": s["b" if v["winner"] == "A" else "a"]})
    assert lines(tmp_path / "votes" / "prefs.jsonl") == [arena_votes.vote_to_pref(v) for v in votes if v["winner"] in "AB"]
    assert f"A was {votes[6]['model_a']}, B was {votes[6]['model_b']}" in reveal and "votes" in board
    assert (tmp_path / "arena.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_shows_a_hostile_answer_as_text(tmp_path, models, monkeypatch):
    monkeypatch.setattr(arena, "generate_texts", lambda model, tok, prompts, *a, **k: [HOSTILE] * len(prompts))
    d = browser()
    try:
        with served(tmp_path, models, [{"prompt": HOSTILE}], host="127.0.0.1") as (url, _):
            d.get(url + "/")
            shown = wait_ready(d, 0)
            assert shown == {"prompt": HOSTILE, "a": HOSTILE, "b": HOSTILE}
            assert d.execute_script("return document.querySelectorAll('#a *, #b *, #prompt *, img').length") == 0
            assert d.execute_script("return window.pwned === undefined")
            assert not d.find_element("id", "warning").is_displayed()
    finally:
        d.quit()
