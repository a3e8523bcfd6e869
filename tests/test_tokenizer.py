import json
import os

import pytest

from nanoalign import hub
from nanoalign.cli import UserError
from nanoalign.tokenizer import Tokenizer, byte_tokenizer
from test_families import write_tokenizer

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


def save_tokenizer(tok, path):
    """What save_checkpoint writes for the tokenizer: tokenizer.json and the tokenizer_config.json it came with."""
    tok.tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok.config, f)


@pytest.fixture(scope="module")
def hf_tok():
    """transformers' tokenizer loaded from the converted SmolLM2 directory (our tokenizer.json + config)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(hub.cache_dir(), hub.ALIAS))


def hf_template_ids(hf_tok, messages, add_generation_prompt=False, **kwargs):
    enc = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs)
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
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.family) == (259, 2, 2, "chatml")
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
        assert ids[start - len(B("assistant\n")) - 1] == 1  # <|im_start|>
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [ids[e] for e in ends] == [tok.eos_id, tok.eos_id]
    assert [ids[e + 1] for e in ends] == [B("\n")[0]] * 2


def test_tokenizer_save_and_from_dir_roundtrip(tmp_path):
    tok = byte_tokenizer()
    save_tokenizer(tok, tmp_path)
    back = Tokenizer.from_dir(str(tmp_path))
    assert (back.vocab_size, back.eos_id, back.default_system) == (259, 2, None)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.render_chat(MULTI) == tok.render_chat(MULTI)


@pytest.mark.parametrize("template, default", [
    ("smollm2", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("qwen2", "You are a helpful assistant."), ("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                           "assistant."), ("qwen3", None)])
def test_default_system_prompt_is_read_from_the_template_and_inserted_once(tmp_path, template, default):
    write_tokenizer(tmp_path, template)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.default_system == default
    text = tok.decode(tok.render_chat(MULTI)[0], skip_special=False)
    assert text.startswith(f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n" if default else
                           "<|im_start|>user\n")
    own = tok.decode(tok.render_chat(SYS_CONV)[0], skip_special=False)  # an explicit system prompt replaces it
    assert own.count("<|im_start|>system") == 1 and (default is None or default not in own)


def test_saved_byte_tokenizer_matches_transformers_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = byte_tokenizer()
    save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in (SYS_CONV, MULTI):
        assert hf_template_ids(hf, conv) == tok.render_chat(conv)[0]
        assert hf_template_ids(hf, conv[:-1], add_generation_prompt=True) == tok.render_prompt(conv[:-1])


# --- each family's real chat template, against transformers' apply_chat_template ------------------------------
THINK = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nso\n</think>\n\nA2"}]
SPACES = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  Hi there  "},
          {"role": "assistant", "content": "  Hello there. "}]  # Llama 3 trims every turn, Mistral its answers only
CONVS = {"system": SYS_CONV, "multi": MULTI, "system-multi": [SYS_CONV[0]] + MULTI, "one-user": MULTI[:1],
         "think": THINK, "spaces": SPACES}
TARGETS = {  # what render_chat(MULTI)'s mask covers: each answer (as the template writes it) and its end of turn
    "chatml": "4<|im_end|>It is 6.\nDone.<|im_end|>",
    "llama3": "4<|eot_id|>It is 6.\nDone.<|eot_id|>",
    "mistral": "4</s> It is 6.\nDone.</s>",  # " 4" and " It": the answer's leading space is its first token's
}
FAMILY_OF = {"smollm2": "chatml", "qwen2": "chatml", "qwen2.5": "chatml", "qwen3": "chatml", "qwen3-0.6b": "chatml",
             "llama3": "llama3", "llama3.2": "llama3", "mistral-v0.3": "mistral"}
KW = {"date_string": "26 Jul 2024", "enable_thinking": False}  # Llama 3.2 would stamp today; Qwen3's prompt: no reasoning


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """template name -> (our Tokenizer, transformers' tokenizer), both from one directory."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for name in FAMILY_OF:
        d = tmp_path_factory.mktemp(name)
        write_tokenizer(d, name)
        out[name] = Tokenizer.from_dir(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))
    return out


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("template", FAMILY_OF)
def test_render_matches_transformers_apply_chat_template(family_tokenizers, template, conv):
    """ids of the whole conversation and of the generation prompt; Llama 3.2 stamps today's date unless told one,
    and our prompt is Qwen3's non-thinking one."""
    tok, hf = family_tokenizers[template]
    assert tok.family == FAMILY_OF[template]
    conv = CONVS[conv]
    assert tok.render_chat(conv)[0] == hf_template_ids(hf, conv, **KW)
    prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
    assert tok.render_prompt(prompt) == hf_template_ids(hf, prompt, True, **KW)


