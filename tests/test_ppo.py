import io
import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error, run_cli
from safetensors.torch import load_file

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_driver  # noqa: E402
import train_ppo  # noqa: E402

from nanoalign import hub, loop, rl  # noqa: E402
from nanoalign.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nanoalign.cli import UserError, parse_cli  # noqa: E402
from nanoalign.data import collate_sft, read_sft, tokenize_sft  # noqa: E402
from nanoalign.logprobs import token_logprobs  # noqa: E402
from nanoalign.losses import sft_loss  # noqa: E402
from nanoalign.packing import response_rewards, share_prompts  # noqa: E402

TIMING = ("elapsed_s", "generate_s", "score_s", "train_s", "tokens_per_s")
Samples = train_ppo.Samples

pytestmark = pytest.mark.usefixtures("one_thread")


def write_prompts(path, constraints=True):
    """A task the random tiny model can learn in a few iterations, judged by the real gold judge: answer in lowercase
    without commas. Random bytes rarely manage it: uppercase letters slip in, and a reply of fewer than 3 words is
    degenerate (score 0), so the policy has to learn to write lowercase words."""
    with open(path, "w") as f:
        for i in range(8):
            row = {"prompt": f"Note {i}. Use lowercase and no commas."}
            if constraints:
                row["constraints"] = [{"type": "case", "value": "lower"}, {"type": "no_commas", "value": None}]
            f.write(json.dumps(row) + "\n")
    return str(path)


def ppo(tmp_path, name, *flags, prompts=None):
    """Run train_ppo in-process on the tiny model; returns (log rows, metrics)."""
    prompts = prompts or write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / name
    cfg = parse_cli(train_ppo.Config, ["--init", "tiny", "--prompts", prompts, "--out", str(out), "--device", "cpu",
                                       "--max-new-tokens", "16", "--lr", "1e-2", "--kl-coef", "0.01",
                                       "--missing-eos-penalty", "0", "--minibatch-size", "16", *flags])
    metrics = train_ppo.main(cfg)
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f], metrics


def assert_improves(log, margin=0.25):
    scores = [r["score"] for r in log]
    before, after = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    assert after >= before + margin, scores
    return before, after


