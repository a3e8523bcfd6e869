"""nanoalign vs the peer stack (transformers + TRL + PEFT), each workload through both, in one run.

Run: python bench/compare.py [--workloads sft dpo generate logprobs] [--warmup 1] [--steps 3] [--quick]
Needs the peers extra (pip install -e .[peers]); without it, each workload prints one line with an "error".
Workload: SmolLM2-135M-Instruct (hub.load; transformers loads the same converted checkpoint), LoRA r=16 alpha=32
dropout 0 on q,k,v,o,gate,up,down of every block, fp32, CPU, torch.set_num_threads(2) (BENCH_THREADS overrides)
in every child; synthetic random token ids. Every side of every workload runs in its own fresh subprocess, so
peak_rss_mb (VmHWM: the process's peak resident set, imports and model included) is its own.
    sft       one optimizer step, 4 rows x 256 tokens, loss on every token. Ours: bench/train_step.py's worker.
              Peer: trl.SFTTrainer + peft.LoraConfig on pre-tokenized {"input_ids"} rows of exactly 256 tokens.
    dpo       one optimizer step, 4 pairs, each a 64-token prompt + a 64-token completion, the reference log-probs
              taken with the adapter disabled every step. Ours: bench/train_step.py's worker, which collates as
              train_dpo.py does (4 shared-prompt rows [prompt | chosen | rejected]). Peer: trl.DPOTrainer
              (ref_model=None + peft_config, so the reference is the adapter-disabled policy) on prompt/chosen/rejected
              strings of single-token words that tokenize to exactly 64 tokens each (TRL appends the EOS).
    generate  batch 8, random 32-token prompts, 64 new tokens, pure sampling at T=1, EOS never stops a row.
              Ours: nanoalign.generate.generate on an fp32 nanoalign.fast.sampling_copy (weights packed for
              oneDNN; and, as extras, the bf16 one that train_ppo.py --bf16 samples from, eager and with its
              decode step compiled). Peer: transformers model.generate in fp32. Both via bench/generate.py.
    logprobs  per-token log-probs of an (8, 512) batch from final hidden states through the frozen (tied, LoRA)
              lm_head, V=49152, forward + backward. Ours: logprobs_chunked. Peer: the naive path, full logits then
              trl.trainer.utils.selective_log_softmax. Extra: TRL's own chunked head (ChunkedLogProbFunction, which
              TRL 1.16's trainers patch in). peak_mem_mb is the op's own: the peak RSS during a step minus the RSS
              just before it (VmHWM reset through /proc/self/clear_refs, as in bench/logprobs.py). These children
              run with MALLOC_MMAP_THRESHOLD_=131072, so that freed blocks leave RSS: with glibc's adaptive
              threshold the naive path's figure varied 0.4-1.0 GB from run to run; fixed, it repeats exactly.
Timing: after --warmup untimed steps, step_s is the median of --steps timed steps (the peer trainers are timed
from on_step_begin to on_step_end, which leaves out their data loading and logging). tokens_per_s counts every
token of the batch: sft 4 x 256, dpo 8 x 128 (chosen and rejected), generate 8 x 64 new, logprobs 8 x 512.
ratio = ours / peer. --quick shrinks the rows (sft 64, dpo 16+16, generate 8 new, logprobs 128) and runs one
timed step, to check that every side runs; its figures mean nothing.
Goals: dpo >= 2x the peer's tokens/s at <= 0.6x its peak RSS; sft >= 1.5x; generate >= 3x; log-prob peak memory
<= 1/8 of naive. One JSON line per workload.
"""
import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("sft", "dpo", "generate", "logprobs")
SIDES = {"sft": ("nanoalign", "peer", "nanoalign-compiled"), "dpo": ("nanoalign", "peer", "nanoalign-compiled"),
         "generate": ("nanoalign", "peer", "nanoalign-bf16", "nanoalign-compiled"),
         "logprobs": ("nanoalign", "peer", "trl-fused")}
PEER_NAMES = {"sft": "trl-sft+peft", "dpo": "trl-dpo+peft", "generate": "hf-generate",
              "logprobs": "trl-selective_log_softmax"}
