"""Evaluate a model on held-out prompts with a judge that cannot be fooled: the task suite's gold checker.

    python -m nanoalign.evaluate --model out/demo/dpo --prompts data/eval.jsonl --ref out/demo/sft
    python -m nanoalign.evaluate --compare base=smollm2-135m-instruct sft=out/demo/sft dpo=out/demo/dpo \
        --ref out/demo/sft --prompts data/eval.jsonl --out out/demo/results.json

Reports the gold score ± standard error and per constraint family, the win rate against --ref (the judge compares
the two responses to each prompt; ties count half, as in AlpacaEval), the per-token KL(policy || ref) on the
policy's own samples at the evaluation temperature, the mean length with a length-bucketed win rate (the talk's
warning about length bias), and the EOS rate. With an RM directory as --judge it also reports pairwise accuracy on
--prefs (RewardBench style). --best-of-n N samples N responses and keeps the judge's favourite: the inference-time
upper bound that PPO and DPO are compared against (and, with --write-best, a rejection-sampling SFT set).
"""
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .cli import UserError, check, run
from .generate import generate, sampling_copy
from .logprobs import token_logprobs
from .model import last_token_index
from .judge import check_rows
from .judge import score as gold_score
from .judge import score_by_family


@torch.no_grad()
def sample(model, tok, prompts, n=1, temperature=0.7, max_new_tokens=96, seed=0, batch_size=16, bf16=False):
    """-> list of (prompt_ids, response_ids, text, eos) for each prompt, n samples each (prompt-major order).
    bf16: sample from a bf16 copy of the weights (~1.35x faster decoding at batch 8 on this CPU)."""
    model = sampling_copy(model) if bf16 else model
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    jobs = [tok.render_prompt(p) for p in prompts for _ in range(n)]
    out = []
    for i in range(0, len(jobs), batch_size):
        ro = generate(model, jobs[i:i + batch_size], max_new_tokens, tok.eos_id, tok.pad_id, temperature, generator=g)
        for p, r in zip(jobs[i:i + batch_size], ro.responses()):
            eos = bool(r) and r[-1] == tok.eos_id
            out.append((p, r, tok.decode(r), eos))
    return out


def _batch(seqs, pad_id, masks=None):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    lab = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], att[i, :len(s)] = torch.tensor(s), 1
        if masks is not None:
            lab[i, :len(s)] = torch.tensor(masks[i])
    return ids, att, lab


@torch.no_grad()
def response_logprobs(model, samples, pad_id, temperature, batch_size=16, bf16=False):
    """Summed log-probs (at the sampling temperature) and token counts of each sample's response.
    bf16: the trunk under bf16 autocast (~2x faster here); the lm_head and log-softmax stay fp32 (pitfall 4)."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        seqs = [p + r for p, r, _, _ in chunk]
        masks = [[0] * len(p) + [1] * len(r) for p, r, _, _ in chunk]
        ids, att, lab = (t.to(device) for t in _batch(seqs, pad_id, masks))
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            lp = token_logprobs(model, ids, att, labels_mask=lab, temperature=max(temperature, 1e-6))
        sums += lp.sum(-1).tolist()
        counts += lab[:, 1:].sum(-1).tolist()
    return sums, counts


@torch.no_grad()
def rm_scores(rm, tok, prompts_msgs, texts, batch_size=16, open_end=False):
    """Reward-model score of each (prompt, response), read at the last real token (open_end: the response's last
    token, with the closing EOS left off)."""
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        seqs = []
        for p, t in zip(prompts_msgs[i:i + batch_size], texts[i:i + batch_size]):
            ids, mask = tok.render_chat(_msgs(p) + [{"role": "assistant", "content": t}])
            end = max(j for j, m in enumerate(mask) if m)  # the closing <|im_end|>: where the RM was trained to read
            seqs.append(ids[:end + (not open_end)])
        ids, att, _ = (t.to(device) for t in _batch(seqs, tok.pad_id))
        h = rm(ids, attention_mask=att, return_hidden=True)  # (B, T, C)
        last = last_token_index(att)
        out += rm.score(h[torch.arange(len(seqs), device=device), last]).squeeze(-1).float().tolist()
    return out


def _msgs(p):
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def make_judge(judge: str, device="cpu"):
    """-> fn(rows, texts) -> scores. 'gold' is the task suite's checker; anything else is an RM checkpoint."""
    if judge == "gold":
        return lambda rows, texts: [gold_score(t, r) for r, t in zip(rows, texts)]
    from .hub import load
    rm, rm_tok = load(judge, device)
    if rm.score is None:
        raise UserError(f"{judge}: --judge must be 'gold' or a reward model checkpoint (this one has no score head)")
    rm.eval()
    return lambda rows, texts: rm_scores(rm, rm_tok, [r["prompt"] for r in rows], texts)


