"""SFT data: readers' error messages, chat-template loss masks (hand-computed with the byte tokenizer), padding by
position, the --max-len policy, and packing (same per-document loss, no attention across documents)."""
import json

import pytest
import torch

from nanoalign.cli import UserError
from nanoalign.data import collate_sft, read_prefs, read_prompts, read_sft, tokenize_sft
from nanoalign.packing import collate_packed, pack_sft
from nanoalign.logprobs import token_logprobs
from nanoalign.tokenizer import byte_tokenizer

START, END = 1, 2  # <|im_start|>, <|im_end|> in the byte tokenizer; pad == END


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; 2 spinning threads are slower than 1 here
    yield
    torch.set_num_threads(n)


def b(text: str) -> list[int]:
    """Byte tokenizer ids by hand: 3 specials, then byte value + 3."""
    return [3 + c for c in text.encode()]


def turn(role: str, content: str, train: bool):
    """(ids, mask) of one ChatML turn: content and <|im_end|> are targets for the assistant, never the '\\n'."""
    head = [START] + b(f"{role}\n")
    body = b(content) + [END]
    return head + body + b("\n"), [0] * len(head) + [int(train)] * len(body) + [0]


def conv(*turns):
    msgs = [{"role": r, "content": c} for r, c in turns]
    ids, mask = [], []
    for r, c in turns:
        i, m = turn(r, c, r == "assistant")
        ids, mask = ids + i, mask + m
    return msgs, ids, mask


def write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_label_mask_system_and_multi_turn_by_hand(tmp_path):
    msgs, ids, mask = conv(("system", "Be kind."), ("user", "hi"), ("assistant", "yo"), ("user", "ok?"),
                           ("assistant", "ok!"))
    path = write(tmp_path, [{"messages": msgs}])
    [(got_ids, got_mask)] = tokenize_sft(byte_tokenizer(), read_sft(path), max_len=512)
    assert got_ids == ids
    assert got_mask == mask
    # the targets are exactly the two answers, each with its closing <|im_end|> (the model must learn to stop)
    targets = [t for t, m in zip(ids, mask) if m]
    assert targets == b("yo") + [END] + b("ok!") + [END]
    # the "\n" after each <|im_end|> and every prompt token are out of the loss
    ends = [i for i, t in enumerate(ids) if t == END]
    assert [mask[i] for i in ends] == [0, 0, 1, 0, 1]
    assert all(mask[i + 1] == 0 for i in ends)
    assert ids.count(START) == 5  # one per turn: no duplicated system prompt, no extra BOS


