"""The setup and the optional loss terms of train_ppo.py, apart so that its main() shows the algorithm: rollout, score,
log-probs, rewards, advantages, then epochs over minibatches. cfg is train_ppo.py's Config."""
import copy
import os

import torch

from . import hub, loop, rl
from .cli import check, check_ranges
from .data import collate_sft, read_prompts, read_sft
from .judge import check_rows
from .logprobs import token_logprobs
from .losses import sft_loss


def check_inputs(cfg, world: int) -> tuple[int, int, list, list, bool]:
    """Nonsense flags and unusable files are one-line errors (exit 2) before anything is loaded. -> (k samples per
    prompt, responses per forward row (k with --share-prompt, else 1), prompt rows, --ptx-data rows, has_gold)."""
    check_ranges(cfg, positive=("rollout_batch", "minibatch_size", "max_new_tokens", "temperature", "kl_horizon",
                                "ppo_epochs", "ptx_batch"),
                 non_negative=("kl_coef", "target_kl", "clip", "value_clip", "vf_coef", "entropy_coef",
                               "samples_per_prompt", "ptx_coef", "tis_cap"))
    check(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma and --lam must be in [0, 1]")
    k = cfg.samples_per_prompt or (1 if cfg.estimator == "gae" else 4)
    check(cfg.estimator == "gae" or k >= 2, f"--estimator {cfg.estimator} needs --samples-per-prompt >= 2, got {k}")
    check(cfg.estimator == "gae" or not (cfg.whiten_rewards or cfg.value_from_rm),
          "--whiten-rewards and --value-from-rm apply to --estimator gae only")
    check(cfg.reward != "gold" or not (cfg.value_from_rm or cfg.normalize_reward),
          "--value-from-rm and --normalize-reward need --reward RM_DIR")
    check(cfg.reward == "gold" or os.path.isdir(cfg.reward), f"--reward: {cfg.reward}: not 'gold' or a directory")
    check(bool(cfg.ptx_data) == (cfg.ptx_coef > 0), "--ptx-data and --ptx-coef > 0 go together")
    check(cfg.tis_cap == 0 or cfg.bf16, "--tis-cap corrects for --bf16's sampling copy: it needs --bf16")
    check(not cfg.share_prompt or cfg.minibatch_size % k == 0, f"--minibatch-size {cfg.minibatch_size} must be a "
          f"multiple of --samples-per-prompt {k} with --share-prompt (or pass --share-prompt false)")
    for name in ("rollout_batch", "minibatch_size") + (("ptx_batch",) if cfg.ptx_data else ()):
        check((v := getattr(cfg, name)) % world == 0, f"--{name.replace('_', '-')} {v} must divide by {world} ranks")
    rows = read_prompts(cfg.prompts)
    check_rows(rows, cfg.prompts, need_all=cfg.reward == "gold")  # the judge's metadata, not minutes into the run
    ptx = read_sft(cfg.ptx_data, "--ptx-data") if cfg.ptx_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)  # every rank checks --out; rank 0 records the run later
    return k, k if cfg.share_prompt else 1, rows, ptx, all("constraints" in r for r in rows)


def load_models(cfg, device: str):
    """-> policy, tokenizer, reference (None with LoRA: the policy with its adapter off), RM (None: gold), value head
    (None: no critic). No dropout during RL (eval mode, LoRA dropout 0): sampling, reference and update agree."""
    model, tok = loop.prepare_model(cfg, device)
    model.eval()
    check(cfg.max_len + cfg.max_new_tokens <= model.cfg.max_position_embeddings,
          f"--max-len + --max-new-tokens exceed the model's {model.cfg.max_position_embeddings} positions")
    ref_model, rm, value_head = None if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False), None, None
    if cfg.reward != "gold":
        rm, rm_tok = hub.load(cfg.reward, device)
        check(rm.score is not None, f"--reward: {cfg.reward}: not a reward model (no score head)")
        check(rm_tok.vocab_size == tok.vocab_size and rm_tok.encode("Hello, world!") == tok.encode("Hello, world!"),
              f"--reward: {cfg.reward}: its tokenizer differs from the policy's")
        rm.eval().requires_grad_(False)
    if cfg.estimator == "gae":  # zero-init (lm-human-preferences), or the RM's head (the RM is usually SFT-based too)
        value_head = torch.nn.Linear(model.cfg.hidden_size, 1, device=device)
        w = rm.score.weight if cfg.value_from_rm else torch.zeros_like(value_head.weight)
        check(w.shape == value_head.weight.shape, "--value-from-rm: the RM and the policy differ in width")
        value_head.load_state_dict({"weight": w, "bias": torch.zeros_like(value_head.bias)})
    return model, tok, ref_model, rm, value_head


def optional_terms(loss, m: dict, b: dict, model, cfg, beta: float, ptx: list, update: int, rank: int, world: int):
    """The minibatch loss + its optional terms, each logged in m and a sum over this rank's tokens / ALL ranks' count.
    b: the minibatch's rows of the rollout and of forward's outputs, and n_tok, that count. ptx: the demonstrations."""
    if b["values"] is not None:  # + c_v · ½ max((V − R)², (V_clip − R)²), V clipped as OpenAI's
        m["vf_loss"], m["vf_clipfrac"] = rl.ppo_value_loss(b["values"], b["old_values"], b["returns"], b["mask"],
                                                           cfg.value_clip, b["n_tok"])
        loss = loss + cfg.vf_coef * m["vf_loss"]
    if cfg.estimator == "grpo":  # + β·KL per token, the k3 estimator (Shao et al. 2024, eq. 4)
        m["kl_loss"] = rl.token_mean(rl.kl_penalty(b["logprobs"], b["ref_logprobs"], "k3"), b["mask"], b["n_tok"])
        loss = loss + beta * m["kl_loss"]
    if ptx:  # + γ·NLL of --ptx-batch demonstrations (PPO-ptx, Ouyang et al. 2022, eq. 2), drawn by the update's index
        idx = loop.shard(loop.batch_indices(update, cfg.ptx_batch, len(ptx), cfg.seed + 1), rank, world)
        d = {key: v.to(b["mask"].device) for key, v in collate_sft([ptx[j] for j in idx], 0).items()}  # pads: masked
        with loop.autocast(cfg.bf16, b["mask"].device):
            lp = token_logprobs(model, d["input_ids"], d["attention_mask"], d["loss_mask"], compiled=cfg.compile)
        m["ptx_loss"] = sft_loss(lp, d["loss_mask"][:, 1:], loop.all_reduce_sum(d["loss_mask"][:, 1:].sum().float()))
        loss = loss + cfg.ptx_coef * m["ptx_loss"]
    if cfg.entropy_coef > 0:  # − c_H · H[π(·|s_t)]
        m["entropy"] = rl.entropy(model.lm_head(b["h"][b["mask"].bool()]).float() / cfg.temperature) / b["n_tok"]
        loss = loss - cfg.entropy_coef * m["entropy"]
    return loss