GOALS = {"sft": {"tokens_per_s": 1.5}, "dpo": {"tokens_per_s": 2.0, "peak_rss_mb": 0.6},
         "generate": {"tokens_per_s": 3.0}, "logprobs": {"peak_mem_mb": 1 / 8}}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEERS_EXTRA = ("transformers", "trl", "peft", "datasets", "accelerate")


def shapes(quick: bool) -> dict:
    """The workload sizes; --quick shrinks them for a smoke run."""
    if quick:
        return dict(sft_len=64, dpo_prompt=16, dpo_completion=16, gen_batch=8, gen_prompt=32, gen_new=8,
                    lp_batch=8, lp_len=128)
    return dict(sft_len=256, dpo_prompt=64, dpo_completion=64, gen_batch=8, gen_prompt=32, gen_new=64,
                lp_batch=8, lp_len=512)


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", 2))


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def checkpoint_dir() -> str:
    sys.path.insert(0, ROOT)
    from nanoalign import hub
    return os.path.join(hub.cache_dir(), hub.ALIAS)  # the converted checkpoint (the parent made sure it exists)


# ---- the peer trainers ----

def step_timer():
    """A TrainerCallback that times each optimizer step, from on_step_begin to on_step_end."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.threads = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.threads = torch.get_num_threads()

    return StepTimer()


def peer_config(cls, out: str, steps: int, **kw):
    """SFTConfig / DPOConfig for a plain fp32 CPU run with no eval, saving, logging or reporting overhead."""
    return cls(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-5, adam_beta2=0.95,
               weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
               optim="adamw_torch", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
               eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
               dataloader_num_workers=0, seed=0, **kw)


def peer_train(workload: str, warmup: int, steps: int, sh: dict) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.set_num_threads(threads())
    torch.manual_seed(0)
    path = checkpoint_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    n = warmup + steps
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        if workload == "sft":
            T = sh["sft_len"]
            g = torch.Generator().manual_seed(0)
            rows = torch.randint(3, model.config.vocab_size, (4 * n, T), generator=g).tolist()
            ds = datasets.Dataset.from_dict({"input_ids": rows})  # pre-tokenized: labels = input_ids (all tokens)
            cfg = peer_config(SFTConfig, out, n, max_length=T, packing=False, padding_free=False)
            trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                                 callbacks=[timer])
            assert all(len(r) == T for r in trainer.train_dataset["input_ids"]), "SFT rows are not all T tokens"
            B = 4
        else:
            P, C = sh["dpo_prompt"], sh["dpo_completion"]
            words = single_token_words(tok)
            g = torch.Generator().manual_seed(0)
            text = lambda k: "".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist())
            # C - 1 words: DPOTrainer appends the EOS to chosen and rejected
            ds = datasets.Dataset.from_dict({"prompt": [text(P) for _ in range(4 * n)],
                                             "chosen": [text(C - 1) for _ in range(4 * n)],
                                             "rejected": [text(C - 1) for _ in range(4 * n)]})
            cfg = peer_config(DPOConfig, out, n, beta=0.1, max_length=P + C, precompute_ref_log_probs=False)
            trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=ds, processing_class=tok,
                                 peft_config=lora, callbacks=[timer])
            d = trainer.train_dataset
            assert all(len(p) == P for p in d["prompt_ids"]), "DPO prompts are not all P tokens"
            completions = list(d["chosen_ids"]) + list(d["rejected_ids"])
            assert all(len(c) == C for c in completions), "DPO completions are not all C tokens"
            B, T = 8, P + C
        torch.set_num_threads(threads())  # in case the trainer's setup changed it
        assert not trainer.args.activation_checkpointing, "the peer would recompute activations"
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    times = timer.times[warmup:]
    step_s = statistics.median(times)
    return {"name": PEER_NAMES[workload], "step_s": round(step_s, 3), "tokens_per_s": round(B * T / step_s, 1),
            "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1), "batch": B, "seq_len": T,
            "threads": timer.threads, "trainable_params": n_train, "warmup": warmup, "steps": len(times),
            "step_s_all": [round(t, 3) for t in times], "versions": {m: __import__(m).__version__ for m in
                                                                     ("transformers", "trl", "peft")}}


def single_token_words(tok) -> list[str]:
    """Words like " house" that are one token each; a string of them tokenizes to exactly one token per word
    (the pre-tokenizer splits at every space, so no merges cross a word boundary)."""
    vocab = tok.get_vocab()
    cands = sorted(t[1:] for t in vocab if re.fullmatch(r"Ġ[a-z]{3,8}", t))
    words = [" " + w for w in cands if tok(" " + w, add_special_tokens=False)["input_ids"] == [vocab["Ġ" + w]]]
    assert len(words) > 1000, "too few single-token words"
    return words


# ---- the nanoalign sides ----

def ours_train(workload: str, warmup: int, steps: int, sh: dict, compiled: bool = False) -> dict:
    from train_step import worker  # bench/train_step.py: the step the scripts take (this directory is sys.path[0])
    seq_len = sh["sft_len"] if workload == "sft" else sh["dpo_prompt"] + sh["dpo_completion"]
    row = worker(workload, warmup + compiled, steps, "smollm2-135m-instruct", seq_len=seq_len, compiled=compiled)
    for k in ("peer", "ratio", "goal_met"):  # train_step's ratios are to figures measured elsewhere
        row.pop(k, None)
    return row


def generate_side(side: str, steps: int, sh: dict) -> dict:
    import generate as bench_generate  # bench/generate.py
    compiled = side == "nanoalign-compiled"  # the bf16 copy with its decode step compiled (~1-2 min of compile)
    kind, dtype = ("hf", "float32") if side == "peer" else \
        ("nanoalign", "bfloat16" if "bf16" in side or compiled else "float32")
    r = bench_generate.one(kind, sh["gen_batch"], sh["gen_prompt"], sh["gen_new"], steps, compiled, dtype,
                           packed=kind == "nanoalign")  # ours: sampling_copy (packed), in fp32 or bf16
    name = PEER_NAMES["generate"] if side == "peer" else f"nanoalign-{dtype}" + "-compiled" * compiled
    return {"name": name, "step_s": round(r["batch"] * r["new_tokens"] / r["tokens_per_s"], 3),
            "tokens_per_s": round(r["tokens_per_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "decode_ms": round(r["step_ms"], 1), "first_call_s": round(r["first_call_s"], 2), "dtype": dtype,
            "batch": r["batch"], "prompt_len": r["prompt_len"], "new_tokens": r["new_tokens"], "reps": steps,
            "threads": threads()}


def logprobs_side(side: str, warmup: int, steps: int, sh: dict) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    B, T, D, V = sh["lp_batch"], sh["lp_len"], 576, 49152  # SmolLM2-135M's width and vocabulary
    hidden = torch.randn(B, T, D).requires_grad_()  # the final hidden states (B, T, C)
    weight = torch.randn(V, D) * 0.02  # the tied lm_head, frozen under LoRA
    labels = torch.randint(0, V, (B, T))
    if side == "nanoalign":
        from nanoalign.logprobs import logprobs_chunked
        fn, name = lambda: logprobs_chunked(hidden, weight, labels), "nanoalign-logprobs_chunked"
    elif side == "peer":
        from trl.trainer.utils import selective_log_softmax
        fn, name = lambda: selective_log_softmax(hidden @ weight.T, labels), PEER_NAMES["logprobs"]  # (B, T, V)
    else:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        fn = lambda: ChunkedLogProbFunction.apply(hidden.view(-1, D), weight, None, labels.view(-1), 1.0,
                                                  _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
        name = "trl-ChunkedLogProbFunction"

    def step():
        hidden.grad = None  # so each step allocates its gradient, as a training step does
        fn().sum().backward()

    for _ in range(max(warmup, 1)):
        step()
    times, peak_mb = [], 0.0
    for _ in range(steps):
        hidden.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = status_kb("VmRSS")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peak_mb = max(peak_mb, (status_kb("VmHWM") - base) / 1024)
    step_s = statistics.median(times)
    return {"name": name, "step_s": round(step_s, 3), "tokens_per_s": round(B * T / step_s, 1),
            "peak_mem_mb": round(peak_mb, 1), "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
            "B": B, "T": T, "d": D, "V": V, "threads": torch.get_num_threads(), "steps": steps,
            "step_s_all": [round(t, 3) for t in times]}


def child(workload: str, side: str, warmup: int, steps: int, sh: dict) -> dict:
    if workload in ("sft", "dpo"):
        if side == "peer":
            return peer_train(workload, warmup, steps, sh)
        return ours_train(workload, warmup, steps, sh, compiled=side == "nanoalign-compiled")
    if workload == "generate":
        return generate_side(side, steps, sh)
    return logprobs_side(side, warmup, steps, sh)


# ---- the parent: one subprocess per side, one line per workload ----

def ratios(ours: dict, peer: dict) -> dict:
    keys = ("tokens_per_s", "peak_mem_mb") if "peak_mem_mb" in ours else ("tokens_per_s", "peak_rss_mb")
    return {k: round(ours[k] / peer[k], 3) for k in keys}


def compare(workload: str, rows: dict, sh: dict, quick: bool) -> dict:
    ours, peer = rows["nanoalign"], rows["peer"]
    ratio = ratios(ours, peer)
    goal = GOALS[workload]

    def met(r: dict) -> bool:
        return all(r[k] >= v if k == "tokens_per_s" else r[k] <= v for k, v in goal.items())

    line = {"workload": workload, "nanoalign": ours, "peer": peer, "ratio": ratio, "goal": goal, "goal_met": met(ratio)}
    for extra in SIDES[workload][2:]:  # sft/dpo: --compile; generate: bf16, eager and compiled; logprobs: TRL's
        key = {"nanoalign-bf16": "nanoalign_bf16", "trl-fused": "peer_trl_fused",  # own chunked head
               "nanoalign-compiled": "nanoalign_compiled"}[extra]
        line[key] = rows[extra]
        line[f"ratio_{key}"] = ratios(ours, rows[extra]) if extra == "trl-fused" else ratios(rows[extra], peer)
    if "ratio_nanoalign_compiled" in line:
        line["goal_met_compiled"] = met(line["ratio_nanoalign_compiled"])
    if workload == "logprobs":
        line["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")
    line["quick"] = quick
    line["shape"] = {k: v for k, v in sh.items() if k.startswith({"sft": "sft", "dpo": "dpo", "generate": "gen",
                                                                   "logprobs": "lp"}[workload])}
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, the median is reported (default 3; 1 "
                                                            "with --quick)")
    ap.add_argument("--quick", action="store_true", help="small shapes and one timed step: a smoke run")
    ap.add_argument("--child", nargs=2, metavar=("WORKLOAD", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = args.steps or (1 if args.quick else 3)
    sh = shapes(args.quick)
    if args.child:
        print(json.dumps(child(*args.child, args.warmup, steps, sh)))
        return
    missing = [m for m in PEERS_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        for w in args.workloads:
            print(json.dumps({"workload": w, "error": "peers extra not installed: pip install -e .[peers]",
                              "missing": missing}))
        return
    sys.path.insert(0, ROOT)
    from nanoalign import hub
    hub.load(hub.ALIAS)  # convert the GGUF once, outside the timed children
    failed = False
    for w in args.workloads:
        rows = {}
        for side in SIDES[w]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", w, side, "--warmup", str(args.warmup),
                   "--steps", str(steps)] + (["--quick"] if args.quick else [])
            env = dict(os.environ)
            if w == "logprobs":  # a fixed mmap threshold: every big block is mmap'ed and returned when freed
                env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                rows = {"error": f"{side}: {r.stderr.strip()[-600:]}"}
                break
            rows[side] = json.loads(r.stdout.strip().splitlines()[-1])
        if "error" in rows:
            failed = True
            print(json.dumps({"workload": w, **rows}), flush=True)
        else:
            print(json.dumps(compare(w, rows, sh, args.quick)), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
