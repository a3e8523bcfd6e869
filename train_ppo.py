"""RLHF with PPO: maximise E[r(x, y)] − β·KL(π‖π_ref) (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), with a value
head and GAE, or the critic-free RLOO / GRPO estimators.

Each iteration is one pass of the numbered loop in main(), as in lm-human-preference-details:
  1. rollout     k responses per prompt sampled from π at temperature T, pure sampling (no top-k/top-p)
  2. score       reward model (read at the last real token) or the gold judge (RL with verifiable rewards)
  3. log-probs   fresh forward passes of π_old and π_ref at temperature T, not the sampler's scores
  4. rewards     r_t = −β·KL_t per token, plus the score on the last response token; β fixed or adaptive
  5. advantages  GAE on a learned value V(s_t), or RLOO / GRPO over the k samples of each prompt
  6. update      --ppo-epochs over shuffled minibatches: clipped surrogate (+ vf_coef × clipped value loss)
                 (+ ptx_coef × the NLL of a batch of demonstrations: InstructGPT's PPO-ptx, with --ptx-data)
  7. log         score, gold score, KL, β, approx_kl, clipfrac, value loss, explained variance, length, EOS rate
Where the prompts carry task metadata, the gold score is logged even when a reward model is the reward, so the
log holds the over-optimisation curve: proxy score up, gold score down (Gao et al. 2022).

Run:
    python -m nanoalign.tasks make --out data --seed 0
    python train_sft.py --data data/sft.jsonl --out out/sft
    python train_rm.py --init out/sft --data data/prefs.jsonl --out out/rm
    python train_ppo.py --init out/sft --prompts data/prompts.jsonl --reward out/rm --out out/ppo
    python train_ppo.py --init out/sft --prompts data/prompts.jsonl --reward gold --estimator rloo --out out/rloo

The KL with the critic-free estimators: RLOO folds it into the sequence reward, score − β·Σ_t KL_t, as Ahmadian et
al. 2024 (§3) and TRL do; GRPO normalises the scores alone and adds β·KL (k3, per token) to the loss, as Shao et al.
2024 (eq. 3) do: dividing a KL-folded reward by the group's std would blow tiny KL differences between responses
that tie on score up into full-size advantages.

With k > 1 samples per prompt, every forward of steps 2, 3 and 6 runs a prompt ONCE for its k responses: one row
[prompt | response 1 | ... | response k] (rl.share_prompts; DPO does the same for a pair). The minibatches then
shuffle whole prompts, not single responses. On the demo's RLOO run (4 prompts × 4 samples) that halves the update
and the scoring (docs/performance.md); --share-prompt false restores one row per response.

PPO-ptx (Ouyang et al. 2022, eq. 2, the γ term): InstructGPT mixed pretraining gradients into every update so the
policy keeps what it already did well. --ptx-data takes an SFT JSONL instead (the demonstrations, as DeepSpeed-Chat's
unsupervised mix and OpenRLHF's --pretrain_data allow): each minibatch adds --ptx-coef × the token-mean NLL of
--ptx-batch demonstration rows, drawn in a seeded order that is a pure function of the update's index.

Simplifications: the value head shares the policy's trunk (an nn.Linear on its final hidden states, as TRL's
AutoModelForCausalLMWithValueHead; lm-human-preferences trains a separate value network); a constant learning rate;
--normalize-reward fixes the RM's gain and bias from the first rollout alone (lm-human-preferences uses a larger
sample of the initial policy). Sampling and shuffling draw from generators seeded by (seed, iteration), so --resume
needs no sampler state.

Data parallel (torchrun) takes the same steps as one process with the same global batch: the sampling uniforms and
the minibatch shuffles are drawn for the GLOBAL batch (each rank uses its rows), whitening takes its moments over
every rank, and each loss is a token sum over the GLOBAL count of the minibatch's tokens, so the all-reduced
gradients are those of the global token mean (pitfall 7). The logged metrics are global means too. What is left
is float summation order (another left-pad width, another batch shape): ~1e-6 on the logs, and a sample flips only
if its uniform lands within that rounding of a CDF boundary (more likely with --bf16's sampling copy).
"""
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import save_file

