"""RLHF with PPO: maximise E[r(x, y)] − β·KL(π‖π_ref) (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), with a value
head and GAE, or the critic-free RLOO / GRPO estimators. main() is the numbered loop of lm-human-preference-details.

    python train_ppo.py --init out/sft --prompts data/prompts.jsonl --reward out/rm --out out/ppo [--estimator rloo]

The KL: GAE's rewards carry −β·KL_t per token; RLOO folds it into the sequence reward (Ahmadian et al. 2024, §3); GRPO
normalises the scores alone and adds β·KL (k3) to the loss (Shao et al. 2024, eq. 3-4), since dividing a KL-folded
reward by the group's std would blow tiny KL differences between tied responses up into full advantages. With task
metadata the gold score is logged beside the RM's (proxy up, gold down: over-optimisation, Gao et al. 2022).
--bf16 samples from a bf16 copy of the weights, a slightly different policy from the update's π_old: log.jsonl's
sampler_mismatch is mean |log π_sampler − log π_old| per sampled token, and --tis-cap C weights each token's policy
term by min(π_old/π_sampler, C) (truncated importance sampling, as verl and TRL do for vLLM rollouts).
Simplified: the value head is a Linear on the policy's hidden states (as TRL; OpenAI trains a separate network); a
constant lr. Sampling and shuffles are seeded by (seed, iteration) and drawn for the global batch, so --resume needs
no sampler state, and W torchrun ranks take the steps of one process (up to float summation order).
"""
import math
import time
from dataclasses import dataclass

import torch

from nanoalign import fast, lora, loop, packing, rl
from nanoalign.cli import check
from nanoalign.data import tokenize_sft
from nanoalign.generate import generate
from nanoalign.judge import score as gold_score
from nanoalign.logprobs import logprobs_chunked
from nanoalign.losses import whiten
from nanoalign.model import last_token_index
from nanoalign.ppo_parts import check_inputs, load_models, optional_terms

SHOW = ("score", "gold", "kl", "clipfrac", "resp_len", "generate_s", "train_s")  # stdout; log.jsonl: every field


@dataclass
class Config(loop.TrainConfig):
    """PPO / RLOO / GRPO against a reward model or the gold judge, with a KL penalty to the initial policy."""
    prompts: str = ""  # prompts JSONL: {"prompt": str or [messages], ...}; task metadata ("constraints") is kept
    reward: str = "gold"  # a reward-model checkpoint dir, or "gold" (the task suite's judge: verifiable rewards)
    estimator: str = "gae"  # advantages: {gae, rloo, grpo} (value head; leave-one-out; group mean and std)
    kl_coef: float = 0.05  # β, the KL penalty coefficient (the initial β with --target-kl)
    target_kl: float = 0.0  # > 0: adapt β towards this KL per response (Ziegler et al. 2019); 0 = fixed β
    kl_horizon: int = 10000  # adaptive β: horizon in samples
    kl_estimator: str = "k1"  # per-token KL, {k1, k3}: log π/π_ref, or (ρ−1) − log ρ with ρ = π_ref/π (≥ 0)
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
    share_prompt: bool = True  # k > 1: run a prompt once for its k responses (a minibatch then holds whole prompts)
    minibatch_size: int = 8  # responses per optimizer step, over all ranks
    max_new_tokens: int = 64  # response length cap
    temperature: float = 0.7  # sampling temperature; every log-prob is taken at it too (logits / T)
    missing_eos_penalty: float = -1.0  # added to the score of a response cut off before EOS
    normalize_reward: bool = False  # RM scores: a gain and bias that give the first rollout mean 0, std 1
    ptx_data: str = ""  # PPO-ptx: SFT JSONL whose NLL joins every minibatch loss (InstructGPT's γ term)
    ptx_coef: float = 0.0  # γ, the weight of that NLL (a token mean over the ptx batch); needs --ptx-data
    ptx_batch: int = 4  # demonstration rows per minibatch, over all ranks
    tis_cap: float = 0.0  # with --bf16: weight each token's policy term by min(π_old/π_sampler, C); 0 = off
    max_steps: int = 100  # iterations (rollout + update)
    lr: float = 1e-5  # constant learning rate (LoRA usually wants ~1e-4)
    max_len: int = 512  # prompts longer than this (tokens) are dropped and counted
    lora_rank: int = 0  # 0 = full fine-tune (the reference: a frozen copy); > 0 = LoRA (its adapter off; no dropout)
    compile: bool = False  # torch.compile the decode step, the pointwise layers and the log-prob kernels
    log_every: int = 1  # progress line + log.jsonl row every N iterations
    bf16: bool = False  # sample from a bf16 copy of the weights; autocast the trunk to bf16 elsewhere (log-probs fp32)


