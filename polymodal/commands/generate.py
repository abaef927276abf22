"""``polymodal generate``: load a checkpoint and print a continuation of a prompt."""
from __future__ import annotations

import sys


def _load(model: str | None, device: str, dtype: str):
    """(model, tokenizer) through ``polymodal.load`` (any supported checkpoint)."""
    from ..interop import load

    return load(model, device=device, dtype=dtype)


def generate_cmd(
    prompt: str,
    model: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stream: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    num_beams: int = 1,
    quantize: str = "auto",
    chat: bool = False,
) -> str:
    """Generate text from a prompt with a polymodal, Hugging Face or GGUF checkpoint.

    Args:
        prompt: the text to continue.
        model: checkpoint folder or .gguf file (default: the bundled SmolLM2-135M-Instruct).
        max_new_tokens: the most tokens to generate.
        temperature: sampling temperature; 0 = greedy.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1 = off).
        min_p: drop tokens less likely than min_p times the top token (0 = off).
        repetition_penalty: CTRL repetition penalty (1 = off).
        seed: random seed for reproducible sampling.
        stream: print tokens as they are generated.
        device: cpu, cuda, ... or auto (cuda when available).
        dtype: float32, bfloat16, float16 or auto (as stored).
        num_beams: beam search width (1 = sampling/greedy; beams are not streamed).
        quantize: auto (CPU: a quantised GGUF's own blocks in the int4/int8 kernels), none, int8, int4.
        chat: wrap the prompt as one user turn of the model's chat template; stop at end of turn.
    """
    from ..runtime import pick_device

    device = str(pick_device(device))
    m, tok = _load(model, device, dtype)
    if tok is None:
        raise ValueError(f"checkpoint {model or '(default)'} has no tokenizer files; generate needs one")
    from ..inference import prepare_for_decoding, resolve_quant

    if (quant := resolve_quant(m, device, quantize)) is not None:
        m = prepare_for_decoding(m, device, dtype=dtype, quant=quant, compile=False)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams)
    if chat:
        from ..generate.chat import end_of_turn_ids

        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None
        if bos and tok.adds_bos and prompt.startswith(bos):  # encoding the prompt adds BOS again
            prompt = prompt[len(bos):]
        kw["eos_token_id"] = end_of_turn_ids(tok)
    from ..generate.decode import generate_text, stream_text

    if stream and num_beams == 1:
        pieces = []
        for piece in stream_text(m, tok, prompt, **kw):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return "".join(pieces)
    text = generate_text(m, tok, prompt, **kw)
    print(text)
    return text
