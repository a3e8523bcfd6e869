"""A local arena: two anonymous answers side by side, a person's vote, and every vote kept as preference data.

Chatbot Arena (Chiang et al. 2024) ranks anonymous models by a Bradley–Terry fit of people's pairwise votes; this is
that loop on one machine, and the decisive votes are TRL preference rows for train_rm.py and train_dpo.py:

    python -m nanoalign.arena --models base=smollm2-135m-instruct dpo=out/dpo --prompts data/eval.jsonl --out votes
    python -m nanoalign.arena ratings votes/votes.jsonl              # Bradley–Terry ratings on the Elo scale
    python train_dpo.py --init out/sft --data votes/prefs.jsonl ...  # {"prompt", "chosen", "rejected"} rows

A vote is a line of OUT/votes.jsonl (A: the left answer), fsynced under a lock before the page confirms it; prefs.jsonl
is rebuilt from it at each start. --annotator gold --rounds N: the task suite's gold judge votes instead of a person
(UltraFeedback's recipe, a program in GPT-4's place). Simplifications: one generation at a time, shown as a clock.
"""
import http.server
import json
import os
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import cli, judge
from .cli import UserError, check
from .data import read_prompts
from .generate import generate_texts

WINNERS = ("A", "B", "tie", "both_bad")
SCORE = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}  # A's share of the game: a tie is half a win each way
MAX_BODY = 64 * 1024  # bytes per request: a vote or a typed prompt, never a file


@dataclass
class Config:
    """Serve a page where a person votes between two anonymous models' answers; the votes become preference data."""
    models: list[str] = field(default_factory=list)  # NAME=MODEL ... (preset, alias, checkpoint dir or .gguf), >= 2
    prompts: str = ""  # prompts JSONL (task-suite rows for --annotator gold); the page also takes typed prompts
    out: str = ""  # output dir: votes.jsonl (every vote) and prefs.jsonl (the decisive ones, TRL format)
    host: str = "127.0.0.1"  # interface to listen on; the page warns when it is not loopback
    port: int = 8000  # 0 picks a free port
    annotator: str = "human"  # human (serve the page) or gold (the task suite's judge votes; no page)
    rounds: int = 0  # votes the gold annotator casts before it exits
    max_new_tokens: int = 128  # per answer
    temperature: float = 0.7  # sampling temperature (0 is greedy: a model against itself would always tie)
    seed: int = 0  # seeds the prompts, the pairs, the left/right order and the sampling
    device: str = "cpu"  # cpu or cuda
    ratings: str = ""  # print the ratings of this votes.jsonl and exit (`python -m nanoalign.arena ratings FILE`)


def bradley_terry(W: np.ndarray, prior: float = 1.0, iters: int = 10000, tol: float = 1e-7) -> np.ndarray:
    """W[i, j] = wins of model i over model j -> Bradley–Terry ratings on the Elo scale, mean 1000:
    P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)). Fit by Hunter's (2004) MM iteration on the strengths
    p = 10^(R / 400): p_i <- W_i / sum_j n_ij / (p_i + p_j). A model that never lost has no finite maximum-likelihood
    rating, so `prior` games, split half and half, are added between every two models that met (0: the plain MLE)."""
    W = W + prior / 2 * (W + W.T > 0)
    N = W + W.T  # games between i and j
    p = np.ones(len(W))
    for _ in range(iters):
        p, old = W.sum(1) / (N / (p[:, None] + p[None, :])).sum(1), p
        p = p / np.exp(np.log(p).mean())  # only ratios are identified: fix the geometric mean at 1
        if np.abs(p - old).max() < tol:
            break
    return 1000 + 400 * np.log10(p)


def leaderboard(votes: list[dict], n_boot: int = 200, seed: int = 0) -> list[dict]:
    """Ratings, best first, with 95% intervals from refits on the votes resampled with replacement (bootstrap)."""
    if not votes:
        return []
    names = sorted({v[k] for v in votes for k in ("model_a", "model_b")})
    ix, m, n = {name: i for i, name in enumerate(names)}, len(names), len(votes)
    ia, ib = (np.array([ix[v[k]] for v in votes], dtype=int) for k in ("model_a", "model_b"))
    s = np.array([SCORE[v["winner"]] for v in votes])

    def fit(k):  # the votes with indices k -> ratings (m,); W[i, j] = wins of model i over model j
        W = np.zeros((m, m))
        np.add.at(W, (ia[k], ib[k]), s[k])
        np.add.at(W, (ib[k], ia[k]), 1 - s[k])
        return bradley_terry(W)

    rng = np.random.default_rng(seed)
    boots = np.array([fit(rng.integers(0, n, n)) for _ in range(n_boot)])  # (n_boot, m)
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)  # a model missing from a resample sits at the mean there
    rating, count = fit(np.arange(n)), np.bincount(ia, minlength=m) + np.bincount(ib, minlength=m)
    rows = [{"model": name, "rating": float(rating[i]), "lo": float(lo[i]), "hi": float(hi[i]),
             "votes": int(count[i])} for i, name in enumerate(names)]
    return sorted(rows, key=lambda r: -r["rating"])


