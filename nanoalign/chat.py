"""An interactive chat REPL that keeps the conversation history.

    python -m nanoalign.chat --model smollm2-135m-instruct        (type /reset to clear, /quit or Ctrl-D to leave)
    python -m nanoalign.chat --model out/demo/dpo --once "Give one tip about sleep."
"""
from dataclasses import dataclass

import torch

from .cli import check, run
from .generate import generate


@dataclass
class Config:
    """Chat with a model; --once answers one message and exits."""
    model: str = "smollm2-135m-instruct"  # preset, alias, checkpoint dir or .gguf
    system: str = ""  # optional system prompt
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int = 256  # per reply
    seed: int = 0  # sampling seed
    once: str = ""  # answer this one message and exit
    device: str = "cpu"  # cpu or cuda


def reply(model, tok, messages, cfg, generator) -> str:
    ro = generate(model, [tok.render_prompt(messages)], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                  cfg.temperature, generator=generator)
    return tok.decode(ro.responses()[0]).strip()


def main(cfg: Config):
    from .hub import load
    check(cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}")
    check(cfg.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {cfg.max_new_tokens}")
    model, tok = load(cfg.model, cfg.device)
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.once:
        text = reply(model, tok, history + [{"role": "user", "content": cfg.once}], cfg, g)
        print(f"user: {cfg.once}\nassistant: {text}")
        return {"reply": text}
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return {}
        if line in ("/quit", "/exit"):
            return {}
        if line == "/reset":
            history = history[:1] if cfg.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        text = reply(model, tok, history, cfg, g)
        history.append({"role": "assistant", "content": text})
        print(f"bot> {text}", flush=True)


if __name__ == "__main__":
    run(main, Config)