from nanoalign import loop
from nanoalign.checkpoint import atomic_write
from nanoalign.cli import Logger, check
from nanoalign.data import collate_sft, read_prompts, read_sft, tokenize_sft
from nanoalign.generate import generate, sampling_copy
from nanoalign.hub import load
from nanoalign.judge import check_rows
from nanoalign.judge import score as gold_score
from nanoalign.logprobs import logprobs_chunked, token_logprobs
from nanoalign.lora import disable_adapter
from nanoalign.losses import sft_loss, whiten
from nanoalign.model import last_token_index
from nanoalign.packing import local_rows, share_prompts
from nanoalign.rl import (AdaptiveKLController, FixedKLController, explained_variance, gae, grpo_advantages, kl_penalty,
                          per_token_rewards, ppo_policy_loss, ppo_value_loss, rloo_advantages,
                          token_mean)


@dataclass
class Config:
    """PPO / RLOO / GRPO against a reward model or the gold judge, with a KL penalty to the initial policy."""
    init: str = "smollm2-135m-instruct"  # the policy to start from (usually the SFT checkpoint); also the reference
    prompts: str = ""  # prompts JSONL: {"prompt": str or [messages], ...}; task metadata ("constraints") is kept
    reward: str = "gold"  # a reward-model checkpoint dir, or "gold" (the task suite's judge: verifiable rewards)
    out: str = ""  # output dir: checkpoint, value_head.safetensors, adapter/, log.jsonl, metrics.json, train_state.pt
    estimator: str = "gae"  # advantages: gae (value head), rloo (leave-one-out), grpo (group mean/std)
    kl_coef: float = 0.05  # β, the KL penalty coefficient (the initial β with --target-kl)
    target_kl: float = 0.0  # > 0: adapt β towards this KL per response (Ziegler et al. 2019); 0 = fixed β
    kl_horizon: int = 10000  # adaptive β: horizon in samples
    kl_estimator: str = "k1"  # per-token KL: k1 = log π/π_ref; k3 = (ρ−1) − log ρ, ρ = π_ref/π (≥ 0 pointwise)
    whiten_rewards: bool = False  # scale the per-token rewards to unit variance, mean kept (gae only)
    gamma: float = 1.0  # GAE discount γ
    lam: float = 0.95  # GAE λ
    clip: float = 0.2  # PPO ratio clip ε
    value_clip: float = 0.2  # value clip ε_v
    vf_coef: float = 0.1  # value loss coefficient
    entropy_coef: float = 0.0  # entropy bonus (0 = off; > 0 builds the full logits of each minibatch)
    value_from_rm: bool = False  # initialise the value head from the reward model's score head (else zeros)
    ppo_epochs: int = 4  # optimisation passes over each rollout
    rollout_batch: int = 16  # prompts per iteration, over all ranks
    samples_per_prompt: int = 0  # k responses per prompt; 0 = 1 for gae, 4 for rloo/grpo (which need k >= 2)
    share_prompt: bool = True  # k > 1: a prompt and its k responses run as ONE row, the prompt once (minibatches
    #                            then hold whole prompts: --minibatch-size must be a multiple of k)
    minibatch_size: int = 8  # responses per optimizer step, over all ranks
    max_new_tokens: int = 64  # response length cap
    temperature: float = 0.7  # sampling temperature; every log-prob is taken at it too (logits / T)
    missing_eos_penalty: float = -1.0  # added to the score of a response cut off before EOS
    normalize_reward: bool = False  # RM scores -> mean 0, std 1 on the first rollout's samples (of the initial
    #                                 policy), a gain and bias fixed for the run (lm-human-preferences)
    ptx_data: str = ""  # PPO-ptx: SFT JSONL whose NLL joins every minibatch loss (InstructGPT's γ term)
    ptx_coef: float = 0.0  # γ, the weight of that NLL (a token mean over the ptx batch); needs --ptx-data
    ptx_batch: int = 4  # demonstration rows per minibatch, over all ranks
    max_steps: int = 100  # iterations (rollout + update)
    lr: float = 1e-5  # constant learning rate (LoRA usually wants ~1e-4)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_len: int = 512  # prompts longer than this (tokens) are dropped and counted
    seed: int = 0  # seeds sampling, shuffling and the LoRA init
    lora_rank: int = 0  # 0 = full fine-tune (the reference is a frozen copy); > 0 = LoRA (reference: adapter off)
    lora_alpha: float = 32.0  # LoRA scale alpha / rank (LoRA dropout is 0: no dropout during RL)
    nf4: bool = False  # QLoRA: freeze the base in 4-bit NF4 (needs --lora-rank)
    device: str = "auto"  # cpu, cuda, or auto
    compile: bool = False  # torch.compile the decode step and the log-prob kernels
    resume: bool = False  # continue the run in --out from its train_state.pt
    log_every: int = 1  # progress line + log.jsonl row every N iterations
    save_every: int = 0  # write train_state.pt every N iterations, for --resume (0 = never)
    bf16: bool = False  # bf16 autocast for the trunk in scoring and updates (log-probs, values, losses stay fp32);
    #                     rollouts sample from a bf16 copy of the weights
    skip_nonfinite: bool = False  # skip (and count) minibatches with a non-finite loss instead of stopping