def mean_stderr(xs):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(n - 1, 1)
    return m, math.sqrt(var / n)


def win_rate(scores, ref_scores, lengths=None, ref_lengths=None) -> dict:
    """Pairwise comparison per prompt: a win is 1, a tie 1/2 (AlpacaEval). Also the win rate over non-tied pairs
    and, with lengths, within buckets of the length ratio policy/ref (shorter < 0.8 <= similar <= 1.25 < longer)."""
    w = sum(s > r for s, r in zip(scores, ref_scores))
    ties = sum(s == r for s, r in zip(scores, ref_scores))
    n = len(scores)
    res = {"win_rate": (w + 0.5 * ties) / n, "wins": w, "ties": ties, "losses": n - w - ties,
           "win_rate_non_tied": w / (n - ties) if n > ties else 0.5}
    if lengths is not None:
        buckets = {}
        for s, r, a, b in zip(scores, ref_scores, lengths, ref_lengths):
            ratio = (a + 1) / (b + 1)
            key = "shorter" if ratio < 0.8 else "longer" if ratio > 1.25 else "similar"
            buckets.setdefault(key, []).append(1.0 if s > r else 0.5 if s == r else 0.0)
        res["win_rate_by_length"] = {k: sum(v) / len(v) for k, v in sorted(buckets.items())}
        res["n_by_length"] = {k: len(v) for k, v in sorted(buckets.items())}
    return res


def evaluate_model(model, tok, rows, judge, cfg, ref=None, ref_samples=None, ref_scores=None, samples=None,
                   same_as_ref=False) -> dict:
    """samples: reuse these (the --ref model's own samples when it is also being evaluated, same_as_ref)."""
    t0 = time.time()
    if samples is None:
        samples = sample(model, tok, [r["prompt"] for r in rows], cfg.samples, cfg.temperature, cfg.max_new_tokens,
                         cfg.seed, cfg.batch_size, cfg.bf16)
    n = cfg.samples
    rep_rows = [r for r in rows for _ in range(n)]
    texts = [s[2] for s in samples]
    scores = judge(rep_rows, texts)
    gold = [gold_score(t, r) for r, t in zip(rep_rows, texts)] if all("constraints" in r for r in rows) else None
    m, se = mean_stderr(gold if gold is not None else scores)
    res = {"gold_mean": m, "gold_stderr": se, "n": len(samples),
           "mean_length": sum(len(s[1]) for s in samples) / len(samples),
           "eos_rate": sum(s[3] for s in samples) / len(samples)}
    if gold is not None:
        res["by_family"] = score_by_family(texts, rep_rows)
    if cfg.judge != "gold":
        res["judge_mean"] = sum(scores) / len(scores)
    if ref is not None:
        res["kl"] = None  # greedy decoding is a point mass: its KL to ref is not a number worth reporting
        if cfg.temperature > 0 and same_as_ref:
            res["kl"] = 0.0  # the reference itself: no forward passes needed
        elif cfg.temperature > 0:
            lp, cnt = response_logprobs(model, samples, tok.pad_id, cfg.temperature, cfg.batch_size, cfg.bf16)
            rlp, _ = response_logprobs(ref, samples, tok.pad_id, cfg.temperature, cfg.batch_size, cfg.bf16)
            # per-token KL(pi || ref) estimated on pi's own samples (k1, unbiased; >= 0 on average, pitfall 5)
            res["kl"] = sum(a - b for a, b in zip(lp, rlp)) / max(sum(cnt), 1)
        res.update(win_rate(scores, ref_scores, [len(s[1]) for s in samples], [len(s[1]) for s in ref_samples]))
    res["examples"] = [{"prompt": r["prompt"], "completion": t} for r, t in zip(rep_rows[:3], texts[:3])]
    res["eval_s"] = round(time.time() - t0, 1)
    return res


