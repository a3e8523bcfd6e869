import json
import math

import pytest
import torch

from conftest import assert_user_error, run_cli
from nanoalign.generate import filter_logits, generate, generate_texts, sample_next
from nanoalign.model import ModelConfig, PRESETS, Transformer

NEVER = -1  # an eos_id no token can equal: generation runs the full max_new_tokens


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def chaotic():
    """A tiny model with larger random weights: its greedy text varies instead of repeating one token."""
    return Transformer(ModelConfig(**PRESETS["tiny"])).init_weights(seed=0, std=0.3).eval()


@torch.no_grad()
def greedy_no_cache(model, prompt, n):
    """The simple path: a full forward over the whole sequence for every new token, then argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_greedy_without_cache():
    model = chaotic()
    for prompt in prompts_of([1, 7]):
        ro = generate(model, [prompt], 12, eos_id=NEVER, pad_id=0, temperature=0)
        assert ro.sequences[0, ro.prompt_len:].tolist() == greedy_no_cache(model, prompt, 12)
        assert ro.response_mask.tolist() == [[1] * 12]


def test_batched_left_padded_generation_equals_one_by_one():
    model = chaotic()
    prompts = prompts_of([3, 11, 6, 1], seed=1)
    batched = generate(model, prompts, 10, eos_id=NEVER, pad_id=2, temperature=0)
    assert batched.prompt_len == 11 and batched.sequences.shape == (4, 21)
    assert len({tuple(r) for r in batched.responses()}) == 4  # distinct, varied rows: a real comparison
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 10, eos_id=NEVER, pad_id=2, temperature=0)
        assert batched.responses()[i] == alone.responses()[0], i
        # the prompt sits right-aligned, and attention_mask marks prompt + response tokens only
        assert batched.sequences[i, 11 - len(p):11].tolist() == p
        assert batched.attention_mask[i].tolist() == [0] * (11 - len(p)) + [1] * (len(p) + 10)


def test_rows_stop_at_their_own_eos():
    """Any id can serve as EOS: pick one that greedy decoding emits at different steps in different rows."""
    model, N = chaotic(), 16
    for seed in range(20):
        prompts = prompts_of([4, 9, 6], seed=seed)
        free = generate(model, prompts, N, eos_id=NEVER, pad_id=0, temperature=0).responses()
        first = {}  # token -> {row: first step}
        for r, toks in enumerate(free):
            for t, x in enumerate(toks):
                first.setdefault(x, {}).setdefault(r, t)
        cands = [x for x, d in first.items()
                 if x != 0 and len(set(d.values())) >= 2 and 0 < min(d.values()) and max(d.values()) < N - 1]
        if cands:
            break
    assert cands, "no token suitable as a stand-in EOS"
    eos = cands[0]
    ro = generate(model, prompts, N, eos_id=eos, pad_id=0, temperature=0)
    for r in range(3):
        resp = ro.sequences[r, ro.prompt_len:].tolist()
        if r not in first[eos]:  # this row never emits it: it runs to the end, untouched by the others stopping
            assert resp == free[r] and ro.response_mask[r].tolist() == [1] * N
            continue
        k = first[eos][r]
        assert resp[:k + 1] == free[r][:k + 1] and resp[k] == eos  # identical until its own EOS...
        assert resp[k + 1:] == [0] * (N - 1 - k)  # ...then padding
        assert ro.response_mask[r].tolist() == [1] * (k + 1) + [0] * (N - 1 - k)  # EOS itself is in the mask
        assert ro.responses()[r] == free[r][:k + 1]


def test_forced_eos_from_the_lm_head_stops_every_row_at_once(tiny):
    _, tok = tiny
    cfg = ModelConfig(**{**PRESETS["tiny"], "tie_word_embeddings": False})
    model = Transformer(cfg).init_weights(seed=0).eval()
    prompts = prompts_of([2, 5, 3], seed=3)
    free = generate(model, prompts, 10, eos_id=tok.eos_id, temperature=0)
    assert all(tok.eos_id not in r for r in free.responses())  # it does not stop by itself
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)  # the same weights plus a bias on EOS
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_id] = 1e4
    model.lm_head = head
    ro = generate(model, prompts, 10, eos_id=tok.eos_id, temperature=0)
    assert ro.response_mask.tolist() == [[1] + [0] * 9] * 3
    assert ro.responses() == [[tok.eos_id]] * 3
    assert (ro.sequences[:, ro.prompt_len + 1:] == tok.pad_id).all()


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = chaotic()
    prompts = prompts_of([5, 2], seed=4)
    greedy = generate(model, prompts, 12, eos_id=NEVER, pad_id=0, temperature=0).responses()
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        g = torch.Generator().manual_seed(123)
        ro = generate(model, prompts, 12, eos_id=NEVER, pad_id=0, temperature=1.5, generator=g, **kw)
        assert ro.responses() == greedy, kw


def test_sampling_is_reproducible_with_the_same_seed(tiny):
    model, _ = tiny
    prompts = prompts_of([4, 6], seed=5)
    run = lambda s: generate(model, prompts, 16, eos_id=NEVER, pad_id=0, temperature=1.0,
                             generator=torch.Generator().manual_seed(s)).responses()
    assert run(7) == run(7)
    assert run(7) != run(8)  # near-uniform tiny model: different seeds give different text


def test_sample_next_top_k_and_top_p_keep_the_right_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(2000, 4)
    drawn = sample_next(logits, 1.0, top_k=2, generator=g)[0]
    assert set(drawn.tolist()) == {2, 3}
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3 | 0.15, 0.05
    drawn = sample_next(probs.log().expand(2000, 4), 1.0, top_p=0.7, generator=g)[0]
    assert set(drawn.tolist()) == {1, 3}  # the smallest prefix with mass >= 0.7
    frac = (drawn == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.05  # renormalised over the kept tokens
    assert sample_next(logits[:1], 0.0)[0].tolist() == [3]


def test_sample_next_with_given_uniforms_inverts_the_cdf():
    # four equal logits: p = 1/4 each and the cdf 0.25, 0.5, 0.75, 1 exactly. Token i owns [cdf[i-1], cdf[i])
    u = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.9999])
    assert sample_next(torch.zeros(7, 4), 1.0, uniforms=u)[0].tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_u_at_zero_never_picks_a_token_of_probability_zero():
    u0 = torch.zeros(1)
    assert sample_next(torch.tensor([[float("-inf"), 0.0, 0.0]]), 1.0, uniforms=u0)[0].tolist() == [1]
    # top-k removes token 0 (the least likely); u = 0 must land on the first kept token, not on it
    assert sample_next(torch.tensor([[0.0, 2.0, 1.0]]), 1.0, top_k=2, uniforms=u0)[0].tolist() == [1]
    assert sample_next(torch.tensor([[0.0, 1.0, 2.0]]), 1.0, top_p=0.5, uniforms=u0)[0].tolist() == [2]


def test_sample_next_returns_the_log_prob_of_the_distribution_it_drew_from():
    """log p of the drawn token after temperature and the top-k/top-p cut, worked by hand; greedy: the unscaled one."""
    logits, u = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([0.9])
    nxt, lp = sample_next(logits, 0.5, top_k=2, uniforms=u)  # logits / T = [0, 2, 4, 6]; top 2: p ∝ [e^4, e^6]
    assert nxt.tolist() == [3] and lp.item() == pytest.approx(-math.log(1 + math.exp(-2)), abs=1e-6)
    nxt, lp = sample_next(logits, 0.5, top_k=2, uniforms=torch.tensor([0.1]))  # u < 1/(1 + e²): the second best
    assert nxt.tolist() == [2] and lp.item() == pytest.approx(-math.log(1 + math.exp(2)), abs=1e-6)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # top_p 0.7 keeps 0.5 and 0.3, renormalised to 5/8 and 3/8
    nxt, lp = sample_next(probs.log(), 1.0, top_p=0.7, uniforms=torch.tensor([0.0]))
    assert nxt.tolist() == [1] and lp.item() == pytest.approx(math.log(5 / 8), abs=1e-6)
    nxt, lp = sample_next(logits, 0.0)  # greedy: log softmax of the logits at T = 1, no cut
    assert nxt.tolist() == [3] and lp.item() == pytest.approx(3 - math.log(sum(math.exp(i) for i in range(4))))
    assert lp.dtype == torch.float32 and sample_next(logits.bfloat16(), 0.7)[1].dtype == torch.float32


@pytest.mark.parametrize("top_k", [0, 20])
def test_rollout_logprobs_equal_a_plain_forward_over_the_finished_sequences(top_k):
    """Rollout.logprobs from the cached decode == log softmax of (a full forward's logits / T, cut to the top k) at
    each sampled token; 0 after each row's EOS. The EOS is a token that row 0 samples at step 3 (found in a first run
    with the same seed), so rows stop at different steps."""
    model, T, N = chaotic(), 0.7, 12
    prompts = prompts_of([4, 9, 6, 2], seed=7)
    run = lambda eos: generate(model, prompts, N, eos_id=eos, pad_id=0, temperature=T, top_k=top_k,
                               generator=torch.Generator().manual_seed(0))
    eos = run(NEVER).responses()[0][3]
    ro = run(eos)
    P, mask = ro.prompt_len, ro.response_mask
    assert mask[0].tolist() == [1] * 4 + [0] * (N - 4) and 0 < mask.sum() < mask.numel()  # they stop, not all at once
    with torch.no_grad():
        logits = model(ro.sequences, ro.attention_mask)[:, P - 1:-1].float() / T  # (B, N, V): the next-token logits
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[..., -1:], float("-inf"))
    want = torch.log_softmax(logits, -1).gather(-1, ro.sequences[:, P:, None]).squeeze(-1)  # padding: maybe -inf
    want = torch.where(mask.bool(), want, 0.0)
    torch.testing.assert_close(ro.logprobs, want, atol=1e-5, rtol=1e-5)  # fp32, batch widths differ
    assert (ro.logprobs[mask == 0] == 0).all() and (ro.logprobs[mask == 1] < 0).all()
    assert ro.logprobs.dtype == torch.float32 and not ro.logprobs.is_inference()  # PPO can use it in a loss


def test_top_p_drops_a_token_whose_preceding_mass_equals_top_p():
    # four equal logits: the tokens ranked above each one hold 0, 1/4, 1/2 and 3/4 of the mass, exactly
    kept = lambda top_p: int(filter_logits(torch.zeros(1, 4), top_p=top_p).isfinite().sum())
    assert kept(0.5) == 2  # the third token's preceding mass is exactly 0.5: it is not needed to reach 0.5
    assert kept(0.5001) == 3 and kept(0.25) == 1 and kept(0.2499) == 1 and kept(0.7501) == 4


def test_top_k_and_top_p_keep_the_tokens_transformers_keeps():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.3), (0, 0.9), (10, 0.8), (1, 1.0), (0, 0.5)]:
        want = logits
        if top_k:
            want = transformers.TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = transformers.TopPLogitsWarper(top_p)(None, want)
        got = filter_logits(logits, top_k, top_p)
        assert torch.equal(got.isfinite(), want.isfinite()), (top_k, top_p)
        assert torch.equal(got[got.isfinite()], logits[got.isfinite()])  # kept logits are left as they were
    hf = transformers.TopPLogitsWarper(0.5)(None, torch.zeros(1, 4))  # and the exact boundary case above
    assert int(hf.isfinite().sum()) == 2


def test_uniforms_make_each_row_independent_of_its_batch_mates():
    """generate(uniforms=U): row i's token t comes from U[i, t], so a row sampled in another batch (another rank's
    share in PPO, a different left-pad width) with its row of U gives the same response."""
    model = chaotic()
    prompts = prompts_of([3, 9, 5, 2], seed=6)
    u = torch.rand(4, 12, generator=torch.Generator().manual_seed(0))
    full = generate(model, prompts, 12, eos_id=NEVER, pad_id=0, temperature=1.0, uniforms=u).responses()
    for rows in ([0, 2], [3], [1, 3]):
        part = generate(model, [prompts[i] for i in rows], 12, NEVER, 0, temperature=1.0, uniforms=u[rows])
        assert part.responses() == [full[i] for i in rows], rows
    assert len({tuple(r) for r in full}) == 4  # sampled, not the same text for all
    other = generate(model, prompts, 12, eos_id=NEVER, pad_id=0, temperature=1.0, uniforms=u.flip(0)).responses()
    assert other != full  # the uniforms decide the sample

def test_finished_rows_leave_the_batch_and_every_row_gets_what_it_gets_alone():
    """A row that has ended is dropped from the batch and its KV cache at the next 8-step check; the rows that go
    on must not notice: each equals that row sampled alone (same uniforms), token for token, log-prob for log-prob."""
    model, N = chaotic(), 40
    prompts = prompts_of([3, 9, 5, 2, 7, 4], seed=3)
    u = torch.rand(6, N, generator=torch.Generator().manual_seed(1))
    free = generate(model, prompts, N, NEVER, 0, temperature=1.0, uniforms=u).responses()
    first = {}  # token -> {row: first step}
    for r, toks in enumerate(free):
        for t, x in enumerate(toks):
            first.setdefault(x, {}).setdefault(r, t)
    # a stand-in EOS that ends one row before the first check (step 7) and leaves another running past step 15
    eos = next(x for x, d in first.items() if min(d.values()) < 7 and (len(d) < 6 or max(d.values()) > 15))
    widths = []
    hook = model.register_forward_hook(lambda m, args, kw, out: widths.append(args[0].shape[0]), with_kwargs=True)
    ro = generate(model, prompts, N, eos, 0, temperature=1.0, uniforms=u)
    hook.remove()
    assert min(widths) < 6 and widths[0] == 6  # the batch did shrink after the prefill
    for i, p in enumerate(prompts):
        alone = generate(model, [p], N, eos, 0, temperature=1.0, uniforms=u[i:i + 1])
        assert ro.responses()[i] == alone.responses()[0], i
        torch.testing.assert_close(ro.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


def test_generate_restores_training_mode_and_clears_cache(tiny):
    model, _ = tiny
    model.train()
    generate(model, prompts_of([3]), 4, eos_id=NEVER, pad_id=0, temperature=0)
    assert model.training
    assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)


def test_generate_cli_writes_rows_in_input_order(tmp_path, tiny):
    model, tok = tiny  # hub.load("tiny") is deterministic (seed 0), so the CLI sees the same model
    prompts = ["Hi", [{"role": "system", "content": "S"}, {"role": "user", "content": "a longer prompt here"}],
               "x", "Tell me a story about a dog."]
    src, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    r = run_cli(["-m", "nanoalign.generate", "--model", "tiny", "--prompts", str(src), "--out", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(row) for row in rows] == [{"prompt", "completion"}] * 4
    assert [row["prompt"] for row in rows] == prompts
    expected = generate_texts(model, tok, prompts, max_new_tokens=6, temperature=0.0, batch_size=1)
    assert [row["completion"] for row in rows] == expected
    assert not list(tmp_path.glob("*.tmp"))


def test_generate_cli_bad_prompts_file_is_one_error_line(tmp_path):
    src, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = run_cli(["-m", "nanoalign.generate", "--model", "tiny", "--prompts", str(src), "--out", str(out)])
    assert_user_error(r, f"{src}:2")
    assert not out.exists()


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2
    text = generate_texts(model, tok, ["What is the capital of France?"], max_new_tokens=24, temperature=0.0)[0]
    assert "Paris" in text, text
