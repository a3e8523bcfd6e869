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
import pathlib
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

from . import cli, judge
from .arena_votes import WINNERS, VoteLog, format_board, leaderboard, read_votes
from .cli import UserError, check
from .data import read_prompts
from .generate import generate_texts

MAX_BODY = 64 * 1024  # bytes per request: a vote or a typed prompt, never a file
# The page and its script. Everything the server sends (prompts, answers, model names) is untrusted text: the script
# puts it into the page through textContent only, never innerHTML, and the Content-Security-Policy runs no inline script
PAGE, SCRIPT = (pathlib.Path(__file__).with_name("assets").joinpath(f).read_text("utf-8")
                for f in ("arena.html", "arena.js"))


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


if __name__ == "__main__":  # `ratings FILE` is --ratings FILE
    cli.run(main, Config, ["--ratings", *sys.argv[2:]] if sys.argv[1:2] == ["ratings"] else sys.argv[1:])