def best_of_n(model, tok, rows, judge, cfg) -> tuple[dict, list]:
    samples = sample(model, tok, [r["prompt"] for r in rows], cfg.best_of_n, cfg.temperature, cfg.max_new_tokens,
                     cfg.seed + 1, cfg.batch_size, cfg.bf16)
    k = cfg.best_of_n
    rep_rows = [r for r in rows for _ in range(k)]
    scores = judge(rep_rows, [s[2] for s in samples])
    best, best_scores = [], []
    for i, r in enumerate(rows):
        j = max(range(k), key=lambda j: scores[i * k + j])
        best_scores.append(scores[i * k + j])
        best.append({"messages": _msgs(r["prompt"]) + [{"role": "assistant", "content": samples[i * k + j][2]}],
                     "constraints": r.get("constraints")})
    gold = [gold_score(b["messages"][-1]["content"], r) for b, r in zip(best, rows)] \
        if all("constraints" in r for r in rows) else best_scores
    m, se = mean_stderr(gold)
    return {"best_of_n": k, "best_of_n_gold_mean": m, "best_of_n_gold_stderr": se}, best


@torch.no_grad()
def rm_accuracy(rm_dir: str, prefs_path: str, device="cpu") -> dict:
    from .data import read_prefs
    from .hub import load
    rm, tok = load(rm_dir, device)
    check(rm.score is not None, f"{rm_dir}: not a reward model (no score head)")
    rows = read_prefs(prefs_path)
    prompts = [r["prompt"] for r in rows]
    ch = rm_scores(rm.eval(), tok, prompts, [r["chosen"][-1]["content"] for r in rows])
    rj = rm_scores(rm, tok, prompts, [r["rejected"][-1]["content"] for r in rows])
    return {"rm_accuracy": sum(a > b for a, b in zip(ch, rj)) / len(rows), "rm_margin": sum(a - b for a, b in
            zip(ch, rj)) / len(rows), "rm_n": len(rows)}


TABLE = [("gold_mean", "gold", "{:.3f}"), ("gold_stderr", "± se", "{:.3f}"), ("win_rate", "win vs ref", "{:.3f}"),
         ("win_rate_non_tied", "win (non-tied)", "{:.3f}"), ("kl", "KL to ref", "{:.3f}"),
         ("mean_length", "length", "{:.1f}"), ("eos_rate", "EOS rate", "{:.2f}")]


