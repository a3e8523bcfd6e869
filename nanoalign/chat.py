"""An interactive chat REPL that keeps the conversation history (/reset clears it; /quit or Ctrl-D leaves):
python -m nanoalign.chat --model out/demo/dpo [--once "Give one tip about sleep."]"""
from dataclasses import dataclass

import torch

from .cli import check_ranges, run
from .generate import generate
from .hub import load


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


def main(cfg: Config) -> dict:
    check_ranges(cfg, positive=("max_new_tokens",), non_negative=("temperature",))
    model, tok = load(cfg.model, cfg.device)
    torch.manual_seed(cfg.seed)
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    while True:
        try:
            line = cfg.once or input("you> ").strip()
        except EOFError:  # Ctrl-D
            return {}
        if line in ("/quit", "/exit"):
            return {}
        if line == "/reset":
            history = history[:1] if cfg.system else []
        elif line:
            history.append({"role": "user", "content": line})
            ro = generate(model, [tok.render_prompt(history)], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                          cfg.temperature)
            history.append({"role": "assistant", "content": tok.decode(ro.responses()[0]).strip()})
            print(f"bot> {history[-1]['content']}", flush=True)
            if cfg.once:
                return {"reply": history[-1]["content"]}

if __name__ == "__main__":
    run(main, Config)
