"""Reward model: a scalar head on the SFT model, trained on preference pairs (stage 2 of RLHF).

Ouyang et al. 2022 ("InstructGPT", §3.5, eq. 1), after Stiennon et al. 2020 and Bradley & Terry 1952:

    r(x, y) = w · h_last(x, y)                       the score head, read at the LAST REAL token (pitfall 6)
    L = −log σ(r(x, y_c) − r(x, y_r) − m) + λ·(r(x, y_c) + r(x, y_r))²      averaged over the GLOBAL batch of pairs

m is --margin (Llama 2 uses a per-pair margin from the annotators' rating gap; here one constant). The second term is
--center-rewards (Eisenstein et al. 2023; TRL's center_rewards_coefficient, λ ≈ 0.01): BT only sees differences, so
without it the rewards drift by an arbitrary constant, which a PPO value head then has to chase.
The head is an nn.Linear(d, 1) with std 1/√(d+1) (lm-human-preferences); each pair runs as ONE row
[prompt | chosen | rejected] whose responses see the prompt and themselves only (prefs.collate_shared: the prompt
runs once; --share-prompt false: a (2B, T) batch of chosen rows, then rejected rows). The model starts from the SFT
checkpoint (RMs that start elsewhere stall near 50% accuracy) and is saved as an HF LlamaForSequenceClassification
(score.weight, num_labels 1).

Run:
    python -m nanoalign.tasks make --out data --seed 0
    python train_rm.py --init out/sft --data data/prefs.jsonl --eval-data data/eval_prefs.jsonl --out out/rm
    python train_rm.py ... --lora-rank 0 --lr 1e-5                      # full fine-tune instead of LoRA
    torchrun --nproc_per_node=2 train_rm.py ...                          # data parallel

Simplifications: one scalar per sequence (no per-token or multi-objective rewards); a single constant margin; the
data order and gradient all-reduce are as in train_sft.py (position = f(step), hand-rolled data parallel). In the
saved config pad_token_id is <|endoftext|> rather than <|im_end|>: transformers reads the score at the last token
that is not pad_token_id, and every response ends with <|im_end|>, which is where this RM reads it.
"""
import math
import os
import time
from dataclasses import dataclass

import torch

from nanoalign import loop
from nanoalign.cli import Logger, check
from nanoalign.data import read_prefs
from nanoalign.packing import collate_shared
from nanoalign.prefs import collate_pairs, tokenize_prefs
from nanoalign.hub import load
from nanoalign.lora import apply_lora
from nanoalign.losses import bradley_terry_loss
from nanoalign.model import compile_pointwise, last_token_index
from nanoalign.nf4 import quantize_nf4_

@dataclass
class Config:
    """Bradley-Terry reward model on preference pairs (a scalar head on the SFT model)."""
    init: str = "smollm2-135m-instruct"  # the SFT model to start from (a preset, the alias, an HF/checkpoint dir)
    data: str = ""  # preference JSONL: prompt/chosen/rejected as strings or message lists, or HH-style chosen/rejected
    out: str = ""  # output dir: checkpoint (LlamaForSequenceClassification), adapter/, log.jsonl, metrics.json
    eval_data: str = ""  # held-out preference JSONL: pairwise accuracy, margin, reward mean/std
    max_steps: int = 200  # optimizer steps
    batch_size: int = 8  # pairs per micro-batch on each rank (2x rows in the forward pass)
    grad_accum: int = 1  # micro-batches per step; global batch = batch_size * grad_accum * ranks pairs
    lr: float = 1e-4  # peak lr: 5e-5..1e-4 suits LoRA RMs; use ~1e-5 for a full fine-tune
    warmup: int = 10  # linear warmup steps, then cosine decay to 10% of --lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    max_len: int = 512  # max tokens per prompt + response (the response's tail is cut; the prompt must fit)
    seed: int = 0  # seeds the data order, score head and LoRA init, dropout
    lora_rank: int = 16  # 0 = full fine-tune; > 0 = LoRA on every linear layer of the blocks (score head in full)
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    lora_dropout: float = 0.05  # dropout on the LoRA input
    nf4: bool = False  # QLoRA: freeze the base in 4-bit NF4 (needs --lora-rank; the score head stays fp32)
    margin: float = 0.0  # m in -log sigmoid(r_c - r_r - m): chosen must win by at least this much
    center_rewards: float = 0.0  # lambda of lambda*(r_c + r_r)^2, pulls rewards toward mean 0 (0.01 is typical)
    share_prompt: bool = True  # a pair is ONE row [prompt | chosen | rejected]: the prompt runs once for both
    device: str = "auto"  # cpu, cuda, or auto
    compile: bool = False  # torch.compile RMSNorm, RoPE, SwiGLU and the log-prob kernels: less memory, ~20 s warmup
    resume: bool = False  # continue the run in --out from its train_state.pt
    log_every: int = 10  # progress line + log.jsonl row every N steps
    save_every: int = 0  # write train_state.pt every N steps, for --resume (0 = never)
    eval_every: int = 0  # evaluate on --eval-data every N steps (0 = only at the end)
    bf16: bool = False  # bf16 autocast for the trunk (~1.5x faster on AVX512-BF16 CPUs); head and loss stay fp32
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping


