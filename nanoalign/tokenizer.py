"""Tokenizer wrapper and the model's own chat template (tokenizer_config.json), written as Python functions.

The template is recognised by its special tokens and rendered by hand, not by a Jinja engine, so that the renderer
knows which tokens are the answer's; the ids equal transformers' apply_chat_template on each family's real template
(tested). render_chat's mask covers each answer *and* its end-of-turn token: a model never trained on EOS never stops.
- ChatML (SmolLM2, Qwen2/2.5, Qwen3): <|im_start|>role\\n...<|im_end|>\\n, with the template's default system prompt.
  Qwen3's <think>...</think> block before the last answer is context, never a target; render_prompt opens it empty,
  as Qwen's enable_thinking=False does (nanoalign trains answers, not reasoning).
- Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>. 3.1+ open with a dated system header, at the
  template's fixed date (3.2's would stamp today's), so that a run's tokens never depend on the day.
- Mistral v0.3: <s>[INST] user[/INST] answer</s>. Its template puts a system prompt in a final user turn only.
"""
import json
import os
import pathlib
import re

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from .cli import UserError, check

MARKERS = {"<|im_start|>": "chatml", "<|start_header_id|>": "llama3", "[INST]": "mistral"}  # template -> family
SUPPORTED = "ChatML (SmolLM2, Qwen2/2.5/3), Llama 3.x, Mistral v0.3"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict):
        """tok: the model's tokenizer.json; config: its tokenizer_config.json (chat_template, bos/eos tokens)."""
        self.tok, self.config, self.vocab_size = tok, config, tok.get_vocab_size()
        t = config.get("chat_template") or ""
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), "")
        t = t if isinstance(t, str) else ""
        self.family = next((f for marker, f in MARKERS.items() if marker in t), None if t else "chatml")
        check(self.family is not None and " [/INST]" not in t,  # (Mistral v0.1/v0.2 space their [/INST] otherwise)
              f"chat_template not recognised (supported: {SUPPORTED})")
        self.default_system = next(iter(re.findall(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", t)), None)
        self.thinking = "<think>" in t  # Qwen3
        dates = re.findall(r'date_string = "([^"]+)"', t) + ["26 Jul 2024"]  # Llama 3.1+: the template's fixed date
        self.date = dates[0] if "Cutting Knowledge Date" in t else None
        # tokenizer_config.json writes a special token as a string or as {"content": ...}
        self.bos, eos = (x.get("content") if isinstance(x, dict) else x for x in (config.get("bos_token"),
                                                                                   config.get("eos_token")))
        self.end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.family, eos)
        needs = {"chatml": ["<|im_start|>"], "llama3": [self.bos, "<|start_header_id|>"], "mistral": [self.bos]}
        for s in needs[self.family] + [self.end]:
            check(isinstance(s, str) and tok.token_to_id(s) is not None, f"tokenizer has no {s} token, which the "
                  f"{self.family} chat template needs" + ("" if t else " (tokenizer_config.json has no chat_template)"))
        self.eos_id = self.pad_id = tok.token_to_id(self.end)  # pad == end of turn: padding is masked by position

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def _chatml(self, msgs, generation):  # each family renders (text, is_target) pieces
        out = [(f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False)] * bool(
            self.default_system and msgs[0]["role"] != "system")
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=len(msgs) - 1)
        for i, m in enumerate(msgs):
            head, text = f"<|im_start|>{m['role']}\n", m["content"]
            if m["role"] != "assistant":
                out.append((f"{head}{text}<|im_end|>\n", False))
                continue
            if self.thinking:  # Qwen3: reasoning is kept only after the last user turn, in a block before the answer
                reasoning = ""
                if "</think>" in text:
                    reasoning = text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    text = text.split("</think>")[-1].lstrip("\n")
                if i > last_user and (i == len(msgs) - 1 or reasoning):
                    head, text = head + "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n", text.lstrip("\n")
            out += [(head, False), (text + "<|im_end|>", True), ("\n", False)]  # the "\n" after <|im_end|> is no target
        return out + [("<|im_start|>assistant\n" + "<think>\n\n</think>\n\n" * self.thinking, False)] * generation

    def _llama3(self, msgs, generation):
        out = [(self.bos, False)]
        if self.date:  # 3.1+: a system header always, holding the first system message (if any)
            system, msgs = (msgs[0]["content"].strip(), msgs[1:]) if msgs[0]["role"] == "system" else ("", msgs)
            out.append(("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                        f"Today Date: {self.date}\n\n{system}<|eot_id|>", False))
        for m in msgs:
            out += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False),
                    (m["content"].strip() + "<|eot_id|>", m["role"] == "assistant")]
        return out + [("<|start_header_id|>assistant<|end_header_id|>\n\n", False)] * generation

    def _mistral(self, msgs, generation):  # no generation header: a prompt ends with [/INST]
        system, msgs = (msgs[0]["content"], msgs[1:]) if msgs[0]["role"] == "system" else (None, msgs)
        out = [(self.bos, False)]
        for i, m in enumerate(msgs):  # the template itself raises on any other order
            check(m["role"] == ("user", "assistant")[i % 2],
                  "Mistral's chat template wants user and assistant turns in turn (after one system turn)")
            if m["role"] == "user":
                system_part = f"{system}\n\n" if system is not None and i == len(msgs) - 1 else ""
                out.append((f"[INST] {system_part}{m['content']}[/INST]", False))
            else:
                out.append((" " + m["content"].strip() + self.end, True))
        return out

    def render_chat(self, messages, apart: bool = False, generation: bool = False) -> tuple[list[int], list[int]]:
        """Whole conversation -> (ids, mask); mask is 1 on assistant content and its end-of-turn token. The pieces are
        joined and tokenized at once, a token a target if it starts in a target; apart: each piece tokenized on its
        own, as a sampled response follows its prompt's ids. generation: + the assistant's header (render_prompt)."""
        pieces = getattr(self, "_" + self.family)(messages, generation)
        if apart:
            ids = [self.encode(piece) for piece, _ in pieces]
            return sum(ids, []), [int(t) for e, (_, t) in zip(ids, pieces) for _ in e]
        text, spans = "", []
        for piece, target in pieces:
            spans += [(len(text), len(text) + len(piece))] * target
            text += piece
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]

    def render_prompt(self, messages) -> list[int]:
        """Conversation so far + the assistant's header: what generation continues from. A string is one user turn."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.render_chat(messages, generation=True)[0]

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj, tc = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        check(os.path.exists(tj), f"{tj}: missing tokenizer file")
        try:
            tok = HFTokenizer.from_file(tj)
        except Exception as e:
            raise UserError(f"{tj}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})")
        config, jinja = {}, os.path.join(path, "chat_template.jinja")  # where newer transformers save the template
        try:
            if os.path.exists(tc):
                config = json.loads(pathlib.Path(tc).read_text())
            if isinstance(config, dict) and not config.get("chat_template") and os.path.exists(jinja):
                config["chat_template"] = pathlib.Path(jinja).read_text()
        except (OSError, ValueError) as e:
            raise UserError(f"{tc}: not valid JSON ({e})")
        check(isinstance(config, dict), f"{tc}: not a JSON object")
        try:
            return cls(tok, config)
        except UserError as e:  # name the file
            raise UserError(f"{tc if str(e).startswith('chat_template') else tj}: {e}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE: printable bytes stand for
    themselves, the others (controls, space, ...) for chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_tokenizer() -> Tokenizer:
    """A 259-token byte-level ChatML tokenizer for the random-init presets: 3 specials, then one token per byte."""
    table = bytes_to_unicode()
    return bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [table[b] for b in range(256)],
                         [3] * 3 + [1] * 256, [], "smollm", CHATML, bos=1, eos=2)


# llama.cpp's names for the pre-tokenizer regexes of byte-level BPE vocabularies (GGUF's tokenizer.ggml.pre)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
PRE = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "qwen2": [pre_tokenizers.Split(Regex(SPLIT % ""),
       "isolated")], "llama-bpe": [pre_tokenizers.Split(Regex(SPLIT % "{1,3}"), "isolated")]}


def bpe_tokenizer(tokens, types, merges, pre: str, template: str | None, bos: int, eos: int) -> Tokenizer:
    """A byte-level BPE tokenizer (SmolLM2, Qwen2/3, Llama 3) from a vocabulary, GGUF token types (3: control, 4:
    user-defined, e.g. Qwen3's <think>), merges ("a b") and the name of the pre-tokenizer, as a GGUF file holds them."""
    check(pre in PRE, f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE)})")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                                 ignore_merges=pre == "llama-bpe"))  # Llama 3 takes a word in the vocabulary whole
    if pre == "qwen2":  # Qwen normalises text to NFC first
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(PRE[pre] + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=pre == "smollm")])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([t for t, ty in zip(tokens, types) if ty == 4])
    return Tokenizer(tok, {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template or CHATML,
                           "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[eos],
                           "add_bos_token": False, "clean_up_tokenization_spaces": False})