@dataclass
class Samples:
    """Rollout rows: seq, attn (B, P+N) a left-padded prompt, then the response; mask (B, N) 1 on response tokens."""
    seq: torch.Tensor
    attn: torch.Tensor
    mask: torch.Tensor
    P: int  # the padded prompt width

    @classmethod
    def of(cls, ro):  # generate's Rollout, less the columns that no response reached
        P, N = ro.prompt_len, int(ro.response_mask.sum(1).max())
        return cls(ro.sequences[:, :P + N], ro.attention_mask[:, :P + N], ro.response_mask[:, :N], P)

    def __getitem__(self, i):  # the rows i
        return Samples(self.seq[i], self.attn[i], self.mask[i], self.P)


def forward(model, value_head, x: Samples, temperature: float, bf16=False, compiled=False, k: int = 1):
    """-> log π(y_t | x, y_<t) at temperature T (B, N), 0 after EOS; values (B, N) (None without a value head); and
    the hidden states (B, N, C) that predict the response tokens. bf16 autocasts the trunk; the rest stays fp32."""
    with loop.autocast(bf16, x.seq.device):
        h = packing.response_hidden(model, x.seq, x.attn, x.mask, x.P, k).float()  # k > 1: prompt-shared rows
    keep = x.mask.bool()
    lp = logprobs_chunked(h[keep], model.lm_head.weight, x.seq[:, x.P:][keep], temperature, compiled=compiled)
    values = value_head(h).squeeze(-1).float() * x.mask if value_head is not None else None
    return lp.new_zeros(x.mask.shape).masked_scatter(keep, lp), values, h


@torch.no_grad()
def forward_in_chunks(model, value_head, x: Samples, parts: list, cfg: Config, k: int):
    """forward() over the row groups `parts`, without gradients: -> log-probs (B, N), values (B, N) or None."""
    out = [forward(model, value_head, x[i], cfg.temperature, cfg.bf16, cfg.compile, k)[:2] for i in parts]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]) if value_head is not None else None


