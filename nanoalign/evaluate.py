"""Evaluate models on held-out prompts with a judge that cannot be fooled: the task suite's gold checker.

    python -m nanoalign.evaluate --compare base=smollm2-135m-instruct sft=out/demo/sft dpo=out/demo/dpo \
        --ref out/demo/sft --prompts data/eval.jsonl --out out/demo/results.json        (one model: --model M)

Per model: the gold score ± s.e. (and per constraint family), the rate of answers in a format their prompt did not
ask for (overall and per format), the win rate against --ref (ties count half, as in AlpacaEval; also per length
ratio, for length bias), the per-token KL(π || π_ref) on π's own samples at the sampling temperature, the mean length
and the EOS rate. --judge RM_DIR lets a reward model judge the win rate (its mean is "RM score", never gold); --rm
with --prefs gives an RM's pairwise accuracy (RewardBench); --best-of-n N keeps the judge's favourite of N samples,
the inference-time bound PPO and DPO are held to (--write-best: rejection sampling).
"""
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import read_config, write_json
from .cli import check, check_ranges, run
from .data import collate_sft, pad, read_prefs, read_prompts
from .fast import sampling_copy
from .generate import generate
from .hub import ALIAS, PRESETS, load
from .judge import check_rows, score_by_family, unrequested_rates, score as gold_score
from .logprobs import last_token_rewards, sequence_logprobs
from .tasks import write_jsonl
from .tokenizer import Tokenizer


@torch.no_grad()
def sample(model, tok, prompts, n=1, temperature=0.7, max_new_tokens=96, seed=0, batch_size=16, bf16=False):
    """-> list of (prompt_ids, response_ids, text, eos) for each prompt, n samples each (prompt-major order).
    bf16: sample from a bf16 copy of the weights (nanoalign.fast.sampling_copy)."""
    model = sampling_copy(model) if bf16 else model
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    jobs, out = [tok.render_prompt(p) for p in prompts for _ in range(n)], []
    for i in range(0, len(jobs), batch_size):
        ro = generate(model, jobs[i:i + batch_size], max_new_tokens, tok.eos_id, tok.pad_id, temperature, generator=g)
        out += [(p, r, tok.decode(r), bool(r) and r[-1] == tok.eos_id)
                for p, r in zip(jobs[i:i + batch_size], ro.responses())]
    return out


@torch.no_grad()
def response_logprobs(model, samples, pad_id, temperature, batch_size=16, bf16=False) -> list[float]:
    """log π(y|x) of each sample's response at the sampling temperature, batched by length (less padding). bf16:
    the trunk under bf16 autocast; the lm_head and its log-softmax stay fp32 (logprobs.logprobs_chunked)."""
    device, out = next(model.parameters()).device, {}
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]) + len(samples[i][1]))
    for i in range(0, len(order), batch_size):
        chunk = [(p + r, [0] * len(p) + [1] * len(r)) for p, r, _, _ in (samples[j] for j in order[i:i + batch_size])]
        ids, att, resp = (v.to(device) for v in collate_sft(chunk, pad_id).values())  # (B, T) each, right-padded
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out.update(zip(order[i:i + batch_size], sequence_logprobs(model, ids, att, resp, temperature).tolist()))
    return [out[j] for j in range(len(samples))]


@torch.no_grad()
def rm_scores(rm, tok, prompts, texts, batch_size=16) -> list[float]:
    """Reward-model score of each (prompt, response), read at the closing <|im_end|>, where the RM was trained to
    read it. Batched by length, as response_logprobs: less padding."""
    device, seqs, out = next(rm.parameters()).device, [], {}
    for p, t in zip(prompts, texts):
        ids, mask = tok.render_chat(_msgs(p) + [{"role": "assistant", "content": t}])
        end = max(j for j, m in enumerate(mask) if m)  # the closing <|im_end|>
        seqs.append(ids[:end + 1])
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        chunk = [seqs[j] for j in idx]
        att = pad([[1] * len(s) for s in chunk], 0).to(device)
        out.update(zip(idx, last_token_rewards(rm, pad(chunk, tok.pad_id).to(device), att).tolist()))
    return [out[j] for j in range(len(seqs))]


def _msgs(p):
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def load_rm(path: str, device="cpu"):
    rm, tok = load(path, device)
    check(rm.score is not None, f"{path}: not a reward model (no score head)")
    return rm.eval(), tok


