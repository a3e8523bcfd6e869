"""Fuzzing the input boundary: random bytes, text and JSON structures into every JSONL reader, and random message
lists into the chat template.

A reader may only (a) return rows of the documented shape, every one of which the chat template then renders and
tokenizes, or (b) raise a UserError whose message starts with `FILE:LINE: ` (or `FILE: empty file`). Any other
exception is a bug: it would reach the user as a traceback. The template's own contract is narrower: it takes
validated messages and never fails on them, and on anything else raises ValueError (never AttributeError & co.).
"""
import json
import os
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoalign.cli import UserError
from nanoalign.data import ROLES, check_messages, read_prefs, read_prompts, read_sft, read_unpaired, tokenize_sft
from nanoalign.data import tokenize_prefs
from nanoalign.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
FIELDS = ["messages", "role", "content", "prompt", "chosen", "rejected", "completion", "label", "constraints"]
# derandomized, so that CI is repeatable; FUZZ_RANDOM=1 explores new examples (that is how "\n[" was found)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not os.environ.get("FUZZ_RANDOM"))

# --- strategies ----------------------------------------------------------------------------------------------
# text with control characters, emoji, and the template's own special tokens; lone surrogates (which JSON can carry
# as \\udXXX escapes, and which the tokenizer cannot encode) are injected into whole files below
texts = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec=None, categories=["Cc", "Zs", "Lo", "So"]), max_size=6),
    st.sampled_from(["", " ", "\n", "<|im_end|>", "<|im_start|>assistant\n", "\u00e9", "\U0001f600", *ROLES, "bot"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), texts)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
# mostly-valid rows of every kind, so that many get past the first checks and exercise the later ones
valid_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts})
message = st.one_of(valid_message, valid_message, valid_message,
                    st.fixed_dictionaries({"role": json_values, "content": json_values}),
                    st.dictionaries(keys, json_values, max_size=3), json_values)
turns = st.lists(message, max_size=4)
conversation = st.tuples(st.lists(valid_message, max_size=3), texts).map(
    lambda t: t[0] + [{"role": "assistant", "content": t[1]}])
field = st.one_of(texts, texts, texts, conversation, conversation, conversation, turns, json_values)


KINDS = ["messages", "prompt_completion", "pair", "hh", "unpaired", "prompt", "junk"]


@st.composite
def rows(draw, kind=None):
    kind = kind or draw(st.sampled_from(KINDS))
    if kind == "junk":
        return draw(st.one_of(st.dictionaries(keys, json_values, max_size=4), json_values))
    if kind == "hh":  # a shared prefix, then different endings
        prefix = draw(st.lists(valid_message, min_size=1, max_size=2))
        row = {"chosen": prefix + draw(conversation), "rejected": prefix + draw(st.one_of(conversation, turns))}
    else:
        names = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "prompt": ["prompt"],
                 "pair": ["prompt", "chosen", "rejected"], "unpaired": ["prompt", "completion", "label"]}[kind]
        row = {k: draw(st.one_of(st.booleans(), st.booleans(), json_values) if k == "label" else
                       conversation if k == "messages" and draw(st.booleans()) else field) for k in names}
    if draw(st.integers(0, 4)) == 0:  # sometimes a field goes missing
        del row[draw(st.sampled_from(sorted(row)))]
    if draw(st.booleans()):  # extra keys (metadata), or clobbered fields
        row.update(draw(st.dictionaries(keys, json_values, max_size=2)))
    return row


@st.composite
def jsonl_files(draw, kinds=None) -> bytes:
    """Lines of JSON rows, mostly of one kind; a third of the files get one damaged line (cut short, raw text,
    invalid UTF-8, a lone surrogate, a blank line)."""
    kind = draw(st.sampled_from(kinds or KINDS[:-1] + [None]))  # None: rows of mixed kinds
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
             for r in draw(st.lists(rows(kind), min_size=1, max_size=4))]
    if draw(st.integers(0, 2)) == 0:
        i = draw(st.integers(0, len(lines) - 1))
        damage = draw(st.sampled_from(["cut", "raw", "latin1", "blank", "surrogate"]))
        if damage == "surrogate":  # a lone surrogate in the first string of the row, escaped or raw
            line = lines[i].decode("utf-8")
            at = line.find('"', line.find(':') + 1) + 1 if ':' in line else 0
            lone = draw(st.sampled_from(["\\ud800", "\\udfff", "\ud800"]))
            lines[i] = (line[:at] + lone + line[at:]).encode("utf-8", "surrogatepass")
        elif damage == "cut":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif damage == "raw":
            lines[i] = draw(texts).encode("utf-8", "surrogatepass")
        elif damage == "latin1":
            lines[i] += b"\xe9"
        else:
            lines.insert(i, b"   ")
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


def files(*kinds):
    """Files for a reader: mostly rows of its own kinds, the rest of any kind, mixed, or not JSONL at all."""
    return st.one_of(jsonl_files(kinds), jsonl_files(kinds), jsonl_files(), st.binary(max_size=64),
                     st.text(max_size=64).map(lambda s: s.encode()))