def rewards_of(model, batch, device, bf16=False):
    """Scalar reward per row (N,), fp32: the score head on the final hidden state of the last real token.
    A shared-prompt batch (B rows [prompt | chosen | rejected]) gives the same (2B,): chosen, then rejected."""
    b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    ids, att = b["input_ids"], b["attention_mask"]
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
        hidden = model(ids, att, position_ids=b.get("position_ids"),
                       return_hidden=True).float()  # (N, T, C); the head and the loss stay fp32
    if "last_index" in b:  # each response's last token: (B, 2) -> chosen column, then rejected column
        last = b["last_index"].T.reshape(-1)  # (2B,)
        rows = torch.arange(len(ids), device=device).repeat(2)
    else:
        last = last_token_index(att)  # (N,) by position, never by id: pad == EOS (pitfall 1)
        rows = torch.arange(len(last), device=device)
    return model.score(hidden[rows, last]).squeeze(-1).float()  # (N,)


def pair_stats(chosen, rejected) -> torch.Tensor:
    """[pairs, correct, margin sum, reward sum, reward^2 sum]: summable over micro-batches and ranks."""
    r = torch.cat([chosen, rejected])
    return torch.stack([torch.tensor(float(len(chosen)), device=r.device), (chosen > rejected).sum().float(),
                        (chosen - rejected).sum(), r.sum(), (r * r).sum()]).detach()


def summarize(s: torch.Tensor, prefix: str = "") -> dict:
    n = max(float(s[0]), 1.0)
    mean = float(s[3]) / (2 * n)
    std = max(float(s[4]) / (2 * n) - mean * mean, 0.0) ** 0.5
    return {f"{prefix}accuracy": float(s[1]) / n, f"{prefix}margin": float(s[2]) / n,
            f"{prefix}reward_mean": mean, f"{prefix}reward_std": std}


@torch.no_grad()
def evaluate(model, examples, collate, cfg, device, rank, world) -> dict:
    """Pairwise accuracy (r_c > r_r), mean margin, and the mean/std of all rewards on held-out pairs."""
    model.eval()
    mine = loop.shard(list(range(len(examples))), rank, world)
    stats = torch.zeros(5, device=device)
    for k in range(0, len(mine), cfg.batch_size):
        r = rewards_of(model, collate([examples[i] for i in mine[k:k + cfg.batch_size]]), device,
                           cfg.bf16)  # (2B,)
        stats += pair_stats(*r.chunk(2))
    model.train()
    return summarize(loop.all_reduce_sum(stats), "eval_")