@pytest.mark.parametrize("conv", ["system", "multi", "system-multi", "spaces"])
@pytest.mark.parametrize("template", FAMILY_OF)
def test_mask_is_what_the_real_template_adds_after_the_prompt(family_tokenizers, template, conv):
    """transformers as the oracle for the mask: the last answer's targets are exactly the tokens the real template
    appends to its generation prompt, through the first end of turn; each earlier answer is one run ending in it."""
    tok, hf = family_tokenizers[template]
    conv = CONVS[conv]
    if template.startswith("mistral") and conv[0]["role"] == "system":  # its template writes a system prompt only
        conv = conv[1:]  # into a final user turn, so a whole conversation has none; its prompt must not have one either
    full, prompt = hf_template_ids(hf, conv, **KW), hf_template_ids(hf, conv[:-1], True, **KW)
    assert full[:len(prompt)] == prompt
    n = full.index(tok.eos_id, len(prompt)) + 1 - len(prompt)  # the answer's tokens and its end of turn
    ids, mask = tok.render_chat(conv)
    assert ids == full and mask[len(prompt):] == [1] * n + [0] * (len(full) - len(prompt) - n)
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [ids[i] for i in ends] == [tok.eos_id] * sum(m["role"] == "assistant" for m in conv)


@pytest.mark.parametrize("template", FAMILY_OF)
def test_mask_covers_exactly_each_answer_and_its_end_of_turn(family_tokenizers, template):
    tok, _ = family_tokenizers[template]
    ids, mask = tok.render_chat(MULTI)
    got = masked_text(tok, ids, mask)
    assert got == TARGETS[FAMILY_OF[template]], got
    # and the generation prompt is a prefix of the rendered conversation: training and sampling see one context
    assert tok.render_prompt(MULTI[:-1]) == ids[:len(tok.render_prompt(MULTI[:-1]))]


def test_qwen3_thinking_tags_are_context_never_targets(family_tokenizers):
    tok, _ = family_tokenizers["qwen3"]
    ids, mask = tok.render_chat(THINK)
    text = tok.decode(ids, skip_special=False)
    assert "hmm" not in text  # reasoning before the last user turn is dropped, as Qwen3's template does
    assert text.endswith("<|im_start|>assistant\n<think>\nso\n</think>\n\nA2<|im_end|>\n")
    assert masked_text(tok, ids, mask) == "A1<|im_end|>A2<|im_end|>"
    plain, plain_mask = tok.render_chat(MULTI)
    assert tok.decode(plain, skip_special=False).endswith("assistant\n<think>\n\n</think>\n\nIt is 6.\nDone."
                                                          "<|im_end|>\n")
    assert "think>" not in masked_text(tok, plain, plain_mask)
    assert tok.decode(tok.render_prompt(MULTI[:1]), skip_special=False).endswith("<think>\n\n</think>\n\n")


