"""``polymodal chat``: an interactive, streaming, multi-turn chat in the terminal (line editing and
history through readline where the terminal has it; lines may also be piped in)."""
from __future__ import annotations

import sys


def chat_cmd(
    model: str | None = None,
    system: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    max_new_tokens: int = 256,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    image: list[str] | None = None,
) -> list[dict[str, str]]:
    """Chat with a model in the terminal (streaming, multi-turn; /reset clears, /exit or EOF quits).

    Args:
        model: checkpoint folder or .gguf file (default: the bundled SmolLM2-135M-Instruct).
        system: an optional system message.
        temperature: sampling temperature; 0 = greedy.
        top_p: nucleus sampling mass (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: the most tokens per reply.
        seed: random seed for reproducible sampling.
        device: cpu, cuda, ... or auto (cuda when available).
        dtype: float32, bfloat16, float16 or auto (as stored).
        image: image file(s) to talk about (a VLM checkpoint); several go into the prompt in order.
    """
    from ..generate.chat import ChatSession
    from ..interop import load

    m, tok = load(model, device=device, dtype=dtype)
    gen = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    pixels = None
    if image:
        if getattr(m.config, "family", None) != "vlm":
            raise ValueError(f"--image needs a generative VLM checkpoint (polymodal train-vlm); "
                             f"{model or 'the default model'} is a {getattr(m.config, 'family', '?')!r} model")
        from ..data.images import ImageProcessor

        w = next(m.parameters())
        pixels = ImageProcessor.from_config(m.config)(list(image)).to(w.device, w.dtype)
    session = ChatSession(m, tok, system=system, images=pixels, **gen)
    interactive = sys.stdin.isatty()
    if interactive:
        try:  # line editing and an in-session history for a person at a terminal
            import readline  # noqa: F401
        except ImportError:
            pass
        print("polymodal chat - /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        if interactive:
            try:
                line = input("> ") + "\n"  # input() goes through readline
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history += session.messages
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        session.reply(text, out=sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return history + session.messages