def test_prompt_completion_row_equals_messages_row(tmp_path):
    path = write(tmp_path, [{"prompt": "hi", "completion": "yo"},
                            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    a, c = tokenize_sft(byte_tokenizer(), read_sft(path), max_len=512)
    assert a == c


def test_train_on_prompt_masks_everything_but_the_first_token(tmp_path):
    msgs, ids, _ = conv(("user", "hi"), ("assistant", "yo"))
    [(_, mask)] = tokenize_sft(byte_tokenizer(), read_sft(write(tmp_path, [{"messages": msgs}])), 512,
                               train_on_prompt=True)
    assert mask == [0] + [1] * (len(ids) - 1)


def test_collate_pads_by_position_and_keeps_eos_in_the_loss():
    _, ids1, m1 = conv(("user", "a"), ("assistant", "b"))
    _, ids2, m2 = conv(("user", "a longer question"), ("assistant", "b"))
    tok = byte_tokenizer()
    assert tok.pad_id == tok.eos_id == END  # as SmolLM2: padding cannot be told from EOS by its id
    batch = collate_sft([(ids1, m1), (ids2, m2)], pad_id=tok.pad_id)
    n1, T = len(ids1), len(ids2)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (2, T)
    assert batch["input_ids"][0, n1:].tolist() == [END] * (T - n1)  # padding has the EOS id ...
    assert batch["attention_mask"][0].tolist() == [1] * n1 + [0] * (T - n1)  # ... but is masked by position
    assert batch["loss_mask"][0].tolist() == m1 + [0] * (T - n1)
    # the closing <|im_end|> of the answer (same id as padding) is a target
    eos_at = n1 - 2  # ..., "b", <|im_end|>, "\n"
    assert batch["input_ids"][0, eos_at] == END and batch["loss_mask"][0, eos_at] == 1
    assert int(batch["loss_mask"][0].sum()) == 2  # "b" and <|im_end|>


def test_padding_does_not_change_the_loss(tiny):
    model, _ = tiny
    _, ids1, m1 = conv(("user", "a"), ("assistant", "bc"))
    _, ids2, m2 = conv(("user", "a much longer question"), ("assistant", "b"))
    alone = collate_sft([(ids1, m1)], pad_id=END)
    batch = collate_sft([(ids1, m1), (ids2, m2)], pad_id=END, multiple_of=64)
    assert batch["input_ids"].shape[1] == 64  # bucketed for torch.compile
    lp_alone = token_logprobs(model, alone["input_ids"], alone["attention_mask"], alone["loss_mask"])
    lp_batch = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.testing.assert_close(lp_batch[0, :len(ids1) - 1], lp_alone[0], atol=1e-5, rtol=0)
    assert (lp_batch[0, len(ids1) - 1:] == 0).all()
    assert (lp_alone[0] != 0).sum() == 3  # "b", "c", <|im_end|>


def test_pack_keeps_documents_whole_and_under_max_len():
    docs = [([5] * n, [0] + [1] * (n - 1)) for n in (30, 50, 20, 60, 10, 40)]
    rows = pack_sft(docs, max_len=64)
    assert sorted(id(d) for r in rows for d in r) == sorted(id(d) for d in docs)
    assert all(sum(len(d[0]) for d in r) <= 64 for r in rows)
    assert len(rows) == 4  # first fit: [30, 20, 10], [50], [60], [40]
    batch = collate_packed(rows[:1], pad_id=END)
    seg = [0] * 30 + [1] * 20 + [2] * 10
    allowed = torch.tensor([[s >= t and seg[s] == seg[t] for t in range(60)] for s in range(60)])
    assert torch.equal(batch["attention_mask"][0, 0], allowed)  # causal, and within a document only
    assert [i for i, m in enumerate(batch["loss_mask"][0].tolist()) if m == 0] == [0, 30, 50]  # no doc's first token
    assert batch["position_ids"][0].tolist() == list(range(30)) + list(range(20)) + list(range(10))


def _three_docs():
    return [conv(("user", "hi"), ("assistant", "hello there"))[1:],
            conv(("system", "S"), ("user", "2+2?"), ("assistant", "4"))[1:],
            conv(("user", "name a color"), ("assistant", "red"))[1:]]


def test_packed_and_unpacked_give_the_same_per_document_loss(tiny):
    model, _ = tiny
    docs = _three_docs()
    packed = collate_packed(pack_sft(docs, max_len=512), pad_id=END, multiple_of=64)
    assert packed["input_ids"].shape == (1, 128)  # one row, padded to a multiple of 64
    lp = token_logprobs(model, packed["input_ids"], packed["attention_mask"], packed["loss_mask"],
                        position_ids=packed["position_ids"])[0]
    start = 0
    for ids, mask in docs:
        one = collate_sft([(ids, mask)], pad_id=END)
        ref = token_logprobs(model, one["input_ids"], one["attention_mask"], one["loss_mask"])[0]
        torch.testing.assert_close(lp[start:start + len(ids) - 1], ref, atol=1e-5, rtol=0)
        start += len(ids)
    # and the global token mean (what SFT minimises) is the same
    unpacked = collate_sft(docs, pad_id=END)
    ref_all = token_logprobs(model, unpacked["input_ids"], unpacked["attention_mask"], unpacked["loss_mask"])
    mean_packed = float(lp.detach().sum() / packed["loss_mask"].sum())
    assert abs(mean_packed - float(ref_all.detach().sum() / unpacked["loss_mask"].sum())) < 1e-5


def test_no_attention_across_document_boundaries(tiny):
    model, _ = tiny
    docs = _three_docs()
    changed = [([d[0][0]] + [9] * (len(d[0]) - 1), d[1]) if i == 0 else d for i, d in enumerate(docs)]
    out = []
    for ds in (docs, changed):
        p = collate_packed([ds], pad_id=END)
        h = model(p["input_ids"], p["attention_mask"], p["position_ids"], return_hidden=True)[0]
        h_plain = model(p["input_ids"], return_hidden=True)[0]  # one long document
        out.append((h, h_plain))
    n0 = len(docs[0][0])
    torch.testing.assert_close(out[0][0][n0:], out[1][0][n0:], atol=1e-6, rtol=0)  # later docs can't see doc 0
    assert (out[0][1][n0:] - out[1][1][n0:]).abs().max() > 1e-3  # without the packed mask they would


BAD = [  # (file bytes, line in the message or None, what the message says)
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [}\n',
     2, "malformed JSON"),
    (b'{"text": "hello"}\n', 1, "missing field 'messages'"),
    (b'{"messages": "hello"}\n', 1, "must be a non-empty list"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}\n', 1, "must be a string"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}\n', 1, "lacks 'role' or 'content'"),
    (b'{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', 1,
     "unknown role 'bot'"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', 1, "no assistant turn"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     3, "not valid UTF-8"),
    (b"", None, "empty file"),
    (b"\n  \n", None, "empty file"),
    (b'[{"prompt": "a", "completion": "b"}]\n', 1, "JSON array"),
    (b'\n \n[{"prompt": "a", "completion": "b"}]\n', 3, "JSON array"),  # blank lines first: the line it opens on
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl', 2, "truncated last line"),
    (b'{"prompt": "a", "completion": "b"}\n["a", "b"]\n', 2, "expected a JSON object"),
    (b'{"prompt": "a", "completion": 3}\n', 1, "'completion' must be a string"),
    (b'{"prompt": "a"}\n', 1, "missing field 'completion'"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n', 1, "preference file"),
]


@pytest.mark.parametrize("raw,line,what", BAD, ids=[w for _, _, w in BAD])
def test_malformed_input_is_a_user_error_naming_file_and_line(tmp_path, raw, line, what):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(raw)
    with pytest.raises(UserError) as e:
        read_sft(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: " if line else f"{p}: "), msg
    assert what in msg and "\n" not in msg


def test_each_reader_hints_at_the_script_a_file_of_another_kind_is_for(tmp_path):
    sft = write(tmp_path, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(UserError) as e:
        read_prefs(sft)
    assert str(e.value) == (f"{sft}:1: missing field 'chosen' (expected a preference row: prompt, chosen, rejected) "
                            "(this looks like an SFT file; use train_sft.py)")
    prefs = write(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}], "p.jsonl")
    with pytest.raises(UserError, match=r"p.jsonl:1: missing field 'messages' \(this looks like a preference file"):
        read_sft(prefs)
    prompts = write(tmp_path, [{"prompt": "a"}], "q.jsonl")
    with pytest.raises(UserError) as e:  # a prompts file is no SFT file either: no hint
        read_prefs(prompts)
    assert "missing field 'chosen'" in str(e.value) and "looks like" not in str(e.value)


def test_no_file_given_names_the_flag():
    with pytest.raises(UserError, match=r"^--data is required"):
        read_sft("")
    with pytest.raises(UserError, match=r"^--eval-data is required"):
        read_prefs("", "--eval-data")
    with pytest.raises(UserError, match=r"^--prompts is required"):
        read_prompts("")


def test_missing_file_and_byte_order_mark(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_sft(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')  # Windows editors write a BOM
    assert read_sft(str(p))[0]["messages"][1] == {"role": "assistant", "content": "b"}


def test_max_len_drop_and_left_truncation(tmp_path, capsys):
    tok = byte_tokenizer()
    rows = read_sft(write(tmp_path, [{"prompt": "q", "completion": "short"},
                                     {"prompt": "x" * 100, "completion": "answer"},  # long prompt
                                     {"prompt": "q", "completion": "y" * 100}]))  # long answer
    full = [tok.render_chat(r["messages"]) for r in rows]
    max_len = 60
    assert len(full[0][0]) <= max_len < len(full[1][0])

    kept = tokenize_sft(tok, rows, max_len, truncate="drop", path="d.jsonl")
    assert [k[0] for k in kept] == [full[0][0]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d.jsonl: dropped 2 rows longer than --max-len 60" in err

    kept = tokenize_sft(tok, rows, max_len, truncate="left", path="d.jsonl")
    assert len(kept) == 2  # the long answer can't be saved by cutting the prompt
    ids, mask = kept[1]
    assert len(ids) == max_len and ids == full[1][0][-max_len:] and mask[1:] == full[1][1][-max_len + 1:]
    assert [t for t, m in zip(ids, mask) if m] == b("answer") + [END]  # the whole answer is still trained on
    assert "dropped 1 rows longer than --max-len 60" in capsys.readouterr().err

    with pytest.raises(UserError, match=r"d.jsonl: no usable rows .* 3 longer than --max-len 10"):
        tokenize_sft(tok, rows, 10, path="d.jsonl")
    with pytest.raises(UserError, match="--truncate"):
        tokenize_sft(tok, rows, 60, truncate="right")