def test_logprobs_are_taken_at_the_sampling_temperature(tiny):
    model, tok = tiny
    seq = torch.tensor([[5, 6, 7, 8, 9, 10], [2, 2, 7, 8, 9, 2]])  # row 2: left pad, then response + right pad
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # response = last 3 columns (P = 3)
    logprobs, _, _ = train_ppo.forward(model, None, Samples(seq, attn, mask, 3), temperature=0.7)
    naive = torch.log_softmax(model(seq, attn)[:, 2:-1].float() / 0.7, -1).gather(-1, seq[:, 3:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, naive * mask)
    assert logprobs[1, 2] == 0  # padding has no log-prob


def test_share_prompts_layout_hand_worked():
    # prompt [5, 6] (one left pad), responses [7, 8] and [9] (right pad); k = 2 -> one row [5 6 | 7 8 | 9]
    seq = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    s = share_prompts(seq, attn, torch.tensor([[1, 1], [1, 0]]), 3, 2)
    assert s["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert s["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # response 2 restarts after the prompt
    seg = [0, 0, 1, 1, 2]  # the prompt, then responses 1 and 2: each sees the prompt and itself
    allowed = [[s >= t and (seg[t] == 0 or seg[s] == seg[t]) for t in range(5)] for s in range(5)]
    assert s["attention_mask"][0, 0].tolist() == allowed
    assert s["prev"].tolist() == [[1, 2], [1, 0]]  # both first tokens are predicted from the prompt's last token
    assert s["last"].tolist() == [3, 4]


def test_shared_prompt_rows_give_the_unshared_logprobs_and_values(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    value_head = torch.nn.Linear(model.cfg.hidden_size, 1)
    k, P, N = 3, 6, 5
    plens, rlens = [6, 3], [5, 1, 3, 2, 5, 4]  # 2 prompts of different widths, 3 responses each
    seq = torch.randint(3, 259, (2 * k, P + N), generator=g)
    attn = torch.zeros_like(seq)
    for b in range(2 * k):
        seq[b, :P] = seq[b // k * k, :P]  # the k rows of a prompt share it
        attn[b, P - plens[b // k]:P + rlens[b]] = 1
    x = Samples(seq, attn, attn[:, P:], P)
    lp, v, _ = train_ppo.forward(model, value_head, x, 0.7)
    lp_s, v_s, _ = train_ppo.forward(model, value_head, x, 0.7, k=k)
    torch.testing.assert_close(lp_s, lp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_s, v, atol=1e-5, rtol=1e-4)
    assert (lp_s[x.mask == 0] == 0).all() and (lp_s[x.mask == 1] < 0).all()


def test_bf16_sampler_logprobs_are_generates_cut_to_the_rollout(tmp_path, monkeypatch):
    """--bf16: log π_sampler is Rollout.logprobs, generate's log-prob of each token as it drew it from the bf16 copy,
    cut to the columns some response reached (3 empty ones are appended here, as a decode loop that runs on past the
    last EOS until its next check leaves them), and sampler_mismatch = Σ|log π_sampler − log π_old| / Σ tokens."""
    real_generate, per_token_rewards, seen = train_ppo.generate, rl.per_token_rewards, {}

    def generate_then_pad(*args, **kwargs):
        seen["ro"] = ro = real_generate(*args, **kwargs)
        for name in ("sequences", "attention_mask", "response_mask", "logprobs"):
            t = getattr(ro, name)
            setattr(ro, name, torch.cat([t, torch.zeros_like(t[:, :3])], 1))
        return ro

    def spy(scores, logprobs, *args, **kwargs):  # log π_old, from the policy's forward (trunk autocast to bf16)
        seen["old"] = logprobs.clone()
        return per_token_rewards(scores, logprobs, *args, **kwargs)
    monkeypatch.setattr(train_ppo, "generate", generate_then_pad)
    monkeypatch.setattr(rl, "per_token_rewards", spy)
    log, _ = ppo(tmp_path, "bf16", "--estimator", "rloo", "--rollout-batch", "4", "--samples-per-prompt", "4",
                 "--ppo-epochs", "1", "--max-steps", "1", "--bf16")
    ro, old = seen["ro"], seen["old"]
    N = old.shape[1]
    assert N == ro.logprobs.shape[1] - 3 and (ro.logprobs[:, N:] == 0).all() and (ro.logprobs[:, :N] != 0).any()
    want = (ro.logprobs[:, :N] - old).abs().sum() / ro.response_mask.sum()
    assert want > 1e-4 and log[0]["sampler_mismatch"] == pytest.approx(float(want), rel=1e-5)  # another policy


def test_reward_model_score_is_read_at_the_last_real_token(tiny):
    rm, _ = hub.load("tiny")
    rm.add_score_head()
    P, no = 2, torch.tensor([False])
    alone = response_rewards(rm, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long),
                             torch.ones(1, 1, dtype=torch.long), P, no, eos_id=2)
    padded = response_rewards(rm, torch.tensor([[2, 5, 6, 7, 2]]), torch.tensor([[0, 1, 1, 1, 0]]),
                              torch.tensor([[1, 1, 0]]), P + 1, no, eos_id=2)
    torch.testing.assert_close(padded, alone)  # left and right padding change nothing
    torch.testing.assert_close(alone, rm.score(rm(torch.tensor([[5, 6, 7]]), return_hidden=True)[:, -1]).squeeze(-1))


def test_a_response_cut_off_before_eos_is_scored_closed_with_eos(tiny):
    rm, _ = hub.load("tiny")
    rm.add_score_head()
    seq, ones = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 2]]), torch.ones(2, 4, dtype=torch.long)  # row 0 hit the cap
    got = response_rewards(rm, seq, ones, ones[:, 2:], 2, torch.tensor([True, False]), eos_id=2)
    closed = rm.score(rm(torch.tensor([[5, 6, 7, 8, 2]]), return_hidden=True)[:, -1]).squeeze(-1)
    finished = rm.score(rm(seq[1:], return_hidden=True)[:, -1]).squeeze(-1)
    torch.testing.assert_close(got, torch.cat([closed, finished]))
    assert not torch.allclose(got[:1], rm.score(rm(seq[:1], return_hidden=True)[:, -1]).squeeze(-1))  # not mid-answer


def test_shared_prompt_rows_give_the_unshared_rm_scores(tiny):
    rm, _ = hub.load("tiny")
    rm.add_score_head()
    P = 3  # two prompts (one left-padded) x 2 responses; rows 0 and 3 hit the cap of 3 tokens, rows 1 and 2 ended
    seq = torch.tensor([[5, 6, 7, 9, 10, 11], [5, 6, 7, 8, 2, 0], [0, 4, 5, 2, 0, 0], [0, 4, 5, 12, 13, 14]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    cut, mask = torch.tensor([True, False, False, True]), attn[:, P:]
    plain = response_rewards(rm, seq, attn, mask, P, cut, 2)
    torch.testing.assert_close(response_rewards(rm, seq, attn, mask, P, cut, 2, k=2), plain, atol=1e-5, rtol=1e-4)
    unclosed = response_rewards(rm, seq, attn, mask, P, torch.zeros(4, dtype=torch.bool), 2)
    assert not torch.allclose(plain, unclosed)  # the closing EOS is read


def test_missing_eos_penalty_hits_only_the_cut_responses(tmp_path, monkeypatch):
    """The first 4 of 8 responses are made to end with EOS after 3 tokens; the rest run to the 16-token cap. Every
    response's judge score is 0.25, so the scores that enter the rewards are 0.25, and 0.25 − 0.7 where cut."""
    real_generate, seen = train_ppo.generate, {}

    def finish_half(model, prompts, max_new_tokens, eos_id, *args, **kwargs):
        ro = real_generate(model, prompts, max_new_tokens, eos_id, *args, **kwargs)
        P, half = ro.prompt_len, len(prompts) // 2
        ro.sequences[:half, P + 2], ro.sequences[:half, P + 3:] = eos_id, eos_id
        ro.response_mask[:half, 3:], ro.attention_mask[:half, P + 3:] = 0, 0
        seen["eos"] = ro.sequences[:, P:].gather(1, ro.response_mask.sum(1, keepdim=True) - 1).squeeze(1) == eos_id
        return ro

    def spy(scores, *args, **kwargs):
        seen["scores"] = scores.clone()
        return per_token_rewards(scores, *args, **kwargs)
    per_token_rewards = rl.per_token_rewards
    monkeypatch.setattr(train_ppo, "generate", finish_half)
    monkeypatch.setattr(train_ppo, "gold_score", lambda text, row: 0.25)
    monkeypatch.setattr(rl, "per_token_rewards", spy)
    log, _ = ppo(tmp_path, "eos", "--rollout-batch", "8", "--max-steps", "1", "--ppo-epochs", "1",
                 "--missing-eos-penalty", "-0.7")
    eos = seen["eos"]
    assert eos[:4].all() and not eos.all()  # both kinds are there
    torch.testing.assert_close(seen["scores"], torch.where(eos, 0.25, 0.25 - 0.7))
    assert log[0]["score"] == 0.25 and log[0]["eos_rate"] == eos.float().mean().item()  # logged without the penalty


def test_ppo_gae_raises_gold_score_and_adapts_beta(tmp_path):
    log, metrics = ppo(tmp_path, "gae", "--rollout-batch", "32", "--max-steps", "14", "--target-kl", "1",
                       "--kl-horizon", "100")
    before, after = assert_improves(log)
    print(f"gae: score {before:.2f} -> {after:.2f}")
    assert all(r["gold"] == r["score"] for r in log)  # --reward gold: the proxy is the gold judge
    assert log[0]["kl"] == 0  # the first rollout: policy == reference, exactly
    # adaptive β from the logged KL: β' = β(1 + clip(KL/1 − 1, ±0.2)·32/100), 32 responses per iteration
    for prev, nxt in zip(log, log[1:]):
        assert nxt["beta"] == pytest.approx(prev["beta"] * (1 + min(max(prev["kl"] - 1, -0.2), 0.2) * 0.32))
    assert log[-1]["beta"] > log[0]["beta"]  # the KL ran above the target for most of the run
    for key in ("approx_kl", "clipfrac", "vf_loss", "explained_var", "resp_len", "eos_rate", "generate_s",
                "score_s", "train_s", "loss"):
        assert key in log[-1], key
    vh = load_file(str(tmp_path / "gae" / "value_head.safetensors"))
    assert vh["weight"].shape == (1, 64) and vh["weight"].abs().sum() > 0  # zero-init, then trained
    load_checkpoint(str(tmp_path / "gae"))  # the merged policy loads
    assert metrics["score"] == log[-1]["score"] and metrics["first_score"] == log[0]["score"]


def test_rloo_raises_score(tmp_path):
    log, _ = ppo(tmp_path, "rloo", "--estimator", "rloo", "--rollout-batch", "4", "--samples-per-prompt", "8",
                 "--max-steps", "14")
    before, after = assert_improves(log)
    print(f"rloo: score {before:.2f} -> {after:.2f}")
    assert "vf_loss" not in log[-1] and not os.path.exists(tmp_path / "rloo" / "value_head.safetensors")


def test_shared_prompt_run_follows_the_unshared_run(tmp_path):
    """One minibatch of all 16 responses per epoch: the shuffles differ (whole prompts vs single responses) only in
    the order of the rows inside it, so the two runs take the same steps up to float summation order."""
    flags = ["--estimator", "rloo", "--rollout-batch", "4", "--samples-per-prompt", "4", "--ppo-epochs", "2",
             "--max-steps", "3"]
    shared, _ = ppo(tmp_path, "shared", *flags)
    rows, _ = ppo(tmp_path, "rows", *flags, "--share-prompt", "false")
    assert shared[-1]["kl"] > 0.1 and shared[-1]["ratio"] != 1  # the policy moved
    for a, b in zip(shared, rows):
        for key in a.keys() - set(TIMING):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (key, a, b)


def test_ptx_adds_the_demonstrations_nll_and_lowers_it(tmp_path):
    """PPO-ptx: each update adds γ × the token-mean NLL of --ptx-batch demonstration rows. With one update per
    iteration, the first logged ptx_loss is that NLL under the initial weights (computed here independently), and
    with γ large the policy learns the demonstrations."""
    demo = tmp_path / "sft.jsonl"
    with open(demo, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Note {i}.", "completion": "calm blue sea " * (1 + i % 3)}) + "\n")
    flags = ["--estimator", "rloo", "--rollout-batch", "4", "--samples-per-prompt", "4", "--ppo-epochs", "1",
             "--max-steps", "6", "--ptx-data", str(demo), "--ptx-batch", "3"]
    log, _ = ppo(tmp_path, "ptx", *flags, "--ptx-coef", "2")
    model, tok = hub.load("tiny")  # the run's initial weights (a full fine-tune of the seeded preset)
    rows = tokenize_sft(tok, read_sft(str(demo)), 512)
    b = collate_sft([rows[j] for j in loop.batch_indices(0, 3, len(rows), 1)], tok.pad_id)  # update 0, seed + 1
    with torch.no_grad():
        lp = token_logprobs(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert log[0]["ptx_loss"] == pytest.approx(float(sft_loss(lp, b["loss_mask"][:, 1:])), rel=1e-5)
    nll = [r["ptx_loss"] for r in log]
    assert nll[-1] < 0.5 * nll[0], nll  # the demonstrations are learned
    plain, _ = ppo(tmp_path, "plain", *flags[:-4])
    assert "ptx_loss" not in plain[0] and plain[0]["loss"] == pytest.approx(log[0]["loss"] - 2 * nll[0], abs=1e-5)


def test_grpo_raises_score_with_beta_k3_in_its_loss(tmp_path):
    log, _ = ppo(tmp_path, "grpo", "--estimator", "grpo", "--rollout-batch", "4", "--samples-per-prompt", "8",
                 "--max-steps", "14", "--kl-coef", "0.05")
    before, after = assert_improves(log)
    print(f"grpo: score {before:.2f} -> {after:.2f}")
    # each minibatch loss is pg_loss + β·kl_loss (β fixed), so their means over the minibatches are too
    for r in log:
        assert r["loss"] == pytest.approx(r["pg_loss"] + 0.05 * r["kl_loss"], abs=1e-6)
    assert log[-1]["kl_loss"] > 0.01  # the policy has moved away from the reference: the term is at work


def test_bf16_sampling_logs_the_mismatch_and_tis_weights_each_term(tmp_path):
    """--bf16 samples from a bf16 copy. Its log-probs differ from π_old's a little (sampler_mismatch). With --tis-cap
    0.5 every weight min(π_old/π_sampler, 0.5) is 0.5 (the ratios are near 1), so the first update's policy loss is
    exactly half of the uncorrected one, on the same samples."""
    flags = ["--estimator", "rloo", "--rollout-batch", "4", "--samples-per-prompt", "4", "--ppo-epochs", "1",
             "--max-steps", "1", "--bf16"]
    plain, _ = ppo(tmp_path, "plain", *flags)
    tis, _ = ppo(tmp_path, "tis", *flags, "--tis-cap", "0.5")
    assert 1e-4 < plain[0]["sampler_mismatch"] < 0.02 and tis[0]["sampler_mismatch"] == plain[0]["sampler_mismatch"]
    assert tis[0]["pg_loss"] == pytest.approx(0.5 * plain[0]["pg_loss"], rel=1e-6) and plain[0]["pg_loss"] != 0
    assert tis[0]["score"] == plain[0]["score"] and tis[0]["clipfrac"] == plain[0]["clipfrac"]
    fp32, _ = ppo(tmp_path, "fp32", *flags[:-1])
    assert "sampler_mismatch" not in fp32[0]  # without --bf16 the sampler is the policy itself


def test_resume_is_exact(tmp_path):
    """2N iterations in one go == N, then --resume for N more: same log and same final weights (LoRA, adaptive β)."""
    flags = ["--rollout-batch", "8", "--lora-rank", "4", "--lr", "3e-2", "--target-kl", "1", "--kl-horizon", "100",
             "--save-every", "2"]
    full, _ = ppo(tmp_path, "full", *flags, "--max-steps", "4")
    ppo(tmp_path, "half", *flags, "--max-steps", "2")
    resumed, _ = ppo(tmp_path, "half", *flags, "--max-steps", "4", "--resume")
    assert full[0]["kl"] == 0  # the reference is the policy with its adapter disabled
    assert len(resumed) == 4 and full[-1]["beta"] != full[0]["beta"]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in full]
    for name in ("model.safetensors", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "half" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_a_train_state_with_weights_this_model_lacks(tmp_path):
    flags = ["--rollout-batch", "4", "--ppo-epochs", "1", "--lora-rank", "4", "--save-every", "1"]
    ppo(tmp_path, "run", *flags, "--max-steps", "1")
    path = tmp_path / "run" / "train_state.pt"
    st = torch.load(path, weights_only=True)
    st["weights"]["model.layers.7.mlp.up_proj.lora_A"] = torch.zeros(4, 64)  # the tiny model has 2 layers
    torch.save(st, path)
    with pytest.raises(UserError, match=r"\['model.layers.7.mlp.up_proj.lora_A'\] do not exist in this model"):
        ppo(tmp_path, "run", *flags, "--max-steps", "2", "--resume")


def test_reward_model_run_logs_proxy_and_gold(tmp_path):
    rm, tok = hub.load("tiny", seed=1)
    rm.add_score_head()
    save_checkpoint(str(tmp_path / "rm"), rm, tok)
    log, _ = ppo(tmp_path, "ppo", "--reward", str(tmp_path / "rm"), "--value-from-rm", "--rollout-batch", "8",
                 "--max-steps", "2")
    assert all("score" in r and "gold" in r for r in log)  # the over-optimisation curve: proxy and gold
    assert log[0]["score"] != log[0]["gold"]


def test_value_head_starts_at_zero_or_from_the_rm_head_of_the_same_width(tmp_path):
    for preset in ("tiny", "small"):  # the same byte-level tokenizer, widths 64 and 192
        rm, tok = hub.load(preset, seed=1)
        rm.add_score_head(std=1.0)
        save_checkpoint(str(tmp_path / preset), rm, tok)
    cfg = lambda *flags: parse_cli(train_ppo.Config, ["--init", "tiny", "--device", "cpu", *flags])  # noqa: E731
    value_head = train_ppo.load_models(cfg("--reward", str(tmp_path / "tiny"), "--value-from-rm"), "cpu")[4]
    rm, _ = load_checkpoint(str(tmp_path / "tiny"))
    assert torch.equal(value_head.weight, rm.score.weight) and value_head.bias.item() == 0
    value_head = train_ppo.load_models(cfg(), "cpu")[4]
    assert not value_head.weight.any() and not value_head.bias.any()
    with pytest.raises(UserError, match="the RM and the policy differ in width"):
        train_ppo.load_models(cfg("--reward", str(tmp_path / "small"), "--value-from-rm"), "cpu")


def test_normalize_reward_fixes_a_gain_and_bias_on_the_first_rollout(tmp_path):
    """--normalize-reward: the first rollout (the initial policy's samples, the same as without the flag) sets a mean
    and std that make its RM scores mean 0; both are kept for the run and across --resume."""
    rm, tok = hub.load("tiny", seed=1)
    rm.add_score_head()
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # scores of O(1) that vary between responses
    save_checkpoint(str(tmp_path / "rm"), rm, tok)
    flags = ["--reward", str(tmp_path / "rm"), "--rollout-batch", "8", "--lora-rank", "4", "--save-every", "1"]
    plain, _ = ppo(tmp_path, "plain", *flags, "--max-steps", "1")
    norm, metrics = ppo(tmp_path, "norm", *flags, "--max-steps", "3", "--normalize-reward")
    mean, std = metrics["reward_norm"]
    assert mean == pytest.approx(plain[0]["score"], abs=1e-5) and std > 0.1  # the same samples, their moments
    assert norm[0]["score"] == pytest.approx(0, abs=1e-5) and norm[0]["gold"] == plain[0]["gold"]
    ppo(tmp_path, "half", *flags, "--max-steps", "2", "--normalize-reward")
    resumed, m2 = ppo(tmp_path, "half", *flags, "--max-steps", "3", "--normalize-reward", "--resume")
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert list(m2["reward_norm"]) == list(metrics["reward_norm"]) and strip(resumed[-1]) == strip(norm[-1])


def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch):
    fault_driver.install("nan-loss=2", monkeypatch.setattr)  # every minibatch loss of iteration 2 is NaN
    flags = ["--rollout-batch", "8", "--max-steps", "3", "--save-every", "1"]
    with pytest.raises(loop.TrainingError, match="non-finite loss"):
        ppo(tmp_path, "stop", *flags)
    assert torch.load(tmp_path / "stop" / "train_state.pt", weights_only=True)["step"] == 1  # last good state kept
    log, _ = ppo(tmp_path, "skip", *flags, "--skip-nonfinite")
    assert [r["skipped"] for r in log] == [0, 4, 4]  # iteration 2: 4 epochs x 1 minibatch (8 responses)


def test_progress_on_a_terminal_and_a_short_stdout_line(tmp_path, monkeypatch, capsys):
    """While an iteration runs, a terminal sees one status line rewritten in place; the log line then shows only
    what a reader watches, and log.jsonl has every field."""
    log, _ = ppo(tmp_path, "quiet", "--rollout-batch", "4", "--max-steps", "1", "--ppo-epochs", "1")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 1/1 | score ") and "approx_kl" not in line and "approx_kl" in log[0]
    assert [part.split()[0] for part in line.split(" | ")] == ["step", *train_ppo.SHOW, "eta"]
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdout", tty)
    ppo(tmp_path, "tty", "--rollout-batch", "4", "--max-steps", "1", "--ppo-epochs", "1")
    shown = tty.getvalue()
    status, logged = shown.split("\r")[-2:]  # the last status line, then the log line written over it from column 0
    assert "\r\033[Kstep 1/1: sampling 4 responses\r" in shown and status == "\033[Kstep 1/1: epoch 1, minibatch 1/1"
    assert logged.startswith("step 1/1 | score") and len(logged) > len(status)  # which covers all of it


def test_bad_flags_are_user_errors(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    base = ["train_ppo.py", "--init", "tiny", "--prompts", prompts, "--device", "cpu"]
    assert_user_error(run_cli([*base, "--out", str(tmp_path / "a"), "--estimator", "ppo2"]), "--estimator")
    bad = [(["--estimator", "rloo", "--samples-per-prompt", "1"], "--samples-per-prompt"),
           (["--temperature", "0"], "--temperature"), (["--kl-estimator", "k2"], "--kl-estimator"),
           (["--reward", str(tmp_path / "nope")], "--reward"), (["--clip", "-1"], "--clip"),
           (["--estimator", "grpo", "--whiten-rewards"], "--whiten-rewards"),
           (["--estimator", "rloo", "--minibatch-size", "6"], "multiple of --samples-per-prompt 4"),
           (["--ptx-coef", "1"], "--ptx-data and --ptx-coef"), (["--ptx-batch", "0"], "--ptx-batch"),
           (["--normalize-reward"], "--normalize-reward"), (["--value-from-rm"], "--value-from-rm"),
           (["--tis-cap", "2"], "--tis-cap"),
           (["--tis-cap", "-1", "--bf16"], "--tis-cap"),
           (["--prompts", write_prompts(tmp_path / "plain.jsonl", constraints=False)], "constraints")]
    for flags, needle in bad:
        with pytest.raises(UserError, match=needle):
            train_ppo.main(parse_cli(train_ppo.Config, [*base[1:], "--out", str(tmp_path / "b"), *flags]))


def test_entropy_bonus_k3_whitened_rewards_and_qlora(tmp_path):
    log, _ = ppo(tmp_path, "opts", "--rollout-batch", "8", "--max-steps", "2", "--entropy-coef", "0.01",
                 "--kl-estimator", "k3", "--whiten-rewards", "--nf4", "--lora-rank", "4", "--ppo-epochs", "1")
    # a random-init model is near uniform over its 259 tokens: H just under ln 259 (its maximum) even at T = 0.7
    assert math.log(259) - 0.1 < log[0]["entropy"] <= math.log(259)
    assert log[0]["kl"] == 0  # the reference is the QLoRA policy with its adapter off: exactly the first policy
    # one minibatch: loss = pg_loss + 0.1·vf_loss − 0.01·H
    assert log[0]["loss"] == pytest.approx(log[0]["pg_loss"] + 0.1 * log[0]["vf_loss"] - 0.01 * log[0]["entropy"])