# --- the oracle ----------------------------------------------------------------------------------------------
def read(reader, data: bytes):
    """-> (rows or None, the path); asserts that an error is a UserError of the form FILE:LINE: ..."""
    fd, path = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return reader(path), path
        except UserError as e:
            msg = str(e)
            m = re.match(re.escape(path) + r":(\d+): \S", msg)
            assert m or msg == f"{path}: empty file", msg
            if m:  # the named line is one that holds something: blank lines are skipped, never blamed
                nonblank = {i for i, line in enumerate(data.split(b"\n"), 1) if line.strip()}
                assert int(m.group(1)) in nonblank, msg
            assert "\n" not in msg, msg
            return None, path
    finally:
        os.remove(path)


def assert_messages(msgs, need_assistant=False):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
    assert not need_assistant or any(m["role"] == "assistant" for m in msgs)


def assert_renders(msgs):
    ids, mask = TOK.render_chat(msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert all(isinstance(i, int) and 0 <= i < TOK.vocab_size for i in ids)
    return ids, mask


# --- readers -------------------------------------------------------------------------------------------------
@FUZZ
@given(files("messages", "prompt_completion"))
def test_read_sft_returns_renderable_conversations_or_a_file_line_error(data):
    out, path = read(read_sft, data)
    for r in out or []:
        assert_messages(r["messages"], need_assistant=True)
        assert isinstance(r["line"], int) and r["line"] >= 1
        ids, mask = assert_renders(r["messages"])
        assert any(mask)  # an assistant turn: its closing <|im_end|> at least is a target
    if out:
        assert len(tokenize_sft(TOK, out, max_len=10**6, verbose=False)) == len(out)


@FUZZ
@given(files("pair", "hh"))
def test_read_prefs_returns_pairs_or_a_file_line_error(data):
    out, path = read(read_prefs, data)
    for r in out or []:
        assert_messages(r["prompt"])
        assert_messages(r["chosen"], need_assistant=True)
        assert_messages(r["rejected"], need_assistant=True)
    if out and any(r["chosen"] != r["rejected"] for r in out):
        kept = tokenize_prefs(TOK, out, max_len=10**6, path=path, verbose=False)
        for e in kept:
            assert len(e["chosen"]) == len(e["chosen_mask"]) and e["chosen_mask"][-1] == 1
            assert len(e["rejected"]) == len(e["rejected_mask"]) and e["rejected_mask"][-1] == 1


@FUZZ
@given(files("unpaired"))
def test_read_unpaired_returns_labelled_rows_or_a_file_line_error(data):
    out, path = read(read_unpaired, data)
    for r in out or []:
        assert isinstance(r["label"], bool)
        assert_messages(r["prompt"])
        assert_messages(r["completion"], need_assistant=True)
    if out:
        assert len(tokenize_prefs(TOK, out, max_len=10**6, path=path, verbose=False)) == len(out)


@FUZZ
@given(files("prompt", "pair"))
def test_read_prompts_keeps_every_key_and_renders_or_a_file_line_error(data):
    out, path = read(read_prompts, data)
    for r in out or []:
        p = r["prompt"]
        assert isinstance(p, str) or (assert_messages(p) is None)
        ids = TOK.render_prompt(p)
        assert ids[-len(TOK.encode("<|im_start|>assistant\n")):] == TOK.encode("<|im_start|>assistant\n")


@FUZZ
@given(st.lists(rows(), min_size=1, max_size=4))
def test_readers_agree_on_clean_json_lines(objs):
    """Well-formed JSONL: a reader either accepts a row or names exactly its line; read_prompts keeps extra keys."""
    data = "".join(json.dumps(o) + "\n" for o in objs).encode("utf-8", "surrogatepass")
    out, path = read(read_prompts, data)
    if out is not None:  # (json.dumps: NaN == NaN)
        assert [json.dumps({k: v for k, v in r.items() if k != "line"}) for r in out] == \
            [json.dumps({k: v for k, v in o.items() if k != "line"}) for o in objs]
        assert [r["line"] for r in out] == list(range(1, len(objs) + 1))


# --- the chat template ---------------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(turns, conversation, json_values))
def test_render_chat_renders_every_conversation_the_readers_let_through(msgs):
    """render_chat's input is what check_messages returns (every reader calls it first): that always renders."""
    try:
        valid = check_messages(msgs, "x", "messages")
    except UserError:
        return  # refused with one line by the reader: render_chat never sees it
    ids, mask = assert_renders(valid)
    assert TOK.render_prompt(valid)[:len(ids)] == ids
    n_assistant = sum(m["role"] == "assistant" for m in valid)
    assert (sum(mask) > 0) == (n_assistant > 0)


@FUZZ
@given(st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=20)}),
                min_size=1, max_size=5))
def test_render_chat_mask_covers_exactly_the_assistant_content_and_end_of_turn(msgs):
    ids, mask = assert_renders(msgs)
    want = "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
    assert TOK.decode([i for i, k in zip(ids, mask) if k], skip_special=False) == want
    prompt = TOK.render_prompt(msgs)
    assert prompt[:len(ids)] == ids  # the generation prompt continues the conversation as rendered