def make_judge(judge: str, device="cpu"):
    """-> fn(rows, texts) -> scores. 'gold' is the task suite's checker; anything else is an RM checkpoint."""
    if judge == "gold":
        return lambda rows, texts: [gold_score(t, r) for r, t in zip(rows, texts)]
    rm, tok = load_rm(judge, device)
    return lambda rows, texts: rm_scores(rm, tok, [r["prompt"] for r in rows], texts)


def mean_stderr(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def win_rate(scores, ref_scores, lengths, ref_lengths) -> dict:
    """Pairwise comparison per prompt: a win is 1, a tie 1/2 (AlpacaEval). Also the win rate over non-tied pairs,
    and within buckets of the length ratio policy/ref (shorter < 0.8 <= similar <= 1.25 < longer)."""
    points = [1.0 if s > r else 0.5 if s == r else 0.0 for s, r in zip(scores, ref_scores)]
    n, wins, ties = len(points), points.count(1.0), points.count(0.5)
    res = {"win_rate": sum(points) / n, "wins": wins, "ties": ties, "losses": n - wins - ties,
           "win_rate_non_tied": wins / (n - ties) if n > ties else 0.5}
    buckets = {}
    for p, a, b in zip(points, lengths, ref_lengths):
        ratio = (a + 1) / (b + 1)
        buckets.setdefault("shorter" if ratio < 0.8 else "longer" if ratio > 1.25 else "similar", []).append(p)
    res["win_rate_by_length"] = {k: sum(v) / len(v) for k, v in sorted(buckets.items())}
    res["n_by_length"] = {k: len(v) for k, v in sorted(buckets.items())}
    return res


def evaluate_model(model, tok, rows, judge, cfg, ref=None, ref_samples=None, ref_scores=None, samples=None) -> dict:
    """Judge `model`'s cfg.samples responses per row; with a reference, the win rate and KL against it.
    samples: reuse these; `ref_samples` itself when the model is the reference (KL 0, every prompt a tie)."""
    t0, rep = time.time(), [r for r in rows for _ in range(cfg.samples)]
    if samples is None:
        samples = sample(model, tok, [r["prompt"] for r in rows], cfg.samples, cfg.temperature, cfg.max_new_tokens,
                         cfg.seed, cfg.batch_size, cfg.bf16)
    texts, lengths = [s[2] for s in samples], [len(s[1]) for s in samples]
    scores = judge(rep, texts)
    res = {"gold_mean": None, "gold_stderr": None, "n": len(samples), "mean_length": sum(lengths) / len(samples),
           "eos_rate": sum(s[3] for s in samples) / len(samples)}
    if all("constraints" in r for r in rows):  # else the judge is an RM and no gold score exists
        res["gold_mean"], res["gold_stderr"] = mean_stderr([gold_score(t, r) for r, t in zip(rep, texts)])
        res.update(by_family=score_by_family(texts, rep), **unrequested_rates(texts, rep))
    if cfg.judge != "gold":
        res["judge_mean"], res["judge_stderr"] = mean_stderr(scores)
    if ref is not None:
        if cfg.temperature == 0:
            res["kl"] = None  # greedy decoding is a point mass: its KL to ref is not a number worth reporting
        elif samples is ref_samples:
            res["kl"] = 0.0
        else:  # per-token KL(π || π_ref) on π's own samples at T: k1 = log π(y) - log π_ref(y), unbiased
            lp, rlp = (response_logprobs(m, samples, tok.pad_id, cfg.temperature, cfg.batch_size, cfg.bf16)
                       for m in (model, ref))
            res["kl"] = (sum(lp) - sum(rlp)) / sum(lengths)
        res.update(win_rate(scores, ref_scores, lengths, [len(s[1]) for s in ref_samples]))
    res["examples"] = [{"prompt": r["prompt"], "completion": t} for r, t in zip(rep[:3], texts[:3])]
    res["eval_s"] = round(time.time() - t0, 1)
    return res


def best_of_n(model, tok, rows, judge, cfg) -> dict:
    """The judge's favourite of cfg.best_of_n fresh samples per prompt: its scores; cfg.write_best: the rows as SFT
    data (rejection sampling)."""
    k = cfg.best_of_n
    samples = sample(model, tok, [r["prompt"] for r in rows], k, cfg.temperature, cfg.max_new_tokens, cfg.seed + 1,
                     cfg.batch_size, cfg.bf16)
    scores = judge([r for r in rows for _ in range(k)], [s[2] for s in samples])
    pick = [max(range(i * k, (i + 1) * k), key=lambda j: scores[j]) for i in range(len(rows))]
    best = [samples[j][2] for j in pick]
    m, se = (mean_stderr([gold_score(t, r) for r, t in zip(rows, best)]) if all("constraints" in r for r in rows)
             else (None, None))
    if cfg.write_best:
        write_jsonl(cfg.write_best, [{"messages": _msgs(r["prompt"]) + [{"role": "assistant", "content": t}],
                                      "constraints": r.get("constraints")} for r, t in zip(rows, best)])
    return {"best_of_n": k, "best_of_n_gold_mean": m, "best_of_n_gold_stderr": se,
            "best_of_n_judge_mean": sum(scores[j] for j in pick) / len(pick)}


def rm_accuracy(rm, tok, prefs: list[dict]) -> dict:
    """RewardBench-style pairwise accuracy: the fraction of pairs whose chosen response the RM scores higher."""
    n, texts = len(prefs), [r[k][-1]["content"] for k in ("chosen", "rejected") for r in prefs]
    scores = rm_scores(rm, tok, [r["prompt"] for r in prefs] * 2, texts)  # both sides in one call: batched by length
    margins = [a - b for a, b in zip(scores[:n], scores[n:])]
    return {"rm_accuracy": sum(x > 0 for x in margins) / len(prefs), "rm_margin": sum(margins) / len(prefs),
            "rm_n": len(prefs)}


def format_table(results: dict, judge: str = "gold") -> str:
    """A markdown table; a column no model has a number for is left out, and the win rate names its judge."""
    cols = [("gold_mean", "gold", ".3f"), ("gold_stderr", "± se", ".3f"), ("judge_mean", "RM score", ".3f"),
            ("win_rate", f"win vs ref ({'gold' if judge == 'gold' else 'RM'})", ".3f"),
            ("win_rate_non_tied", "win (non-tied)", ".3f"), ("kl", "KL to ref", ".3f"),
            ("unrequested_rate", "unrequested", ".3f"), ("mean_length", "length", ".1f"),
            ("eos_rate", "EOS rate", ".2f")]
    num = lambda v: isinstance(v, (int, float))
    cols = [c for c in cols if any(num(r.get(c[0])) for r in results.values())]
    lines = [["model"] + [h for _, h, _ in cols], ["---"] * (len(cols) + 1)]
    lines += [[name] + [format(r[k], f) if num(r.get(k)) else "—" for k, _, f in cols] for name, r in results.items()]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


@dataclass
class Config:
    """Gold-judged evaluation: --model M (or --compare A B ...) on --prompts, optionally against --ref."""
    model: str = ""  # model to evaluate (preset, alias, checkpoint dir, .gguf)
    compare: list[str] = field(default_factory=list)  # NAME=MODEL (or MODEL) ... evaluated on the same prompts
    prompts: str = ""  # prompts JSONL with task metadata (eval.jsonl)
    ref: str = ""  # reference model for win rate and KL
    judge: str = "gold"  # judge of the win rate and best-of-n: gold, or a reward-model checkpoint dir
    prefs: str = ""  # preference JSONL on which --rm's pairwise accuracy is reported
    rm: str = ""  # reward model whose pairwise accuracy on --prefs is reported (default: an RM --judge)
    samples: int = 1  # samples per prompt
    best_of_n: int = 0  # also report best-of-n (0 = off)
    write_best: str = ""  # with --best-of-n: write the best responses as an SFT JSONL (rejection sampling)
    temperature: float = 0.7  # sampling temperature (KL is measured at it); 0 = greedy
    max_new_tokens: int = 96  # per response
    limit: int = 0  # evaluate only the first N prompts (0 = all)
    batch_size: int = 16  # generation batch
    seed: int = 0  # sampling seed (the same for every model)
    out: str = ""  # results JSON path
    device: str = "cpu"  # cpu or cuda
    bf16: bool = False  # bf16 copies to sample from; bf16 autocast for the KL's and the pair accuracy's forwards


def main(cfg: Config) -> dict:
    # 1. every input is checked before any sampling: flags, files, the judge's metadata, every model path, the RM
    check(bool(cfg.model) != bool(cfg.compare), "give exactly one of --model or --compare")
    check_ranges(cfg, positive=("samples", "batch_size", "max_new_tokens"),
                 non_negative=("limit", "best_of_n", "temperature"))
    check(not cfg.write_best or cfg.best_of_n > 0, "--write-best needs --best-of-n N")
    check(not cfg.prefs or cfg.judge != "gold" or cfg.rm, "--prefs needs --rm or a reward model as --judge")
    for path in (cfg.out, cfg.write_best):
        check(not path or os.path.isdir(os.path.dirname(os.path.abspath(path))), f"{path}: directory does not exist")
        check(not os.path.isdir(path), f"{path}: is a directory, not a file path")
    rows = read_prompts(cfg.prompts)[:cfg.limit or None]
    check_rows(rows, cfg.prompts, need_all=cfg.judge == "gold")
    prefs = read_prefs(cfg.prefs, "--prefs") if cfg.prefs else None
    named = [s.split("=", 1) if "=" in s else (os.path.basename(s.rstrip("/")) or s, s) for s in
             cfg.compare or [cfg.model]]
    check(len({n for n, _ in named}) == len(named), "--compare: two models have the same NAME")
    for _, path in named + ([("ref", cfg.ref)] if cfg.ref else []):  # hub.load's cheap checks; the weights come later
        check(path != "", "--compare: NAME=MODEL with an empty MODEL")
        if os.path.isdir(path):
            read_config(path)
            Tokenizer.from_dir(path)
        elif path not in PRESETS and path != ALIAS and not (path.endswith(".gguf") and os.path.isfile(path)):
            load(path)  # no such model: raises the UserError that names it before reading any weights
    judge = make_judge(cfg.judge, cfg.device)
    rm_acc = {}
    if prefs:  # done before the sampling, so that a wrong --rm fails early; --bf16: the RM's training autocast
        with torch.autocast(torch.device(cfg.device).type, torch.bfloat16, enabled=cfg.bf16):
            rm_acc = rm_accuracy(*load_rm(cfg.rm or cfg.judge, cfg.device), prefs)
        print(f"reward model {cfg.rm or cfg.judge}: pair accuracy {rm_acc['rm_accuracy']:.3f} on {cfg.prefs} "
              f"(n={rm_acc['rm_n']})", flush=True)
    # 2. the reference's samples, judged once, for every model's win rate
    ref = ref_tok = ref_samples = ref_scores = None
    if cfg.ref:
        ref, ref_tok = load(cfg.ref, cfg.device)
        ref_samples = sample(ref.eval(), ref_tok, [r["prompt"] for r in rows], cfg.samples, cfg.temperature,
                             cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.bf16)
        ref_scores = judge([r for r in rows for _ in range(cfg.samples)], [s[2] for s in ref_samples])
    # 3. each model: sample, judge, KL to the reference, best-of-n
    results, t0 = {}, time.time()
    for i, (name, path) in enumerate(named):
        same = bool(cfg.ref) and os.path.realpath(path) == os.path.realpath(cfg.ref)
        model, tok = (ref, ref_tok) if same else load(path, cfg.device)
        check(ref is None or ref_tok.vocab_size == tok.vocab_size,
              f"{path}: tokenizer differs from --ref {cfg.ref}; KL needs a shared vocabulary")
        r = results[name] = evaluate_model(model.eval(), tok, rows, judge, cfg, ref, ref_samples, ref_scores,
                                           ref_samples if same else None)
        if cfg.best_of_n:
            r.update(best_of_n(model, tok, rows, judge, cfg))
        score = (f"gold {r['gold_mean']:.3f} ± {r['gold_stderr']:.3f}" if r["gold_mean"] is not None
                 else f"RM score {r['judge_mean']:.3f} ± {r['judge_stderr']:.3f}")
        print(f"{name}: {score} ({r['eval_s']}s) | {i + 1}/{len(named)} models | "
              f"eta {(time.time() - t0) / (i + 1) * (len(named) - i - 1):.0f}s", flush=True)
    print(format_table(results, cfg.judge))
    out = {**results, **({"rm": rm_acc} if rm_acc else {})} if cfg.compare else {**results[named[0][0]], **rm_acc}
    if cfg.out:
        write_json(cfg.out, out)
    return out


if __name__ == "__main__":
    run(main, Config)