def main(cfg: Config) -> dict:
    # 0. setup: flags and inputs first (one-line errors), then the policy, its reference, the reward, the value head
    device, rank, world = loop.setup(cfg)
    k, share, rows, ptx, has_gold = check_inputs(cfg, world)  # k samples per prompt, share responses per forward row
    model, tok, ref_model, rm, value_head = load_models(cfg, device)
    items = [(ids, r) for r in rows if len(ids := tok.render_prompt(r["prompt"])) <= cfg.max_len]  # (prompt ids, row)
    check(bool(items), f"{cfg.prompts}: no usable prompts (all {len(rows)} are longer than --max-len {cfg.max_len})")
    if len(items) < len(rows):
        print(f"{cfg.prompts}: dropped {len(rows) - len(items)} prompts longer than --max-len {cfg.max_len}")
    ptx = tokenize_sft(tok, ptx, cfg.max_len + cfg.max_new_tokens, path=cfg.ptx_data) if ptx else []  # (ids, mask)
    params = [p for p in model.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])
    opt, kl_ctl = loop.make_optimizer(params, cfg.lr), rl.KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    start, extra, logger = loop.start_or_resume(cfg, model, opt, rank, show=SHOW)  # --resume: what save_state wrote
    skipped, reward_norm = extra.get("skipped", 0), extra.get("reward_norm")
    kl_ctl.value = extra.get("beta", kl_ctl.value)
    if extra.get("value_head"):
        value_head.load_state_dict(extra["value_head"])
    B, n, M = cfg.rollout_batch // world * k, cfg.rollout_batch * k, cfg.minibatch_size  # this rank's, all, per step
    parts, first, stats = torch.arange(B).split(max(M // world // share, 1) * share), None, {}  # no-grad forwards
    for step in range(start, cfg.max_steps):
        # 1. rollout: pure sampling at T (top-k/top-p would bias the KL estimate, TRL #235) with uniforms drawn for the
        #    GLOBAL batch, sharded like the prompts: a response does not depend on the rank that samples it
        t0 = time.time()
        loop.progress(rank, f"step {step + 1}/{cfg.max_steps}: sampling {B} responses")
        idx = loop.shard(loop.batch_indices(step, cfg.rollout_batch, len(items), cfg.seed), rank, world)
        batch = [items[i] for i in idx for _ in range(k)]  # the k samples of a prompt are adjacent rows
        u = torch.rand(cfg.rollout_batch, k, cfg.max_new_tokens, generator=loop.seeded(cfg.seed, step))
        ro = generate(fast.sampling_copy(model) if cfg.bf16 else model, [ids for ids, _ in batch], cfg.max_new_tokens,
                      tok.eos_id, tok.pad_id, cfg.temperature, compile=cfg.compile,
                      uniforms=loop.shard(u, rank, world).reshape(B, -1).to(device))
        x = Samples.of(ro)
        mask, sampler_lp = x.mask, ro.logprobs[:, :x.mask.shape[1]] if cfg.bf16 else None  # log π_sampler (B, N)
        eos = x.seq[:, x.P:].gather(1, last_token_index(mask)[:, None]).squeeze(1) == tok.eos_id  # by position: pad=EOS
        t1 = time.time()

        # 2. score: the RM at the last real token, or the gold judge on the text; --normalize-reward: mean 0, std 1 on
        #    the first rollout (Ziegler et al. 2019, §2.2); a response cut off before EOS gets the missing-EOS penalty
        gold = torch.tensor([gold_score(tok.decode(r), row) for r, (_, row) in zip(ro.responses(), batch)],
                            device=device) if has_gold else None
        score = packing.response_rewards(rm, x.seq, x.attn, x.mask, x.P, ~eos, tok.eos_id, share) if rm else gold
        if cfg.normalize_reward:
            reward_norm = reward_norm or loop.global_mean_std(score)  # (mean, std), fixed for the run
            score = (score - reward_norm[0]) / reward_norm[1]
        scores = score + cfg.missing_eos_penalty * (~eos).float()  # (B,)
        t2 = time.time()

        # 3. log-probs of π_old (and V_old) and π_ref: fresh forward passes at the sampling temperature
        old_logprobs, old_values = forward_in_chunks(model, value_head, x, parts, cfg, share)  # (B, N) each
        with lora.disable_adapter(model):  # with LoRA the reference is the policy minus its adapter
            ref_logprobs, _ = forward_in_chunks(ref_model or model, None, x, parts, cfg, share)
        is_weights = (old_logprobs - sampler_lp).exp().clamp(max=cfg.tis_cap) if cfg.tis_cap else mask.float()

        # 4. rewards: r_t = −β·KL_t per token, plus the score on the last response token (Ziegler et al. 2019, §2.2)
        rewards, kl = rl.per_token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:  # over every rank's tokens
            rewards = whiten(rewards, mask, shift_mean=False, dist_sum=loop.all_reduce_sum)
        # 5. advantages: GAE on V_old (Schulman et al. 2016, eq. 16), whitened; or one per response from the k of its
        #    prompt: RLOO on score − β·Σ_t KL_t (Ahmadian et al. 2024, §3), GRPO on the scores alone
        returns = None
        if cfg.estimator == "gae":
            advantages, returns = rl.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask, dist_sum=loop.all_reduce_sum)
        elif cfg.estimator == "rloo":
            advantages = rl.rloo_advantages(scores, k, kl, kl_ctl.value)[:, None] * mask
        else:
            advantages = rl.grpo_advantages(scores, k)[:, None] * mask

        # 6. update: L = max(−Â·ρ, −Â·clip(ρ, 1 ± ε)) + the optional terms (Schulman et al. 2017, eq. 7, 9) on shuffled
        #    minibatches of the GLOBAL responses; each rank takes its rows (maybe none), every term / ALL ranks' tokens
        rollout = dict(mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                       is_weights=is_weights, old_values=old_values, returns=returns)
        minibatch_stats, n_mb = [], -(-n // M)
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n // share, generator=loop.seeded(cfg.seed, step, epoch))  # whole prompts when shared
            perm = (perm[:, None] * share + torch.arange(share)).flatten()
            for j in range(n_mb):
                loop.progress(rank, f"step {step + 1}/{cfg.max_steps}: epoch {epoch + 1}, minibatch {j + 1}/{n_mb}")
                i = packing.local_rows(perm[j * M:(j + 1) * M], k, rank, world).to(device)
                b = {key: v[i] for key, v in rollout.items() if v is not None}  # this minibatch's rows
                b["n_tok"] = loop.all_reduce_sum(b["mask"].sum().float())
                b["logprobs"], b["values"], b["h"] = forward(model, value_head, x[i], cfg.temperature, cfg.bf16,
                                                             cfg.compile, share)
                loss, m = rl.ppo_policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], cfg.clip,
                                             b["n_tok"], b["is_weights"])  # and m["pg_loss"] = loss
                update = (step * cfg.ppo_epochs + epoch) * n_mb + j  # this update's index in the run (ptx's draw)
                loss = optional_terms(loss, m, b, model, cfg, kl_ctl.value, ptx, update, rank, world)
                loss.backward()
                m["loss"] = loop.all_reduce_sum(loss.detach())  # the minibatch loss, the same on every rank
                m["grad_norm"] = loop.step_or_skip(opt, params, m["loss"], cfg.lr, step + 1, cfg)  # nan: skipped
                skipped += not math.isfinite(m["grad_norm"])
                minibatch_stats.append({key: float(v.detach() if torch.is_tensor(v) else v) for key, v in m.items()})

        # 7. log: means over every rank's responses and tokens, as one process would log them
        mismatch = (sampler_lp - old_logprobs).abs() if cfg.bf16 else None  # |log π_sampler − log π_old| per token
        stats = loop.global_means(minibatch_stats, n, device, score=score, kl=kl.sum(1), resp_len=mask.sum(1),
                                  eos_rate=eos, gold=gold, sampler_mismatch=mismatch)  # summed over each response
        if cfg.bf16:  # a mean per sampled token
            stats["sampler_mismatch"] /= stats["resp_len"]
        if value_head is not None:  # over every rank's tokens
            stats["explained_var"] = float(rl.explained_variance(old_values, returns, mask, loop.all_reduce_sum))
        stats.update(beta=kl_ctl.value, skipped=skipped, tokens_per_s=stats["resp_len"] * n / (t1 - t0),
                     generate_s=t1 - t0, score_s=t2 - t1, train_s=time.time() - t2)
        first = first or stats
        kl_ctl.update(loop.global_mean_std(kl.sum(1))[0], n)  # adaptive β, for the next iteration: on the mean KL
        if (step + 1) % cfg.log_every == 0 or step == start or step + 1 == cfg.max_steps:
            logger.log(step + 1, **stats)
        loop.save_state(cfg, model, opt, step + 1, {"beta": kl_ctl.value, "skipped": skipped, "reward_norm":
                        reward_norm, "value_head": value_head.state_dict() if value_head else {}}, rank)

    # the merged policy (+ adapter/ with LoRA), the value head beside it (the policy stays a plain LM), metrics.json
    result = {**stats, "first_score": first and first["score"], "reward_norm": reward_norm, "steps": cfg.max_steps,
              "prompts": len(items)}
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0, heads={"value_head": value_head})
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
