import os

import pytest

from nanoalign import hub
from nanoalign.tokenizer import Tokenizer, byte_tokenizer, chatml_template, default_system_from_template

TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café",
    "日本語のテキスト and 中文",
    "emoji: 🎉🚀 👩‍👩‍👧 flags 🇫🇷",
    "digits 0123456789 3.14159 1,000,000 2024-11-28",
    "   leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows",
    "tabs\t\tand\u00a0nbsp and zero\u200bwidth",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
SYS_CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
MULTI = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6.\nDone."}]


def B(s: str) -> list[int]:
    """Byte tokenizer ids by hand: 3 specials first, then one token per UTF-8 byte."""
    return [b + 3 for b in s.encode("utf-8")]


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)


@pytest.fixture(scope="module")
def hf_tok():
    """transformers' tokenizer loaded from the converted SmolLM2 directory (our tokenizer.json + config)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(hub.cache_dir(), hub.ALIAS))


def hf_template_ids(hf_tok, messages, add_generation_prompt=False):
    enc = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)  # transformers 5 gives a BatchEncoding


# --- byte-level tokenizer (tiny preset) -----------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_roundtrips_and_is_one_token_per_byte(text):
    tok = hub.load("tiny")[1]
    ids = tok.encode(text)
    assert ids == B(text)
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials_and_sizes():
    tok = byte_tokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 1, 2, 2)
    assert tok.tok.id_to_token(0) == "<|endoftext|>" and tok.default_system is None
    assert tok.decode([1, *B("a"), 2]) == "a"  # specials are skipped by default
    assert tok.decode([1, *B("a"), 2], skip_special=False) == "<|im_start|>a<|im_end|>"


def test_byte_chat_template_ids_and_mask_by_hand():
    tok = byte_tokenizer()
    ids, mask = tok.render_chat(SYS_CONV)
    sys_part = [1, *B("system\nBe brief."), 2, *B("\n")]
    user_part = [1, *B("user\nHi there"), 2, *B("\n")]
    head, content, tail = [1, *B("assistant\n")], B("Hello!"), [2, *B("\n")]
    assert ids == sys_part + user_part + head + content + tail
    assert mask == [0] * (len(sys_part) + len(user_part) + len(head)) + [1] * (len(content) + 1) + [0]
    prompt = tok.render_prompt(SYS_CONV[:2])
    assert prompt == sys_part + user_part + head
    assert tok.render_prompt("Hi there") == user_part + head  # a string is one user turn; no default system


def test_byte_mask_covers_each_assistant_turn_exactly_in_multi_turn():
    tok = byte_tokenizer()
    ids, mask = tok.render_chat(MULTI)
    assert masked_text(tok, ids, mask) == "4<|im_end|>It is 6.\nDone.<|im_end|>"
    # the masked positions are exactly the two assistant spans: content + <|im_end|>, never the "\n" after it
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(runs) == 2
    for start in runs:
        assert ids[start - len(B("assistant\n")) - 1] == tok.bos_id
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [ids[e] for e in ends] == [tok.eos_id, tok.eos_id]
    assert [ids[e + 1] for e in ends] == [B("\n")[0]] * 2


def test_render_chat_rejects_bad_messages():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="role"):
        tok.render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="string"):
        tok.render_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError):
        tok.render_chat([])


def test_tokenizer_save_and_from_dir_roundtrip(tmp_path):
    tok = byte_tokenizer()
    tok.save(str(tmp_path))
    back = Tokenizer.from_dir(str(tmp_path))
    assert (back.vocab_size, back.bos_id, back.eos_id, back.default_system) == (259, 1, 2, None)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.render_chat(MULTI) == tok.render_chat(MULTI)


def test_default_system_prompt_survives_the_saved_template():
    sysmsg = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system_from_template(chatml_template(sysmsg)) == sysmsg
    assert default_system_from_template(chatml_template(None)) is None
    tok = byte_tokenizer()
    tok.default_system = "Be nice."
    ids, _ = tok.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert ids[:len(B("system\nBe nice.")) + 1] == [1, *B("system\nBe nice.")]
    ids2, _ = tok.render_chat([{"role": "system", "content": "Own."}, {"role": "user", "content": "x"}])
    assert tok.decode(ids2).count("system") == 1 and "Be nice." not in tok.decode(ids2)  # never duplicated


def test_saved_byte_tokenizer_matches_transformers_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = byte_tokenizer()
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in (SYS_CONV, MULTI):
        assert hf_template_ids(hf, conv) == tok.render_chat(conv)[0]
        assert hf_template_ids(hf, conv[:-1], add_generation_prompt=True) == tok.render_prompt(conv[:-1])


# --- SmolLM2's tokenizer (real model) ----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_roundtrips_varied_text(smollm2):
    _, tok = smollm2
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text


@pytest.mark.slow
def test_smollm2_splits_digits_individually(smollm2):
    _, tok = smollm2
    pieces = [tok.tok.id_to_token(i) for i in tok.encode("in 2024 pay 1000")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġpay", "Ġ", "1", "0", "0", "0"]


@pytest.mark.slow
def test_smollm2_chat_template_token_strings_by_hand(smollm2):
    _, tok = smollm2
    ids, mask = tok.render_chat(SYS_CONV)
    expected = ["<|im_start|>", "system", "Ċ", "Be", "Ġbrief", ".", "<|im_end|>", "Ċ",
                "<|im_start|>", "user", "Ċ", "Hi", "Ġthere", "<|im_end|>", "Ċ",
                "<|im_start|>", "ass", "istant", "Ċ", "Hello", "!", "<|im_end|>", "Ċ"]
    assert [tok.tok.id_to_token(i) for i in ids] == expected
    assert mask == [0] * 19 + [1, 1, 1, 0]  # "Hello", "!", "<|im_end|>"; not the trailing newline
    assert ids[0] == 1 and ids.count(1) == 3  # one <|im_start|> per turn: no double BOS


@pytest.mark.slow
def test_smollm2_inserts_default_system_prompt_once(smollm2):
    _, tok = smollm2
    ids, mask = tok.render_chat(MULTI)
    text = tok.decode(ids, skip_special=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                           "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert text.count("<|im_start|>system") == 1 and ids.count(tok.bos_id) == 5
    assert ids[1] != tok.bos_id  # no double BOS
    sys_ids = tok.render_chat(SYS_CONV)[0]
    assert tok.decode(sys_ids).count("SmolLM") == 0  # an explicit system prompt replaces the default


@pytest.mark.slow
def test_smollm2_assistant_mask_is_exact_in_multi_turn(smollm2):
    _, tok = smollm2
    ids, mask = tok.render_chat(MULTI)
    assert masked_text(tok, ids, mask) == "4<|im_end|>It is 6.\nDone.<|im_end|>"
    nl = tok.encode("\n")
    assert len(nl) == 1
    for i, m in enumerate(mask):
        if m and (i + 1 == len(mask) or not mask[i + 1]):  # the end of each masked run
            assert ids[i] == tok.eos_id and ids[i + 1] == nl[0]
    # nothing from the system or user turns is masked
    first = mask.index(1)
    assert tok.decode(ids[:first], skip_special=False).endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@pytest.mark.parametrize("conv", [SYS_CONV, MULTI, MULTI[:1], [{"role": "system", "content": "S"}] + MULTI],
                         ids=["system", "multi", "one-user", "system-multi"])
def test_smollm2_render_matches_transformers_apply_chat_template(smollm2, hf_tok, conv):
    _, tok = smollm2
    assert hf_template_ids(hf_tok, conv) == tok.render_chat(conv)[0]
    prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
    assert hf_template_ids(hf_tok, prompt, add_generation_prompt=True) == tok.render_prompt(prompt)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_reading_the_gguf(smollm2):
    """transformers builds its own tokenizer from the same GGUF: an independent oracle for ours."""
    transformers = pytest.importorskip("transformers")
    _, tok = smollm2
    path = hub.find_smollm2_gguf()
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS + ["x=1000000;y=42", "I'm sure they've 12 apples", " 7 8 99 100"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert tok.encode("<|im_start|>user\n") == hf.encode("<|im_start|>user\n", add_special_tokens=False)