def format_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(h for _, h, _ in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "—" for k, _, fmt in TABLE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Config:
    """Gold-judged evaluation: --model M (or --compare A B ...) on --prompts, optionally against --ref."""
    model: str = ""  # model to evaluate (preset, alias, checkpoint dir, .gguf)
    compare: list[str] = field(default_factory=list)  # NAME=MODEL (or MODEL) ... evaluated on the same prompts
    prompts: str = ""  # prompts JSONL with task metadata (eval.jsonl)
    ref: str = ""  # reference model for win rate and KL
    judge: str = "gold"  # gold, or a reward-model checkpoint dir
    prefs: str = ""  # preference JSONL for RM pairwise accuracy (of an RM --judge, or of --rm)
    rm: str = ""  # a reward model whose pairwise accuracy on --prefs is reported (the judge can stay gold)
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
    bf16: bool = False  # bf16 copies to sample from, bf16 autocast for the KL's forwards (log-probs stay fp32)


def main(cfg: Config) -> dict:
    from .data import read_prompts
    from .hub import load
    check(bool(cfg.model) != bool(cfg.compare), "give exactly one of --model or --compare")
    check(cfg.samples > 0 and cfg.batch_size > 0 and cfg.max_new_tokens > 0,
          "--samples, --batch-size and --max-new-tokens must be > 0")
    check(cfg.limit >= 0 and cfg.best_of_n >= 0, "--limit and --best-of-n must be >= 0")
    check(not cfg.write_best or cfg.best_of_n > 0, "--write-best needs --best-of-n N")
    check(not cfg.prefs or cfg.judge != "gold" or cfg.rm, "--prefs (RM accuracy) needs --rm or a reward model as "
          "--judge")
    for path in (cfg.out, cfg.write_best):
        check(not path or os.path.isdir(os.path.dirname(os.path.abspath(path))), f"{path}: directory does not exist")
        check(not os.path.isdir(path), f"{path}: is a directory, not a file path")
    check(cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}")
    rows = read_prompts(cfg.prompts)[:cfg.limit or None]
    check_rows(rows, cfg.prompts, need_all=cfg.judge == "gold")  # bad task metadata: an error now, not after sampling
    specs = cfg.compare or [cfg.model]
    named = [(s.split("=", 1) if "=" in s else (os.path.basename(s.rstrip("/")) or s, s)) for s in specs]
    judge = make_judge(cfg.judge, cfg.device)
    ref = ref_tok = ref_samples = ref_scores = None
    if cfg.ref:
        ref, ref_tok = load(cfg.ref, cfg.device)
        ref.eval()
        ref_samples = sample(ref, ref_tok, [r["prompt"] for r in rows], cfg.samples, cfg.temperature,
                             cfg.max_new_tokens, cfg.seed, cfg.batch_size, cfg.bf16)
        ref_scores = judge([r for r in rows for _ in range(cfg.samples)], [s[2] for s in ref_samples])
    results, t0 = {}, time.time()
    for i, (name, path) in enumerate(named):
        model, tok = load(path, cfg.device)
        model.eval()
        if ref is not None and ref_tok.vocab_size != tok.vocab_size:
            raise UserError(f"{path}: tokenizer differs from --ref {cfg.ref}; KL needs a shared vocabulary")
        same = cfg.ref and os.path.realpath(path) == os.path.realpath(cfg.ref)  # reuse the ref's own samples
        results[name] = evaluate_model(model, tok, rows, judge, cfg, ref, ref_samples, ref_scores,
                                       ref_samples if same else None, bool(same))
        if cfg.best_of_n:
            bon, best = best_of_n(model, tok, rows, judge, cfg)
            results[name].update(bon)
            if cfg.write_best:
                with open(cfg.write_best + ".tmp", "w") as f:
                    f.writelines(json.dumps(b) + "\n" for b in best)
                os.replace(cfg.write_best + ".tmp", cfg.write_best)
        print(f"{name}: gold {results[name]['gold_mean']:.3f} ± {results[name]['gold_stderr']:.3f} "
              f"({results[name]['eval_s']}s) | {i + 1}/{len(named)} models | "
              f"eta {(time.time() - t0) / (i + 1) * (len(named) - i - 1):.0f}s", flush=True)
    if cfg.prefs and (cfg.rm or cfg.judge != "gold"):
        results["rm"] = rm_accuracy(cfg.rm or cfg.judge, cfg.prefs, cfg.device)
        print(f"reward model {cfg.rm or cfg.judge}: held-out pair accuracy {results['rm']['rm_accuracy']:.3f} "
              f"(n={results['rm']['rm_n']})")
    print(format_table({k: v for k, v in results.items() if "gold_mean" in v}))
    out = results if cfg.compare else {**results[named[0][0]], **results.get("rm", {})}
    if cfg.out:
        tmp = cfg.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, cfg.out)
    return out


if __name__ == "__main__":
    run(main, Config)
