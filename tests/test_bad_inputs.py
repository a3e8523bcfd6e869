"""Every script and CLI, on every bad input that applies to it (tests/assets/bad/cases.json): exit code 2, exactly one
stderr line `error: ...` that names the file (FILE:LINE where there is a line), the model file or the flag, no
traceback, and nothing new in --out.

The runs go through tests/bad_driver.py: one Python process imports torch once and forks a child per run, which
executes the script as `python SCRIPT ...` would. Each script also gets one valid control run, which must succeed,
so every case fails because of its one defect and not because the base command line is wrong.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

ASSETS = os.path.join(ROOT, "tests", "assets", "bad")
with open(os.path.join(ASSETS, "cases.json")) as _f:
    MANIFEST = json.load(_f)
GROUPS = MANIFEST["groups"]
CASES = {c["name"]: c for c in MANIFEST["cases"]}

DATA_FLAG = {"sft": "--data", "rm": "--data", "dpo": "--data", "ppo": "--prompts", "evaluate": "--prompts",
             "generate": "--prompts", "pairs": "--prompts"}
MODEL_FLAG = {"sft": "--init", "rm": "--init", "dpo": "--init", "ppo": "--init", "evaluate": "--model",
              "generate": "--model", "merge": "--models", "chat": "--model", "pairs": "--model"}
OUT_IS = {"sft": "dir", "rm": "dir", "dpo": "dir", "ppo": "dir", "merge": "dir", "make": "dir", "evaluate": "file",
          "generate": "file", "pairs": "file", "chat": None}
TRAIN = ["--device", "cpu", "--max-steps", "1", "--batch-size", "2", "--max-len", "128", "--log-every", "1"]


def base_argv(script: str, models: dict) -> list[str]:
    """A valid command line for `script` (the control run), with {out} for its --out."""
    a = lambda name: os.path.join(ASSETS, name)
    return {
        "sft": ["train_sft.py", "--init", "tiny", "--data", a("sft_valid.jsonl"), "--out", "{out}", *TRAIN],
        "rm": ["train_rm.py", "--init", "tiny", "--data", a("prefs_valid.jsonl"), "--out", "{out}", *TRAIN],
        "dpo": ["train_dpo.py", "--init", "tiny", "--data", a("prefs_valid.jsonl"), "--out", "{out}", *TRAIN],
        "ppo": ["train_ppo.py", "--init", "tiny", "--prompts", a("prompts_valid.jsonl"), "--out", "{out}",
                "--device", "cpu", "--max-steps", "1", "--rollout-batch", "2", "--minibatch-size", "2",
                "--max-new-tokens", "4", "--ppo-epochs", "1", "--max-len", "128"],
        "evaluate": ["-m", "nanoalign.evaluate", "--model", "tiny", "--prompts", a("prompts_valid.jsonl"),
                     "--max-new-tokens", "4", "--out", "{out}"],
        "generate": ["-m", "nanoalign.generate", "--model", "tiny", "--prompts", a("prompts_valid.jsonl"),
                     "--max-new-tokens", "4", "--out", "{out}"],
        "merge": ["-m", "nanoalign.merge", "--models", "tiny", "tiny", "--out", "{out}"],
        "chat": ["-m", "nanoalign.chat", "--model", "tiny", "--once", "hi", "--max-new-tokens", "4"],
        "make": ["-m", "nanoalign.tasks", "make", "--out", "{out}", "--n-sft", "2", "--n-prefs", "2",
                 "--n-prompts", "2", "--n-eval", "2"],
        # a random reward model as the judge: the gold judge would score a random policy's samples all 0 (ties)
        "pairs": ["-m", "nanoalign.tasks", "pairs", "--model", "tiny", "--prompts", a("prompts_valid.jsonl"),
                  "--out", "{out}", "--k", "2", "--max-new-tokens", "4", "--judge", models["rm"]],
    }[script]


def applies(case: dict) -> list[str]:
    if "args_for" in case:
        return list(case["args_for"])
    a = case["applies"]
    return GROUPS[a] if isinstance(a, str) else a


RUNS = [(s, name) for name, c in CASES.items() for s in applies(c)]


# --- fixtures: tiny checkpoints, corrupted in every way a download or a crash could --------------------------
def build_models(root: str) -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    from nanoalign import hub
    from nanoalign.checkpoint import save_checkpoint
    model, tok = hub.load("tiny")
    policy = os.path.join(root, "policy")
    save_checkpoint(policy, model, tok)
    rm, _ = hub.load("tiny", seed=1)
    rm.add_score_head()
    save_checkpoint(os.path.join(root, "rm"), rm, tok)
    paths = {"policy": policy, "rm": os.path.join(root, "rm"), "missing": os.path.join(root, "does-not-exist"),
             "data_file": os.path.join(ASSETS, "sft_valid.jsonl"), "garbage_gguf": os.path.join(root, "junk.gguf")}
    with open(paths["garbage_gguf"], "wb") as f:
        f.write(b"GGUF" + bytes(range(256)) * 4)
    os.makedirs(os.path.join(root, "empty_dir"))
    paths["empty_dir"] = os.path.join(root, "empty_dir")

    def variant(name, edit):
        d = os.path.join(root, name)
        shutil.copytree(policy, d)
        edit(d)
        paths[name] = d

    def edit_config(**kv):
        def edit(d):
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            cfg.update(kv)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
        return edit

    def write(name, data: bytes):
        def edit(d):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        return edit

    def truncate(d):
        p = os.path.join(d, "model.safetensors")
        with open(p, "rb+") as f:
            f.truncate(os.path.getsize(p) // 2)

    def bigger_tokenizer(d):  # 41 tokens more than the tiny model's 259-row embedding
        t = HFTokenizer.from_file(os.path.join(d, "tokenizer.json"))
        t.add_tokens([f"<extra_{i}>" for i in range(41)])
        t.save(os.path.join(d, "tokenizer.json"))

    def not_chatml(d):
        p = os.path.join(d, "tokenizer.json")
        with open(p) as f:
            text = f.read()
        with open(p, "w") as f:
            f.write(text.replace("<|im_start|>", "<|begin|>"))

    variant("no_weights", lambda d: os.remove(os.path.join(d, "model.safetensors")))
    variant("truncated_weights", truncate)
    variant("garbage_weights", write("model.safetensors", bytes(range(256)) * 3))
    variant("garbage_config", write("config.json", b"{ this is not json"))
    variant("config_not_object", write("config.json", b"[1, 2, 3]"))
    variant("config_bad_type", edit_config(num_hidden_layers="two"))
    variant("config_shape_mismatch", edit_config(hidden_size=32))
    variant("unsupported_type", edit_config(model_type="gpt2"))
    variant("tokenizer_too_big", bigger_tokenizer)
    variant("garbage_tokenizer", write("tokenizer.json", b"\x00\x01 not a tokenizer"))
    variant("no_tokenizer", lambda d: os.remove(os.path.join(d, "tokenizer.json")))
    variant("tokenizer_not_chatml", not_chatml)
    return paths


def fill(s: str, models: dict, **kw) -> str:
    for name, p in models.items():
        s = s.replace("{model:" + name + "}", p)
    if s.startswith("{asset:"):
        s = os.path.join(ASSETS, s[len("{asset:"):-1])
    for k, v in kw.items():
        s = s.replace("{" + k + "}", v)
    return s


def prepare_out(base: str, script: str, kind: str) -> str:
    """Make base/ (empty, or holding a prepared --out) and return the --out path for the run."""
    os.makedirs(base)
    out = os.path.join(base, "out" if OUT_IS[script] != "file" else "out.jsonl")
    if kind == "other_run":
        os.makedirs(out)
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump({"init": "small", "lr": 0.5, "seed": 7, "batch_size": 3}, f)
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.write('{"step": 1, "loss": 1.0}\n')
    elif kind == "unreadable_run":
        os.makedirs(out)
        with open(os.path.join(out, "run.json"), "w") as f:
            f.write("{oops")
    elif kind == "not_empty":
        os.makedirs(out)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("keep me\n")
    elif kind == "file":
        with open(out, "w") as f:
            f.write("precious\n")
    elif kind == "parent_missing":
        out = os.path.join(base, "missing", "out.jsonl")
    return out


def snapshot(base: str) -> dict:
    """Every file under base with its bytes, and every directory: what 'unchanged' means."""
    snap = {}
    for d, dirs, files in os.walk(base):
        for name in dirs:
            snap[os.path.relpath(os.path.join(d, name), base) + "/"] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                snap[os.path.relpath(os.path.join(d, name), base)] = f.read()
    return snap


def command(script: str, case: dict | None, models: dict, out: str) -> tuple[list, dict]:
    """-> (argv, what the error line must name)."""
    argv = [fill(x, models, out=out) for x in base_argv(script, models)]
    names = []
    if case is None:
        return argv, {}
    if "data" in case:
        path = os.path.join(ASSETS, case["data"]) if case["data"] != "." else ASSETS
        argv += [DATA_FLAG[script], path]
        names.append(f"{path}:{case['line']}: " if case.get("line") else f"{path}: ")
    if "model" in case:
        path = models[case["model"]]
        argv += [MODEL_FLAG[script], path]
        names.append(os.path.join(path, case["names"]) if case["names"] else path)
    if "out" in case:
        names.append(out)
    argv += [fill(x, models) for x in case.get("args", []) + case.get("args_for", {}).get(script, [])]
    if "names" in case and "model" not in case:
        names.append(fill(case["names"], models))
    return argv, {"names": names, "expect": case.get("expect_for", {}).get(script, case["expect"])}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every (script, case) and every control run through the driver; -> {(script, case): (result, run)}."""
    tmp = str(tmp_path_factory.mktemp("bad"))
    models = build_models(os.path.join(tmp, "models"))
    jobs, runs = [], {}
    for script, name in [(s, None) for s in GROUPS["all"]] + RUNS:
        case = CASES.get(name)
        base = os.path.join(tmp, "runs", f"{script}-{name or 'control'}")
        out = prepare_out(base, script, case.get("out", "fresh") if case else "fresh")
        argv, need = command(script, case, models, out)
        jid = f"{script}/{name}"
        jobs.append({"id": jid, "argv": argv, "timeout": 120 if case is None else 30})
        runs[jid] = {"base": base, "out": out, "argv": argv, "need": need, "before": snapshot(base)}
    with open(os.path.join(tmp, "jobs.json"), "w") as f:
        json.dump(jobs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOALIGN_CACHE": os.path.join(tmp, "cache"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bad_driver.py"), os.path.join(tmp, "jobs.json")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = {r["id"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert set(got) == set(runs), "the driver did not report every run"
    return {jid: (got[jid], runs[jid]) for jid in runs}


def describe(script, name, r, run) -> str:
    return (f"\n{script} on case {name!r}: {CASES[name]['what'] if name else 'control run'}\n"
            f"argv: {' '.join(run['argv'])}\nexit code: {r['rc']}\nstderr:\n{r['stderr'][-2500:]}")


@pytest.mark.parametrize("script", GROUPS["all"])
def test_control_run_succeeds(results, script):
    r, run = results[f"{script}/None"]
    assert r["rc"] == 0, describe(script, None, r, run)
    assert "error:" not in r["stderr"] and "Traceback" not in r["stderr"], describe(script, None, r, run)


@pytest.mark.parametrize("script,name", RUNS, ids=[f"{s}-{n}" for s, n in RUNS])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(results, script, name):
    r, run = results[f"{script}/{name}"]
    msg = describe(script, name, r, run)
    assert "Traceback" not in r["stderr"], msg
    assert r["rc"] == 2, msg
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, msg
    line = errors[0]
    assert run["need"]["expect"] in line, f"expected {run['need']['expect']!r} in the error line{msg}"
    for n in run["need"]["names"]:
        assert n in line, f"the error line does not name {n!r}{msg}"
    assert snapshot(run["base"]) == run["before"], f"--out changed: {sorted(snapshot(run['base']))}{msg}"


def test_manifest_is_complete():
    """Every file in the corpus is used by a case, every case's file exists, and names are unique."""
    assert len(CASES) == len(MANIFEST["cases"]), "duplicate case names"
    used = {c["data"] for c in CASES.values() if "data" in c} | {"sft_valid.jsonl", "prefs_valid.jsonl",
                                                                    "prompts_valid.jsonl", "cases.json"}
    files = set(os.listdir(ASSETS))
    assert files <= used, f"unused corpus files: {sorted(files - used)}"
    missing = {d for d in used - files if d not in (".", "does_not_exist.jsonl")}
    assert not missing, f"cases name files that do not exist: {sorted(missing)}"
    assert len([c for c in CASES.values() if "data" in c]) >= 20