def main(cfg: Config) -> dict:
    # 0. flags: nonsense values are one-line errors (exit 2) before anything is loaded
    for name in ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "lr"):
        check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup", "save_every", "eval_every", "weight_decay", "grad_clip", "center_rewards", "lora_rank"):
        check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    check(not cfg.nf4 or cfg.lora_rank > 0, "--nf4 needs --lora-rank > 0 (QLoRA trains adapters on a 4-bit base)")
    device, rank, world = loop.setup(cfg.seed, cfg.device)

    # 1. data: validated rows (bad input -> `FILE:LINE: what`); --out is checked now but written only when every
    #    input has passed (step 4; rank -1: check only), so a bad run leaves nothing behind
    rows = read_prefs(cfg.data)
    eval_rows = read_prefs(cfg.eval_data) if cfg.eval_data else []
    loop.prepare_out(cfg.out, cfg, cfg.resume, rank=-1)

    # 2. model: the SFT model + a fresh score head (an RM checkpoint keeps its own); NF4 base and LoRA optional.
    #    The head is trained in full next to the adapters (PEFT's modules_to_save) and never quantized.
    model, tok = load(cfg.init, device)
    check(cfg.max_len <= model.cfg.max_position_embeddings,
          f"--max-len {cfg.max_len} exceeds the model's {model.cfg.max_position_embeddings} positions")
    if model.score is None:
        model.add_score_head(seed=cfg.seed)  # std 1/sqrt(d+1)
    if cfg.nf4:
        quantize_nf4_(model, skip=("lm_head", "score"))
    if cfg.lora_rank > 0:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, trainable=("score",))
    model.train()
    if cfg.compile:  # fused RMSNorm/RoPE/SwiGLU (the matmuls and attention stay eager)
        compile_pointwise()
    params = loop.trainable(model)
    opt = loop.make_optimizer(params, cfg.lr, cfg.weight_decay)

    # 3. tokenize: prompt ids + response ids (ending with <|im_end|>); chosen and rejected collate into one batch
    examples = tokenize_prefs(tok, rows, cfg.max_len, cfg.data, rank == 0)
    eval_examples = tokenize_prefs(tok, eval_rows, cfg.max_len, cfg.eval_data, rank == 0) if eval_rows else []

    def collate(exs):
        return (collate_shared if cfg.share_prompt else collate_pairs)(exs, tok.pad_id, cfg.max_len)

    # 4. record the run in --out (rank 0, after every rank has checked it), or resume it: trainable weights
    #    (adapters + head), optimizer, RNGs and the step
    st = loop.start_or_resume(cfg, model, opt, rank)
    start, skipped = st["step"], st["extra"].get("skipped", 0)

    logger = Logger(cfg.out, cfg.max_steps, enabled=rank == 0, start_step=start)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    inject = int(os.environ.get("NANOALIGN_INJECT_NAN_STEP", 0))  # fault injection for the tests (1-based step)
    stats, seen, t_log = torch.zeros(5, device=device), 0.0, time.time()
    loss = first_loss = None
    eval_metrics, train_metrics = {}, {}
    for step in range(start, cfg.max_steps):
        # 5. this rank's share of the global batch of pairs, as micro-batches (one shared-prompt row per pair)
        idx = loop.shard(loop.batch_indices(step, global_batch, len(examples), cfg.seed), rank, world)
        micro = [collate([examples[i] for i in idx[k:k + cfg.batch_size]]) for k in range(0, len(idx), cfg.batch_size)]
        n_pairs = loop.all_reduce_sum(torch.tensor(float(len(idx)), device=device))  # pairs in the GLOBAL batch
        seen += sum(float(m["attention_mask"].sum()) for m in micro)

        # 6. forward + backward per micro-batch: summed pair losses / global pairs, so the gradients add up exactly
        loss_sum = torch.zeros((), device=device)
        for m in micro:
            rewards = rewards_of(model, m, device, cfg.bf16)  # (2B,)
            chosen, rejected = rewards.chunk(2)  # (B,), (B,)
            # (B,): −log σ(r_c − r_r − m) + λ·(r_c + r_r)², summed / the global pair count
            mloss = bradley_terry_loss(chosen, rejected, cfg.margin, cfg.center_rewards).sum() / n_pairs
            if step + 1 == inject:
                mloss = mloss * float("nan")
            mloss.backward()
            loss_sum += mloss.detach()
            stats += pair_stats(chosen, rejected)
        loss_t = loop.all_reduce_sum(loss_sum)

        # 7. a non-finite loss stops the run (the last train_state.pt stays intact) or, with --skip-nonfinite, is
        #    skipped; otherwise sum the gradients over ranks, clip, and step at the scheduled lr
        lr = loop.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        grad_norm = loop.step_or_skip(opt, params, loss_t, lr, step + 1, cfg)  # nan: skipped
        if math.isfinite(grad_norm):
            loss = float(loss_t)
            first_loss = loss if first_loss is None else first_loss
        else:
            skipped += 1

        # 8. eval (every --eval-every steps and at the end), log (training accuracy, margin and rewards over the
        #    steps since the last line), save
        metrics = {}
        last = step + 1 == cfg.max_steps
        if eval_examples and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            metrics = eval_metrics = evaluate(model, eval_examples, collate, cfg, device, rank, world)
        if (step + 1) % cfg.log_every == 0 or step == start or last or metrics:
            now = time.time()
            train_metrics = summarize(loop.all_reduce_sum(stats))
            logger.log(step + 1, loss=float(loss_t), **train_metrics, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=seen * world / (now - t_log), skipped=skipped, **metrics)
            stats, seen, t_log = torch.zeros(5, device=device), 0.0, now
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            loop.save_state(cfg.out, model, opt, step + 1, {"skipped": skipped}, rank)

    # 9. the merged checkpoint as an HF LlamaForSequenceClassification (+ adapter/ with LoRA) and metrics.json
    result = {"loss": loss, "first_loss": first_loss, **train_metrics, **eval_metrics, "steps": cfg.max_steps,
              "skipped_steps": skipped, "train_pairs": len(examples)}
    endoftext = tok.tok.token_to_id("<|endoftext|>")
    if endoftext is not None:  # transformers reads the score at the last token != pad_token_id (see the docstring)
        model.cfg.pad_token_id = endoftext
    loop.finish(cfg.out, model, tok, result, rank, lora=cfg.lora_rank > 0)
    return result


if __name__ == "__main__":
    loop.main_guard(main, Config)