def forward(model, value_head, seq, attn, P, mask, temperature, compiled=False, bf16=False, k=1):
    """One forward of prompt+response -> log-probs (B, N) of the response tokens at temperature T, values (B, N)
    (None without a value head), and the hidden states (B, N, C) that predict each response token.
    k > 1: the rows are groups of k responses to one prompt, run as B/k prompt-shared rows (rl.share_prompts)."""
    with torch.autocast(seq.device.type, torch.bfloat16, enabled=bf16):  # log-probs and values stay fp32
        if k > 1 and len(seq):  # (an empty share, on a rank holding none of the minibatch, takes the plain path)
            s = share_prompts(seq, attn, mask, P, k)
            hidden = model(s["input_ids"], s["attention_mask"], s["position_ids"],
                           return_hidden=True).float()  # (B/k, T, C)
            h = hidden.flatten(0, 1)[s["prev"]]  # (B, N, C): the state that predicts each response token
        else:
            hidden = model(seq, attn, return_hidden=True).float()  # (B, P+N, C)
            h = hidden[:, P - 1:-1]  # (B, N, C): the state before response token t is where it is predicted
    keep = mask.bool()
    lp = logprobs_chunked(h[keep], model.lm_head.weight, seq[:, P:][keep], temperature, compiled=compiled)
    logprobs = lp.new_zeros(mask.shape).masked_scatter(keep, lp)  # 0 after EOS
    values = value_head(h).squeeze(-1).float() * mask if value_head is not None else None
    return logprobs, values, h


@torch.no_grad()
def rm_score(rm, seq, attn, cut=None, eos_id: int = 0, P: int = 0, mask=None, k: int = 1):
    """Reward-model score (B,) read at the last real token of prompt+response (pitfall 6). cut: (B,) bool, the rows
    cut off before EOS. An RM only ever saw finished answers, and its score at a mid-answer token is off its data (the
    demo's RM scored its held-out demonstrations +3.5 higher with the final EOS dropped): such a row is scored as the
    text it is, closed with EOS, which is also what the gold judge scores. k > 1 (with P and the response mask):
    groups of k responses to one prompt, run as prompt-shared rows."""
    if cut is not None:  # a cut row ran to the cap, so its EOS goes right after its last token, in a new column
        seq = torch.cat([seq, torch.full_like(seq[:, :1], eos_id)], 1)
        attn = torch.cat([attn, cut.to(attn.dtype)[:, None]], 1)  # the appended EOS is real on cut rows only
        mask = None if mask is None else torch.cat([mask, cut.to(mask.dtype)[:, None]], 1)
    if k > 1 and len(seq):
        s = share_prompts(seq, attn, mask, P, k)
        hidden = rm(s["input_ids"], s["attention_mask"], s["position_ids"],
                    return_hidden=True)
        h = hidden.flatten(0, 1)[s["last"]]  # (B, C)
    else:
        h = rm(seq, attn, return_hidden=True)[torch.arange(len(seq), device=seq.device), last_token_index(attn)]
    return rm.score(h).squeeze(-1).float()