def format_board(rows: list[dict]) -> str:
    if not rows:
        return "no votes yet"
    w = max([5] + [len(r["model"]) for r in rows])
    return "\n".join([f"{'model':<{w}}  rating  95% interval   votes"] + [f"{r['model']:<{w}}  {r['rating']:6.0f}  "
                     f"[{r['lo']:4.0f}, {r['hi']:4.0f}]  {r['votes']:6d}" for r in rows])


def vote_to_pref(v: dict) -> dict | None:
    """A decisive vote -> a TRL preference row; a tie or both-bad says nothing about which answer is better."""
    if v["winner"] not in ("A", "B"):
        return None
    win, lose = ("answer_a", "answer_b") if v["winner"] == "A" else ("answer_b", "answer_a")
    return {"prompt": v["prompt"], "chosen": v[win], "rejected": v[lose]}


def read_votes(path: str, repair: bool = False) -> list[dict]:
    """votes.jsonl -> votes. A last line without its newline was never confirmed (the server died mid-write): it is
    skipped, and with repair=True cut off, so that the next vote starts on a fresh line."""
    check(os.path.isfile(path), f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    whole = raw[:raw.rfind(b"\n") + 1]
    if len(whole) < len(raw):
        print(f"warning: {path}: skipping a truncated last line (a vote that was never confirmed)", file=sys.stderr)
        if repair:
            os.truncate(path, len(whole))
    votes = []
    for i, line in enumerate(whole.split(b"\n")[:-1], 1):
        try:
            v = json.loads(line)
            ok = (v["winner"] in WINNERS and v["model_a"] != v["model_b"]
                  and all(k in v for k in ("prompt", "answer_a", "answer_b")))
        except (ValueError, RecursionError, KeyError, TypeError):
            ok = False
        check(ok, f"{path}:{i}: not a vote (a JSON object with prompt, model_a, model_b, answer_a, answer_b, winner)")
        votes.append(v)
    return votes


class VoteLog:
    """OUT/votes.jsonl, the record, and OUT/prefs.jsonl, derived from it; appends are serialized by a lock."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.votes_path, self.prefs_path = os.path.join(out, "votes.jsonl"), os.path.join(out, "prefs.jsonl")
        self.lock = threading.Lock()
        self.votes = read_votes(self.votes_path, repair=True) if os.path.exists(self.votes_path) else []
        with open(self.prefs_path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for v in self.votes if (p := vote_to_pref(v)))
        os.replace(self.prefs_path + ".tmp", self.prefs_path)

    def append(self, row: dict, names, answers, winner: str, annotator: str) -> int:
        vote = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prompt": row["prompt"],
                "prompt_id": row.get("id"), "model_a": names[0], "model_b": names[1], "answer_a": answers[0],
                "answer_b": answers[1], "winner": winner, "annotator": annotator}
        with self.lock:
            self._write(self.votes_path, vote)
            self.votes.append(vote)
            if (pref := vote_to_pref(vote)) is not None:
                self._write(self.prefs_path, pref)
            return len(self.votes)

    @staticmethod
    def _write(path: str, row: dict):
        with open(path, "ab") as f:
            end = f.seek(0, os.SEEK_END)
            try:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())  # on disk before the page says "recorded"
            except OSError:
                f.truncate(end)  # e.g. a full disk: leave no torn line for the next vote to follow
                raise


class BadRequest(Exception):
    """args: (HTTP status, one-line reason)."""


class Arena:
    """The models, the prompt pool, the pairs served so far and the vote log, shared by the request threads."""

    def __init__(self, cfg: Config, models: dict, rows: list[dict], log: VoteLog):
        self.cfg, self.models, self.rows, self.log = cfg, models, rows, log
        self.warning = "" if cfg.host in ("127.0.0.1", "localhost", "::1") else (f"This arena listens on {cfg.host}, "
                       "beyond this machine: anyone who can reach that address can read these prompts and vote.")
        self.rng, self.pairs = random.Random(cfg.seed), {}  # pair id -> {"row", "names", "answers", "voted"}
        self.lock = threading.Lock()  # the pairs
        self.gen_lock = threading.Lock()  # the rng, and one generation at a time (a model's KV cache is not shared)
        self.last_s = None  # seconds the last pair took: the page's progress bar runs against it

    def request_pair(self, body: dict) -> dict:
        """Two answers to the typed prompt, else to one from the file; the page shows a clock while they are written."""
        typed = body.get("prompt")
        if typed is not None and (not isinstance(typed, str) or not typed.strip()):
            raise BadRequest(400, "'prompt' must be non-empty text")
        if typed is None and not self.rows:
            raise BadRequest(400, "no --prompts file was given: type a prompt")
        with self.gen_lock:
            row = {"prompt": typed} if typed is not None else self.rng.choice(self.rows)
            names = self.rng.sample(sorted(self.models), 2)  # two models at random, in random left/right order
            pid, seed, t0 = secrets.token_hex(8), self.rng.randrange(2**31), time.time()
            answers = [generate_texts(*self.models[n], [row["prompt"]], self.cfg.max_new_tokens, self.cfg.temperature,
                                      seed + k)[0] for k, n in enumerate(names)]  # a seed each: one model twice differs
            self.last_s = time.time() - t0
        with self.lock:
            self.pairs[pid] = {"row": row, "names": names, "answers": answers, "voted": False}
        p = row["prompt"]
        return {"id": pid, "a": answers[0], "b": answers[1], "prompt": p if isinstance(p, str)
                else "\n\n".join(f"{m['role']}: {m['content']}" for m in p)}

    def vote(self, body: dict) -> dict:
        if body.get("winner") not in WINNERS:
            raise BadRequest(400, f"'winner' must be one of {', '.join(WINNERS)}")
        with self.lock:  # two tabs voting on the same pair: exactly one vote is recorded
            if (pair := self.pairs.get(str(body.get("id")))) is None:
                raise BadRequest(404, "unknown pair id (this server never served it)")
            if pair["voted"]:
                raise BadRequest(409, "this pair has already been voted on")
            n = self.log.append(pair["row"], pair["names"], pair["answers"], body["winner"], "human")
            pair["voted"] = True
        return {"a": pair["names"][0], "b": pair["names"][1], "votes": n}


class Handler(http.server.BaseHTTPRequestHandler):
    arena: Arena  # set on the subclass that make_server builds

    def route(self):
        """-> (reply: the page's text, or a dict sent as JSON; content type). Raises BadRequest."""
        arena, path, json_type = self.arena, self.path.split("?")[0], "application/json"
        if self.command == "GET" and path in ("/", "/arena.js"):
            return (PAGE, "text/html") if path == "/" else (SCRIPT, "text/javascript")
        if self.command == "GET" and path == "/api/state":
            return {"warning": arena.warning, "has_prompts": bool(arena.rows), "last_s": arena.last_s,
                    "board": format_board(leaderboard(list(arena.log.votes), n_boot=100))}, json_type
        if self.command != "POST" or path not in ("/api/pair", "/api/vote"):
            raise BadRequest(404, f"no {self.command} {path}")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != json_type:  # any site can POST a form here
            raise BadRequest(415, "a POST must be application/json")
        n = self.headers.get("Content-Length", "")
        if not n.isdigit() or int(n) > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise BadRequest(413, f"a POST needs a Content-Length of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(int(n)))
        except (ValueError, RecursionError):
            raise BadRequest(400, "malformed JSON")
        if not isinstance(body, dict):
            raise BadRequest(400, "expected a JSON object")
        return (arena.request_pair if path == "/api/pair" else arena.vote)(body), json_type

    def reply(self):
        try:
            code, (body, ctype) = 200, self.route()
        except BadRequest as e:
            code, body, ctype = e.args[0], {"error": e.args[1]}, "application/json"
        except Exception as e:  # a vote that could not be written, a typed prompt longer than the context, ...
            code, body, ctype = 500, {"error": f"{type(e).__name__}: {e}"}, "application/json"
        data = (body if isinstance(body, str) else json.dumps(body).replace("<", "\\u003c")).encode()  # no markup, ever
        self.send_response(code)
        for k, v in {"Content-Type": ctype + "; charset=utf-8", "Content-Length": str(len(data)),
                     "X-Content-Type-Options": "nosniff",  # a JSON reply is never sniffed into a page
                     "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = reply


def make_server(cfg: Config, models: dict, rows: list[dict], log: VoteLog):
    """The HTTP server (not yet serving) and its Arena; port 0 picks a free port (httpd.server_address)."""
    arena = Arena(cfg, models, rows, log)
    try:  # a thread per request: a tab waiting for its answers never blocks another tab's vote
        httpd = http.server.ThreadingHTTPServer((cfg.host, cfg.port), type("H", (Handler,), {"arena": arena}))
    except (OSError, OverflowError) as e:  # in use, not ours, or not a port number
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e})")
    return httpd, arena


def gold_rounds(cfg: Config, models: dict, rows: list[dict], log: VoteLog):
    """Cast cfg.rounds votes with the gold judge. The pairs are planned first, so that each model writes all of its
    answers in batches instead of one prompt at a time."""
    rng = random.Random(cfg.seed)
    plan = [(rng.choice(rows), *rng.sample(sorted(models), 2)) for _ in range(cfg.rounds)]
    answers = {}  # (round, model name) -> answer
    for k, (name, (model, tok)) in enumerate(sorted(models.items())):
        todo, t0 = [i for i, (_, a, b) in enumerate(plan) if name in (a, b)], time.time()
        texts = generate_texts(model, tok, [plan[i][0]["prompt"] for i in todo], cfg.max_new_tokens,
                               cfg.temperature, cfg.seed + k)  # a seed per name: one model twice still differs
        answers.update({(i, name): t for i, t in zip(todo, texts)})
        print(f"{name}: {len(todo)} answers in {time.time() - t0:.1f}s", flush=True)
    for i, (row, a, b) in enumerate(plan):
        sa, sb = judge.score(answers[i, a], row), judge.score(answers[i, b], row)
        winner = "A" if sa > sb else "B" if sb > sa else "tie" if sa > 0 else "both_bad"
        log.append(row, (a, b), (answers[i, a], answers[i, b]), winner, "gold")


def main(cfg: Config) -> dict:
    if cfg.ratings:
        rows = leaderboard(read_votes(cfg.ratings), n_boot=1000, seed=cfg.seed)
        print(format_board(rows))
        return {"ratings": rows}
    specs = [m.split("=", 1) for m in cfg.models]
    check(len(specs) >= 2 and all(len(s) == 2 and all(s) for s in specs),
          "--models: give two or more NAME=MODEL (the same MODEL under two names is fine)")
    check(len({n for n, _ in specs}) == len(specs), f"--models: a name appears twice in {' '.join(cfg.models)}")
    check(bool(cfg.out) and not os.path.isfile(cfg.out), "--out must name a directory")
    check(cfg.annotator in ("human", "gold"), f"--annotator must be human or gold, got {cfg.annotator!r}")
    check(cfg.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {cfg.max_new_tokens}")
    check(cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}")
    gold = cfg.annotator == "gold"  # no page: the judge votes
    check(gold == (cfg.rounds > 0), "--annotator gold needs --rounds N > 0, and --rounds is only for it")
    check(bool(cfg.prompts) or not gold, "--annotator gold needs --prompts (task-suite rows: nanoalign.tasks make)")
    rows = read_prompts(cfg.prompts) if cfg.prompts else []
    if gold:
        judge.check_rows(rows, cfg.prompts)
    log = VoteLog(cfg.out)  # reads (and checks) any earlier votes before the models load
    from .hub import load
    loaded, models = {}, {}
    for name, spec in specs:  # a model named twice is loaded once
        models[name] = loaded[spec] = loaded.get(spec) or load(spec, cfg.device)
    if gold:
        n0 = len(log.votes)
        gold_rounds(cfg, models, rows, log)
        tally = ", ".join(f"{sum(v['winner'] == w for v in log.votes[n0:])} {w}" for w in WINNERS)
        print(f"{len(log.votes) - n0} gold votes ({tally}) appended to {log.votes_path}; pairs in {log.prefs_path}")
        print(format_board(leaderboard(log.votes)))
        return {"votes": len(log.votes)}
    httpd, arena = make_server(cfg, models, rows, log)
    host, port = httpd.server_address[:2]
    print(f"arena: {len(log.votes)} votes so far in {log.votes_path}; open http://{host}:{port}/", flush=True)
    if arena.warning:
        print(f"warning: {arena.warning}", file=sys.stderr)
    with httpd:
        httpd.serve_forever()


# Everything the server sends (prompts, answers, model names) is untrusted text: the script puts it into the page
# through textContent only, never innerHTML, and the Content-Security-Policy runs no inline script.
PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nanoalign arena</title><style>
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1em}#warning{background:#fde2e1;padding:.6em}
.box{border:1px solid #bbb;border-radius:6px;padding:.7em;white-space:pre-wrap;overflow-wrap:anywhere;min-height:5em}
#prompt{background:#f3f3f3;min-height:1em}button{font-size:15px;padding:.4em .9em}#reveal{color:#1b5e20}
</style></head><body><h2>nanoalign arena</h2><p id="warning" hidden></p><form id="ask"><textarea id="typed" rows="2"
cols="90" placeholder="Type a prompt, or take the next one from the file"></textarea><br><button type="submit">Ask
</button> <button type="button" id="next">Next prompt from the file (N)</button></form><h3>Prompt</h3><div id="prompt"
class="box"></div><p><span id="status"></span> <progress id="progress"></progress></p><div class="cols"><div>
<h3>Model A</h3><div id="a" class="box"></div></div><div><h3>Model B</h3><div id="b" class="box"></div></div></div><p>
<button data-w="A" disabled>A is better (1)</button> <button data-w="B" disabled>B is better (2)</button> <button
data-w="tie" disabled>Tie (3)</button> <button data-w="both_bad" disabled>Both bad (4)</button></p><p id="reveal"></p>
<h3>Leaderboard</h3><pre id="board"></pre><script src="/arena.js"></script></body></html>"""

SCRIPT = r""""use strict";
const $ = id => document.getElementById(id), buttons = [...document.querySelectorAll("button[data-w]")];
const keys = {1: "A", ArrowLeft: "A", 2: "B", ArrowRight: "B", 3: "tie", 4: "both_bad"};
const say = text => { $("status").textContent = text; }, setReady = on => buttons.forEach(b => { b.disabled = !on; });
let pair = null, hasPrompts = false, lastS = null;
async function api(path, body) {
  const r = await fetch(path, body && {method: "POST", body: JSON.stringify(body),
                                       headers: {"Content-Type": "application/json"}});
  const j = await r.json();
  if (r.ok) return j;
  throw new Error(j.error || r.statusText);
}
async function refresh() {
  const s = await api("/api/state");
  $("warning").textContent = s.warning; $("warning").hidden = !s.warning; $("board").textContent = s.board;
  hasPrompts = s.has_prompts; lastS = s.last_s; $("next").disabled = !hasPrompts;
}
async function ask(typed) {  // the server replies once both answers are written; a clock runs meanwhile
  setReady(false); pair = null; $("prompt").textContent = typed ?? ""; $("a").textContent = $("b").textContent = "";
  const t0 = Date.now(), tick = () => {
    const s = (Date.now() - t0) / 1000;
    say(`Writing the two answers... ${s.toFixed(1)} s` + (lastS ? ` (the last pair took ${lastS.toFixed(1)} s)` : ""));
    $("progress").value = lastS ? Math.min(s / lastS, 0.99) : 0;
  }, timer = setInterval(tick, 200);
  tick();
  try {
    const p = await api("/api/pair", typed === undefined ? {} : {prompt: typed}).finally(() => clearInterval(timer));
    for (const id of ["prompt", "a", "b"]) $(id).textContent = p[id];
    pair = p.id; say("Which answer is better?"); setReady(true); $("progress").value = 1;
  } catch (e) { say("Error: " + e.message); }
}
async function vote(winner, id = pair) {
  if (id === null) return;
  pair = null; setReady(false); say("Recording the vote...");
  try {
    const r = await api("/api/vote", {id, winner});
    $("reveal").textContent = `Vote ${r.votes} recorded: A was ${r.a}, B was ${r.b}.`;
  } catch (e) { say("Error: " + e.message); pair = id; return setReady(true); }
  await refresh();
  if (hasPrompts) ask(); else say("Type the next prompt.");
}
buttons.forEach(b => b.addEventListener("click", () => vote(b.dataset.w)));
document.addEventListener("keydown", e => {
  if (e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (keys[e.key]) vote(keys[e.key]); else if (e.key === "n" && hasPrompts) ask();
});
$("ask").addEventListener("submit", e => { e.preventDefault(); if ($("typed").value.trim()) ask($("typed").value); });
$("next").addEventListener("click", () => ask());
refresh().then(() => hasPrompts ? ask() : say("Type a prompt to start."));
"""

if __name__ == "__main__":  # `ratings FILE` is --ratings FILE
    cli.run(main, Config, ["--ratings", *sys.argv[2:]] if sys.argv[1:2] == ["ratings"] else sys.argv[1:])
