"""Tokenizer wrapper and the ChatML chat template as a Python function (nanochat style).

SmolLM2 renders a conversation as
    <|im_start|>system\n{content}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n...
and, like its Jinja template, inserts a default system prompt when the conversation has none. The loss mask covers
each assistant turn's content *and* its closing <|im_end|>: a model that never sees EOS in the loss never stops.
"""
import json
import os
import re

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .cli import UserError

ROLES = ("system", "user", "assistant")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def chatml_template(default_system: str | None) -> str:
    """The Jinja chat template that `render_chat` implements (saved for transformers users)."""
    head = ""
    if default_system:
        head = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + default_system
                + "<|im_end|>\n' }}{% endif %}")
    return ("{% for message in messages %}" + head + "{{'<|im_start|>' + message['role'] + '\n' + message['content']"
            " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")


def default_system_from_template(template: str | None) -> str | None:
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template or "")
    return m.group(1) if m else None


class Tokenizer:
    def __init__(self, tok: HFTokenizer, default_system: str | None = None, model_max_length: int = 8192):
        self.tok = tok
        self.default_system = default_system
        self.model_max_length = model_max_length
        ids = {s: tok.token_to_id(s) for s in SPECIALS}
        if ids["<|im_start|>"] is None or ids["<|im_end|>"] is None:
            raise UserError("tokenizer has no <|im_start|>/<|im_end|> tokens (ChatML is required)")
        self.bos_id, self.eos_id = ids["<|im_start|>"], ids["<|im_end|>"]
        self.pad_id = self.eos_id  # as SmolLM2: pad == EOS, so padding is masked by position, never by id
        self.vocab_size = tok.get_vocab_size()

    # --- text ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # --- chat template ------------------------------------------------------------------------------------------
    def _render(self, messages, add_generation_prompt: bool):
        """The rendered string, and the character spans the loss mask covers."""
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a non-empty list of message objects")
        parts, spans, pos = [], [], 0
        if messages[0].get("role") != "system" and self.default_system:
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
            pos = len(parts[0])
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"content of a {role} turn must be a string")
            head = f"<|im_start|>{role}\n"
            if role == "assistant":  # content + <|im_end|> is in the loss, the trailing "\n" is not
                spans.append((pos + len(head), pos + len(head) + len(content) + len("<|im_end|>")))
            piece = f"{head}{content}<|im_end|>\n"
            parts.append(piece)
            pos += len(piece)
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts), spans

    def render_chat(self, messages) -> tuple[list[int], list[int]]:
        """Whole conversation -> (ids, mask); mask is 1 on assistant content and its closing <|im_end|>."""
        text, spans = self._render(messages, add_generation_prompt=False)
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
        return enc.ids, mask

    def render_prompt(self, messages) -> list[int]:
        """Conversation so far + `<|im_start|>assistant\\n`: what generation continues from."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tok.encode(self._render(messages, add_generation_prompt=True)[0], add_special_tokens=False).ids

    # --- files --------------------------------------------------------------------------------------------------
    def save(self, out_dir: str, pad_token: str = "<|im_end|>"):
        self.tok.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chatml_template(self.default_system),
            "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": pad_token,
            "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
            "model_max_length": self.model_max_length, "clean_up_tokenization_spaces": False,
        }
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj, tc = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(tj):
            raise UserError(f"{tj}: missing tokenizer file")
        try:
            tok = HFTokenizer.from_file(tj)
        except Exception as e:
            raise UserError(f"{tj}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})")
        template, max_len = None, 8192
        if os.path.exists(tc):
            try:
                with open(tc) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"{tc}: not valid JSON ({e})")
            template, max_len = cfg.get("chat_template"), cfg.get("model_max_length", 8192)
            if not isinstance(max_len, int) or max_len > 10**7:
                max_len = 8192
        try:
            return cls(tok, default_system_from_template(template), max_len)
        except UserError as e:  # name the file
            raise UserError(f"{tj}: {e}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """A 259-token byte-level ChatML tokenizer for the random-init presets: 3 specials, then one token per byte."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = len(SPECIALS) + b
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return Tokenizer(tok, default_system=None, model_max_length=1024)


def gguf_tokenizer(tokens: list[str], merges: list[str], specials: list[str], template: str | None) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer.json from a GGUF's vocabulary and merges (SmolLM2 / GPT-2 style)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None))
    # SmolLM2 splits digits individually, then applies GPT-2's byte-level regex split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return Tokenizer(tok, default_system_from_template(template))