def read_task_prompts(path: str, need_gold: bool) -> tuple[list[dict], bool]:
    """-> (prompt rows, whether every row carries the gold judge's task metadata)."""
    rows = read_prompts(path)
    check_rows(rows, path, need_all=need_gold)  # the judge's metadata, checked once up front, not mid-run
    return rows, all("constraints" in r for r in rows)


def tokenize_prompts(tok, rows: list[dict], max_len: int, path: str) -> list[tuple[list[int], dict]]:
    """-> [(prompt ids ending in `<|im_start|>assistant\\n`, row)]; prompts over max_len are dropped and counted."""
    items = [(tok.render_prompt(r["prompt"]), r) for r in rows]
    kept = [(ids, r) for ids, r in items if len(ids) <= max_len]
    check(bool(kept), f"{path}: no usable prompts (all {len(rows)} are longer than --max-len {max_len})")
    if len(kept) < len(items):
        print(f"{path}: dropped {len(items) - len(kept)} prompts longer than --max-len {max_len}")
    return kept


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded
    for name in ("max_steps", "rollout_batch", "minibatch_size", "max_new_tokens", "temperature", "lr", "kl_horizon",
                 "ppo_epochs", "max_len", "log_every", "ptx_batch"):
        check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("kl_coef", "target_kl", "clip", "value_clip", "vf_coef", "entropy_coef", "grad_clip", "save_every",
                 "samples_per_prompt", "ptx_coef"):
        check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check(cfg.estimator in ("gae", "rloo", "grpo"), f"--estimator must be gae, rloo or grpo, got {cfg.estimator!r}")
    check(cfg.kl_estimator in ("k1", "k3"), f"--kl-estimator must be k1 or k3, got {cfg.kl_estimator!r}")
    check(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma and --lam must be in [0, 1]")
    k = cfg.samples_per_prompt or (1 if cfg.estimator == "gae" else 4)
    check(cfg.estimator == "gae" or k >= 2, f"--estimator {cfg.estimator} needs --samples-per-prompt >= 2, got {k}")
    check(cfg.estimator == "gae" or not (cfg.whiten_rewards or cfg.value_from_rm),
          "--whiten-rewards and --value-from-rm apply to --estimator gae only")
    check(not cfg.value_from_rm or cfg.reward != "gold", "--value-from-rm needs --reward RM_DIR")
    check(not cfg.normalize_reward or cfg.reward != "gold", "--normalize-reward needs --reward RM_DIR")
    check(bool(cfg.ptx_data) == (cfg.ptx_coef > 0), "--ptx-data and --ptx-coef > 0 go together")
    share = k if cfg.share_prompt and k > 1 else 1  # responses per forward row
    check(cfg.minibatch_size % share == 0, f"--minibatch-size {cfg.minibatch_size} must be a multiple of "
          f"--samples-per-prompt {k} with --share-prompt (or pass --share-prompt false)")
    device, rank, world = loop.setup(cfg.seed, cfg.device)
    check(cfg.rollout_batch % world == 0, f"--rollout-batch {cfg.rollout_batch} must divide by {world} ranks")
    check(cfg.minibatch_size % world == 0, f"--minibatch-size {cfg.minibatch_size} must divide by {world} ranks")
    check(not cfg.ptx_data or cfg.ptx_batch % world == 0, f"--ptx-batch {cfg.ptx_batch} must divide by {world} ranks")
    check(cfg.reward == "gold" or os.path.isdir(cfg.reward), f"--reward: {cfg.reward}: not 'gold' or a directory")
    rows, has_gold = read_task_prompts(cfg.prompts, cfg.reward == "gold")
    ptx_rows = read_sft(cfg.ptx_data) if cfg.ptx_data else []
    # every rank checks --out now; rank 0 records the run below, once every input (models too) has passed
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # policy, reference, reward, value head. No dropout during RL ("The N Implementation Details of RLHF with PPO"):
    # model.eval() and LoRA dropout 0, so the log-probs of sampling, reference and update agree
    model, tok = loop.prepare_model(cfg.init, device, cfg.lora_rank, cfg.lora_alpha, 0.0, cfg.nf4)
    model.eval()
    check(cfg.max_len + cfg.max_new_tokens <= model.cfg.max_position_embeddings,
          f"--max-len + --max-new-tokens exceed the model's {model.cfg.max_position_embeddings} positions")
    ref_model = None if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False)  # else: adapter disabled
    items = tokenize_prompts(tok, rows, cfg.max_len, cfg.prompts)
    ptx = tokenize_sft(tok, ptx_rows, cfg.max_len + cfg.max_new_tokens, path=cfg.ptx_data) if ptx_rows else []
    rm = None
    if cfg.reward != "gold":
        rm, rm_tok = load(cfg.reward, device)
        check(rm.score is not None, f"--reward: {cfg.reward}: not a reward model (no score head)")
        check(rm_tok.vocab_size == tok.vocab_size and rm_tok.encode("Hello, world!") == tok.encode("Hello, world!"),
              f"--reward: {cfg.reward}: its tokenizer differs from the policy's")
        rm.eval().requires_grad_(False)
    value_head = None
    if cfg.estimator == "gae":  # zero-init (lm-human-preferences), or the RM's head (the RM is usually SFT-based too)
        value_head = nn.Linear(model.cfg.hidden_size, 1, device=device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        if cfg.value_from_rm:
            check(rm.cfg.hidden_size == model.cfg.hidden_size, "--value-from-rm: the RM and the policy differ in width")
            value_head.weight.data.copy_(rm.score.weight)
    params = loop.trainable(model) + (list(value_head.parameters()) if value_head else [])
    opt = loop.make_optimizer(params, cfg.lr)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl > 0
              else FixedKLController(cfg.kl_coef))

    # record the run in --out, or resume it: trainable weights, optimizer, RNGs, the step, β and the value head;
    # prompts and samples follow the step
    st = loop.start_or_resume(cfg, model, opt, rank)
    start, skipped = st["step"], st["extra"].get("skipped", 0)
    reward_norm = st["extra"].get("reward_norm")  # (mean, std) of the initial policy's RM scores, once measured
    if cfg.resume:
        kl_ctl.load_state_dict(st["extra"]["kl_ctl"])
        if value_head is not None:
            value_head.load_state_dict(st["extra"]["value_head"])

    logger = Logger(cfg.out, cfg.max_steps, enabled=rank == 0, start_step=start)
    inject = int(os.environ.get("NANOALIGN_INJECT_NAN_STEP", 0))  # fault injection for the tests (1-based)
    B, mb = cfg.rollout_batch // world * k, cfg.minibatch_size // world  # this rank's responses; 3. scores mb at a time
    mb = max(mb // share, 1) * share  # whole prompts
    first = stats = None
    for step in range(start, cfg.max_steps):
        # 1. rollout: this rank's prompts, each repeated k times (the k samples of a prompt are adjacent rows);
        #    pure sampling at T: top-k/top-p would make the KL estimate biased and often negative (TRL #235, #925).
        #    The uniforms of the inverse-CDF sampler are drawn for the global batch, one per response and token, and
        #    sharded like the prompts: a response does not depend on which rank samples it, or on its batch-mates
        t0 = time.time()
        idx = loop.shard(loop.batch_indices(step, cfg.rollout_batch, len(items), cfg.seed), rank, world)
        batch = [items[i] for i in idx for _ in range(k)]
        g = torch.Generator().manual_seed(hash((cfg.seed, step)) % 2**62)
        u = loop.shard(torch.rand(cfg.rollout_batch, k, cfg.max_new_tokens, generator=g), rank, world)  # (B/k, k, T)
        sampler = sampling_copy(model) if cfg.bf16 else model  # --bf16: bf16 weights, faster
        ro = generate(sampler, [ids for ids, _ in batch], cfg.max_new_tokens, tok.eos_id, tok.pad_id, cfg.temperature,
                      compile=cfg.compile, uniforms=u.reshape(B, -1).to(device))
        del sampler
        P, N = ro.prompt_len, int(ro.response_mask.sum(1).max())  # drop columns that no response reached
        seq, attn, mask = ro.sequences[:, :P + N], ro.attention_mask[:, :P + N], ro.response_mask[:, :N]  # (B, ·)
        last = last_token_index(mask)  # (B,) the last response token: EOS if the response finished
        eos = seq[:, P:].gather(1, last[:, None]).squeeze(1) == tok.eos_id  # pad == EOS: judged by position
        t1 = time.time()

        # 2. score: the RM at the last real token of prompt+response, or the gold judge on the decoded text.
        #    A response cut off before EOS is scored closed with EOS (rm_score), then gets the penalty (N+
        #    implementation details, "EOS trick")
        texts = [tok.decode(r) for r in ro.responses()]
        gold = None
        if has_gold:
            gold = torch.tensor([gold_score(t, row) for t, (_, row) in zip(texts, batch)], device=device)  # (B,)
        score = rm_score(rm, seq, attn, ~eos, tok.eos_id, P, mask, share) if rm is not None else gold
        if rm is not None and cfg.normalize_reward:  # a gain and bias that give the initial policy's samples
            if reward_norm is None:                  # mean 0 and std 1 (Ziegler et al. 2019 §2.2), over all ranks
                m = loop.all_reduce_sum(torch.stack([score.sum(), score.square().sum(),
                                                     torch.tensor(float(B), device=device)]).double())
                mean, var = float(m[0] / m[2]), float(m[1] / m[2] - (m[0] / m[2]) ** 2)
                reward_norm = (mean, math.sqrt(var) if var > 1e-12 else 1.0)  # equal scores: shift only
            score = (score - reward_norm[0]) / reward_norm[1]
        scores = score + cfg.missing_eos_penalty * (~eos).float()  # (B,)
        t2 = time.time()

        # 3. log-probs of π_old (and values) and π_ref from fresh forward passes at the sampling temperature:
        #    generate's scores are post-processed, and logits / T must match the sampler (TRL #2358, #3029)
        with torch.no_grad():
            old = [forward(model, value_head, seq[i:i + mb], attn[i:i + mb], P, mask[i:i + mb], cfg.temperature,
                           cfg.compile, cfg.bf16, share)[:2] for i in range(0, B, mb)]
            with disable_adapter(model):  # with LoRA the reference is the policy minus its adapter
                ref = [forward(ref_model or model, None, seq[i:i + mb], attn[i:i + mb], P, mask[i:i + mb],
                               cfg.temperature, cfg.compile, cfg.bf16, share)[0] for i in range(0, B, mb)]
        old_logprobs, ref_logprobs = torch.cat([o[0] for o in old]), torch.cat(ref)  # (B, N)
        old_values = torch.cat([o[1] for o in old]) if value_head is not None else None

        # 4. rewards: r_t = −β·KL_t per token, plus the score on the last response token (Ziegler et al. 2019 §2.2)
        beta = kl_ctl.value
        rewards, kl = per_token_rewards(scores, old_logprobs, ref_logprobs, mask, beta, cfg.kl_estimator)  # (B, N)
        if cfg.whiten_rewards:  # the moments of every rank's tokens: W ranks whiten like one process
            rewards = whiten(rewards, mask, shift_mean=False, dist_sum=loop.all_reduce_sum)
        # 5. advantages. GAE: δ_t = r_t + γV_{t+1} − V_t, Â_t = δ_t + γλÂ_{t+1} (Schulman et al. 2016), whitened.
        #    RLOO / GRPO: one advantage per response from the k responses of its prompt, broadcast over its tokens
        if cfg.estimator == "gae":
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask, dist_sum=loop.all_reduce_sum)
        elif cfg.estimator == "rloo":  # the KL folded into the sequence reward (Ahmadian et al. 2024, §3)
            advantages, returns = rloo_advantages(scores - beta * kl.sum(1), k)[:, None] * mask, None
        else:  # the scores alone; the KL goes into the loss (Shao et al. 2024, eq. 3)
            advantages, returns = grpo_advantages(scores, k)[:, None] * mask, None
        # adaptive β (Ziegler et al. 2019): e = clip(KL/target − 1, ±0.2), β ← β(1 + e·n/horizon), global KL
        kl_sum = loop.all_reduce_sum(torch.stack([kl.sum(), torch.tensor(float(B), device=device)]))
        kl_ctl.update(float(kl_sum[0] / kl_sum[1]), int(kl_sum[1]))

        # 6. update: --ppo-epochs passes over shuffled minibatches. One forward gives the new log-probs and values
        #    L = max(−Â·ρ, −Â·clip(ρ, 1±ε)) + vf_coef · ½ max((V − R)², (V_clip − R)²) − entropy_coef · H  (Schulman
        #    et al. 2017, eq. 7 and 9; the value clip as in lm-human-preferences); GRPO: + β·KL instead of a critic.
        #    The permutation is of the GLOBAL responses, the same on every rank, and each rank takes the ones it holds
        #    (a share that varies, and may be empty: a (0, ·) forward still gives the all-reduce zero gradients).
        #    Each term is a sum over this rank's tokens / the minibatch's tokens on ALL ranks: the shares add up to
        #    the global token mean, and so do the all-reduced gradients (pitfall 7, as in train_sft.py)
        n, MB = cfg.rollout_batch * k, cfg.minibatch_size  # responses and minibatch size over all ranks
        n_mb = -(-n // MB)  # minibatches per epoch (they number the ptx batches)
        mstats = []  # per minibatch: this rank's shares of the logged terms (summed over ranks in 7.)
        for epoch in range(cfg.ppo_epochs):
            gs = torch.Generator().manual_seed(hash((cfg.seed, step, epoch)) % 2**62)
            perm = torch.randperm(n // share, generator=gs)  # of the prompts when they are shared, else the responses
            perm = (perm[:, None] * share + torch.arange(share)).flatten()
            for s in range(0, n, MB):
                i = local_rows(perm[s:s + MB], k, rank, world).to(device)  # this rank's rows of the minibatch
                n_tok = loop.all_reduce_sum(mask[i].sum().float())  # the minibatch's response tokens, all ranks
                logprobs, values, h = forward(model, value_head, seq[i], attn[i], P, mask[i], cfg.temperature,
                                              cfg.compile, cfg.bf16, share)
                pg_loss, pstats = ppo_policy_loss(logprobs, old_logprobs[i], advantages[i], mask[i], cfg.clip, n_tok)
                loss, m = pg_loss, {"pg_loss": float(pg_loss.detach()), **{key: float(v) for key, v in pstats.items()}}
                if value_head is not None:
                    vf_loss, vf_clipfrac = ppo_value_loss(values, old_values[i], returns[i], mask[i], cfg.value_clip,
                                                          n_tok)
                    loss = loss + cfg.vf_coef * vf_loss
                    m.update(vf_loss=float(vf_loss.detach()), vf_clipfrac=float(vf_clipfrac))
                if cfg.estimator == "grpo":  # + β·D_KL, the k3 estimator: unbiased and ≥ 0 (Shao et al. 2024, eq. 4)
                    kl_loss = token_mean(kl_penalty(logprobs, ref_logprobs[i], "k3"), mask[i], n_tok)
                    loss, m["kl_loss"] = loss + beta * kl_loss, float(kl_loss.detach())
                if ptx:  # PPO-ptx: + γ·NLL of this update's demonstration rows, a token mean over all ranks' rows
                    u = (step * cfg.ppo_epochs + epoch) * n_mb + s // MB  # this update's index in the run
                    rows_u = loop.shard(loop.batch_indices(u, cfg.ptx_batch, len(ptx), cfg.seed + 1), rank, world)
                    b = collate_sft([ptx[j] for j in rows_u], tok.pad_id)
                    b = {key: v.to(device) for key, v in b.items()}
                    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cfg.bf16):
                        lp = token_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                            compiled=cfg.compile)  # (rows, T-1), fp32
                    n_ptx = loop.all_reduce_sum(b["loss_mask"][:, 1:].sum().float())  # target tokens, all ranks
                    ptx_loss = sft_loss(lp, b["loss_mask"][:, 1:], n_ptx)
                    loss, m["ptx_loss"] = loss + cfg.ptx_coef * ptx_loss, float(ptx_loss.detach())
                if cfg.entropy_coef > 0:  # H = −Σ p log p over the vocabulary: the full (tokens, V) logits
                    logp_all = torch.log_softmax(model.lm_head(h[mask[i].bool()]).float() / cfg.temperature, -1)
                    entropy = -(logp_all.exp() * logp_all).sum() / n_tok  # this rank's share of the token mean
                    loss, m["entropy"] = loss - cfg.entropy_coef * entropy, float(entropy.detach())
                if step + 1 == inject:
                    loss = loss * float("nan")
                loss.backward()
                loss_t = loop.all_reduce_sum(loss.detach())  # the minibatch loss, the same on every rank
                m["grad_norm"] = loop.step_or_skip(opt, params, loss_t, cfg.lr, step + 1, cfg)  # nan: skipped
                if not math.isfinite(m["grad_norm"]):
                    skipped += 1
                m["loss"] = float(loss_t)
                mstats.append(m)
        t3 = time.time()

        # 7. log: global means, so rank 0 logs what one process would. Each rank holds shares: the minibatch terms
        #    of 6., and here its sums over its responses / all n responses; the shares are summed over ranks
        shares = {key: sum(m[key] for m in mstats) / len(mstats) for key in mstats[0]}
        whole = {key: shares.pop(key) for key in ("loss", "grad_norm")}  # global already: all-reduced loss/grads
        per_response = {"score": score, "kl": kl.sum(1), "resp_len": mask.sum(1), "eos_rate": eos}  # (B,) each
        if has_gold:
            per_response["gold"] = gold
        shares.update({key: float(v.double().sum()) / n for key, v in per_response.items()})
        keys = sorted(shares)
        total = loop.all_reduce_sum(torch.tensor([shares[key] for key in keys], dtype=torch.float64, device=device))
        stats = {**{key: float(v) for key, v in zip(keys, total)}, **whole}
        if value_head is not None:  # the variances over every rank's tokens
            ev = explained_variance(old_values, returns, mask, dist_sum=loop.all_reduce_sum)
            stats["explained_var"] = float(ev) if torch.isfinite(ev) else 0.0  # 0 when the returns do not vary
        stats.update(beta=beta, skipped=skipped, tokens_per_s=stats["resp_len"] * n / (t1 - t0), generate_s=t1 - t0,
                     score_s=t2 - t1, train_s=t3 - t2)
        first = first or stats
        if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == cfg.max_steps:
            logger.log(step + 1, **stats)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            extra = {"kl_ctl": kl_ctl.state_dict(), "skipped": skipped, "reward_norm": reward_norm,
                     "value_head": value_head.state_dict() if value_head is not None else {}}
            loop.save_state(cfg.out, model, opt, step + 1, extra, rank)

    # the merged policy (+ adapter/ with LoRA), the value head beside it, metrics.json
    result = {**(stats or {}), "first_score": first and first["score"], "reward_norm": reward_norm,
              "steps": cfg.max_steps, "prompts": len(items)}
    if rank == 0 and value_head is not None:
        vh = {n: p.detach().cpu().contiguous() for n, p in value_head.state_dict().items()}
        atomic_write(os.path.join(cfg.out, "value_head.safetensors"), lambda tmp: save_file(vh, tmp))
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
