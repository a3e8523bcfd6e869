"""nanoalign.packing: the prompt-shared pair layout, hand-worked, and one call (pair_logprobs, pair_rewards) that gives
the two-row values and gradients for either layout, whatever the padding and the order of the pairs."""
import pytest
import torch

from nanoalign import hub
from nanoalign.data import read_prefs
from nanoalign.logprobs import last_token_rewards
from nanoalign.lora import apply_lora
from nanoalign.packing import collate_shared, pair_lengths, pair_logprobs, pair_rewards, shared_rows
from nanoalign.data import collate_pairs, tokenize_prefs
from test_dpo import write_prefs

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(tmp_path, tok, n, max_len=128):
    return tokenize_prefs(tok, read_prefs(write_prefs(tmp_path / "p.jsonl", n=n)), max_len, verbose=False)


def test_collate_shared_puts_prompt_chosen_rejected_in_one_row_hand_worked():
    ex = [{"prompt": [10, 11, 12], "chosen": [20, 21], "chosen_mask": [1, 1], "rejected": [30], "rejected_mask": [1]},
          {"prompt": [13], "chosen": [22], "chosen_mask": [1], "rejected": [31, 32, 33], "rejected_mask": [0, 1, 1]}]
    b = collate_shared(ex, 2, 128, multiple_of=4)  # pad id 2, rows rounded up to 8
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 2, 2], [13, 22, 31, 32, 33, 2, 2, 2]]
    # row 0: the chosen tokens (3, 4) see the prompt and each other; the rejected token (5) sees only the prompt
    # and itself; padding sees only itself
    assert b["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]
    # both responses continue from the prompt's end: rejected restarts at position len(prompt)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 0], [0, 1, 1, 2, 3, 0, 0, 0]]
    assert b["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 2, 2, 2, -1, -1, -1]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0, 0, 0]]
    # each response's first token is predicted from the prompt's last token, every other token from the one before
    assert b["prev_index"][0, :6].tolist() == [0, 0, 1, 2, 3, 2]
    assert b["prev_index"][1, :5].tolist() == [0, 0, 0, 2, 3]
    assert b["last_index"].tolist() == [[4, 5], [1, 4]]
    assert [n.tolist() for n in pair_lengths(b)] == [[2.0, 1.0], [1.0, 2.0]]  # response tokens in the loss
    # --max-len cuts each response to max_len - len(prompt), as collate_pairs does
    cut = collate_shared(ex, 2, 4)
    assert cut["input_ids"][0, :5].tolist() == [10, 11, 12, 20, 30] and cut["response_mask"][0].sum() == 2


def test_shared_rows_take_any_number_of_responses():
    s = shared_rows([[1, 2], [3]], [[[4], [5, 6], [7]], [[8, 9], [10], [11]]], pad_id=0)
    assert s["input_ids"].tolist() == [[1, 2, 4, 5, 6, 7], [3, 8, 9, 10, 11, 0]]
    assert s["position_ids"].tolist() == [[0, 1, 2, 2, 3, 2], [0, 1, 2, 1, 1, 0]]
    assert s["prev_index"].tolist() == [[0, 0, 1, 1, 3, 1], [0, 0, 1, 0, 0, 0]]
    assert s["last_index"].tolist() == [[2, 4, 5], [2, 3, 4]]


@pytest.mark.parametrize("max_len", [128, 40])  # 40: some responses are cut
def test_pair_logprobs_shared_rows_equal_two_rows_in_values_and_gradients(tmp_path, max_len):
    model, tok = hub.load("tiny")
    apply_lora(model, 4, 8.0)
    with torch.no_grad():  # a non-zero adapter, so the gradients reach every LoRA matrix
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    ex = pairs(tmp_path, tok, 6, max_len)
    params = [p for p in model.parameters() if p.requires_grad]
    two_rows = collate_pairs(ex, tok.pad_id, max_len)
    shared = collate_shared(ex, tok.pad_id, max_len, multiple_of=8)
    two = pair_logprobs(model, two_rows)
    g_two = torch.autograd.grad(sum(x.sum() for x in two), params)
    one = pair_logprobs(model, shared)
    g_one = torch.autograd.grad(sum(x.sum() for x in one), params)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [x.tolist() for x in pair_lengths(shared)] == [x.tolist() for x in pair_lengths(two_rows)]
    # ... and both are the textbook sum over the (B, T, V) logits of each row alone
    ids, att, resp = (two_rows[k] for k in ("input_ids", "attention_mask", "response_mask"))
    with torch.no_grad():
        lp = model(ids, att)[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(torch.cat(two).detach(), (lp * resp[:, 1:]).sum(-1), atol=1e-4, rtol=1e-5)


def test_pair_logprobs_ignore_extra_padding_and_the_order_of_pairs(tmp_path):
    model, tok = hub.load("tiny")
    ex = pairs(tmp_path, tok, 4)
    order = [2, 0, 3, 1]
    with torch.no_grad():
        for collate in (collate_pairs, collate_shared):
            base = torch.stack(pair_logprobs(model, collate(ex, tok.pad_id, 128)))  # (2, B): chosen, rejected
            padded = torch.stack(pair_logprobs(model, collate(ex, tok.pad_id, 128, multiple_of=96)))
            shuffled = torch.stack(pair_logprobs(model, collate([ex[i] for i in order], tok.pad_id, 128)))
            alone = torch.cat([torch.stack(pair_logprobs(model, collate([e], tok.pad_id, 128))) for e in ex], 1)
            torch.testing.assert_close(padded, base, atol=1e-5, rtol=0)
            torch.testing.assert_close(alone, base, atol=1e-5, rtol=0)
            torch.testing.assert_close(shuffled, base[:, order], atol=1e-5, rtol=0)
    assert [x.tolist() for x in pair_lengths(collate_pairs(ex, tok.pad_id, 128))] == [
        [float(len(e["chosen"])) for e in ex], [float(len(e["rejected"])) for e in ex]]


def test_pair_rewards_read_each_response_at_its_last_token_in_either_layout(tmp_path):
    rm, tok = hub.load("tiny")
    rm.add_score_head(seed=0)
    ex = pairs(tmp_path, tok, 4)
    with torch.no_grad():
        two = pair_rewards(rm, collate_pairs(ex, tok.pad_id, 128, multiple_of=64))
        one = pair_rewards(rm, collate_shared(ex, tok.pad_id, 128, multiple_of=64))
        alone = [last_token_rewards(rm, b["input_ids"], b["attention_mask"])
                 for b in (collate_pairs([e], tok.pad_id, 128) for e in ex)]  # (2,) each: chosen, rejected
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(two, 1), torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert (two[0] - two[1]).abs().min() > 0  # a random head still tells the responses apart