def test_llama3_2_uses_the_templates_fixed_date_and_its_system_header(family_tokenizers):
    tok, _ = family_tokenizers["llama3.2"]
    text = tok.decode(tok.render_chat(SYS_CONV)[0], skip_special=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                           "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user")
    assert tok.decode(family_tokenizers["llama3"][0].render_prompt("x"), skip_special=False) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|><|start_header_id|>assistant" \
        "<|end_header_id|>\n\n"  # Llama 3.0: no system header at all


def test_mistral_system_prompt_joins_the_last_user_turn_and_turns_must_alternate(family_tokenizers):
    tok, hf = family_tokenizers["mistral-v0.3"]
    prompt = tok.decode(tok.render_prompt([SYS_CONV[0]] + MULTI[:3]), skip_special=False)
    assert prompt.endswith("[/INST] 4</s>[INST] Be brief.\n\nAnd 3+3?[/INST]") and prompt.count("Be brief.") == 1
    whole = [SYS_CONV[0]] + MULTI  # ends in an answer: the template writes the system prompt nowhere
    assert tok.render_chat(whole) == tok.render_chat(MULTI) and hf_template_ids(hf, whole) == tok.render_chat(MULTI)[0]
    for bad in ([MULTI[0], MULTI[0]], [MULTI[1]], MULTI[:1] + [SYS_CONV[0]]):
        with pytest.raises(UserError, match="in turn"):  # bad data: one line, exit 2, never a traceback
            tok.render_chat(bad)
        with pytest.raises(Exception, match="alternate|roles"):  # the template itself refuses them too
            hf_template_ids(hf, bad)


@pytest.mark.parametrize("template, why", [
    ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>{% endfor %}", "gemma"),
    ("{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}", "mistral v0.1"),
])
def test_an_unknown_template_names_the_supported_families(tmp_path, template, why):
    write_tokenizer(tmp_path, "mistral-v0.3")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    with pytest.raises(UserError) as e:
        Tokenizer.from_dir(str(tmp_path))
    assert str(e.value) == f"{tmp_path}/tokenizer_config.json: chat_template not recognised (supported: ChatML " \
                           "(SmolLM2, Qwen2/2.5/3), Llama 3.x, Mistral v0.3)", why


# --- SmolLM2's tokenizer (real model) ----------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_roundtrips_varied_text(smollm2):
    _, tok = smollm2
    assert tok.vocab_size == 49152 and (tok.eos_id, tok.pad_id) == (2, 2)
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
def test_smollm2_prefs_response_opening_with_spaces_is_tokenized_apart_from_its_prompt(smollm2):
    """A sampled response can open with spaces; tokenized at once with its prompt, BPE merges them with the
    assistant header's newline ("Ċ" + "ĠĠ" -> "ĊĠĠ"), and the prompt's ids are no longer a prefix."""
    from nanoalign.data import tokenize_prefs
    _, tok = smollm2
    user, reply = [{"role": "user", "content": "Hi"}], lambda t: [{"role": "assistant", "content": t}]
    row = {"prompt": user, "chosen": reply("   Stars shine."), "rejected": reply("Stars shine.")}
    p = tok.render_prompt(user)
    whole, _ = tok.render_chat(user + row["chosen"])
    assert whole[:len(p)] != p and tok.tok.id_to_token(whole[len(p) - 1]).startswith("ĊĠ")
    e = tokenize_prefs(tok, [row], 64)[0]
    assert e["prompt"] == p and e["chosen"] == tok.encode("   Stars shine.") + [tok.eos_id] and all(e["chosen_mask"])
    assert p + e["rejected"] == tok.render_chat(user + row["rejected"])[0][:-1]  # the usual path: at once, no "\n"


@pytest.mark.slow
def test_smollm2_inserts_default_system_prompt_once(smollm2):
    _, tok = smollm2
    ids, mask = tok.render_chat(MULTI)
    text = tok.decode(ids, skip_special=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                           "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert text.count("<|im_start|>system") == 1 and ids.count(1) == 5  # one <|im_start|> per turn
    assert ids[1] != 1  # no double <|im_start|>
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
