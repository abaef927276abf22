"""Prompts and generation of the LLaVA-style VLM (``polymodal.models.vlm``): captions and answers.

The prompts are the model config's (``caption_prompt`` / ``vqa_prompt``, chat-wrapped when
``caption_chat`` / ``vqa_chat`` and the tokenizer has a template, else after BOS), so inference
asks the way training did; the image placeholder is expanded by ``VLM.prompt_ids``. A training
target is the caption or answer followed by the end-of-turn token in a chat (else EOS), and
generation stops at the template's end of turn or EOS (:func:`stop_ids`). Decoding is the
package's one loop (``polymodal.generate.generate``): greedy or beam search over the KV cache,
the images entering at the prefill only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end a generated caption / answer: the chat template's end of turn and EOS."""
    from .chat import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def end_id(tokenizer, chat: bool) -> int:
    """The token a training target ends with: end of turn in a chat, else EOS."""
    ids = stop_ids(tokenizer)
    if not chat and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if not ids:
        raise ValueError("the tokenizer has neither an end-of-turn nor an EOS token to end a caption with")
    return ids[0]


def caption_chat(model, tokenizer) -> bool:
    return bool(model.config.caption_chat) and has_chat(tokenizer)


def vqa_chat(model, tokenizer) -> bool:
    return bool(getattr(model.config, "vqa_chat", True)) and has_chat(tokenizer)


def _after_bos(ids: list[int], tokenizer, chat: bool) -> list[int]:
    return ids if chat or tokenizer.bos_id is None else [tokenizer.bos_id] + ids


def caption_prompt_ids(model, tokenizer) -> list[int]:
    """The caption prompt of ``model.config``, image placeholders expanded."""
    chat = caption_chat(model, tokenizer)
    return _after_bos(model.prompt_ids(tokenizer, model.config.caption_prompt, chat=chat), tokenizer, chat)


def question_prompt_ids(model, tokenizer, question: str) -> list[int]:
    """``config.vqa_prompt`` with the question, as a chat user turn when ``config.vqa_chat`` and the
    tokenizer has a template (else after BOS)."""
    text = model.config.vqa_prompt.replace("{question}", question.strip())  # not format(): a question may hold braces
    chat = vqa_chat(model, tokenizer)
    return _after_bos(model.prompt_ids(tokenizer, text, chat=chat), tokenizer, chat)


def target_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """A training target: the text's tokens and the token that ends it."""
    return tokenizer.encode(text) + [end_id(tokenizer, chat)]


def load_vlm(path: str | Path, device: str = "cpu"):
    """(VLM, tokenizer, image processor) of a VLM checkpoint or train-vlm run folder."""
    from ..data.images import ImageProcessor
    from ..interop import load, resolve_model_path

    p = resolve_model_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder")
    model, tok = load(p, device=device)
    if getattr(model.config, "family", None) != "vlm":
        raise ValueError(f"{p}: not a generative VLM checkpoint (family {getattr(model.config, 'family', '?')!r})")
    if tok is None:
        raise ValueError(f"{p}: the checkpoint has no tokenizer (tokenizer.json)")
    return model.eval(), tok, ImageProcessor.from_config(model.config)


def generate_captions(model, tokenizer, images: Sequence, beam: int = 3, max_new_tokens: int = 30,
                      no_repeat_ngram: int = 3, batch_size: int = 16, prompt: str | None = None,
                      progress: bool = False) -> list[str]:
    """One caption per image (paths or PIL images): greedy (beam=1) or beam search over the KV
    cache, with the model's caption prompt (or ``prompt``, text holding ``<image>``)."""
    from tqdm.auto import tqdm

    from ..data.images import ImageProcessor, load_images
    from .decode import generate

    proc = ImageProcessor.from_config(model.config)
    if prompt is not None:
        if model.config.image_token not in prompt:
            raise ValueError(f"--prompt must contain the image placeholder {model.config.image_token!r}")
        ids = model.prompt_ids(tokenizer, prompt, chat=has_chat(tokenizer))
    else:
        ids = caption_prompt_ids(model, tokenizer)
    w = next(model.parameters())
    out: list[str] = []
    for s in tqdm(range(0, len(images), batch_size), desc="caption", disable=not progress, dynamic_ncols=True):
        pil, _ = load_images(images[s:s + batch_size])
        px = proc(pil).to(w.device, w.dtype)
        gen = generate(model, [ids] * len(pil), max_new_tokens=max_new_tokens, num_beams=beam, do_sample=False,
                       temperature=0.0, no_repeat_ngram_size=no_repeat_ngram, eos_token_id=stop_ids(tokenizer),
                       pad_token_id=tokenizer.pad_id or 0, model_kwargs={"pixel_values": px})
        out += [" ".join(tokenizer.decode(g).split()) for g in gen]  # a caption is one line
    return out


def answer_questions(model, tokenizer, images: Sequence, questions: Sequence[str], max_new_tokens: int = 16,
                     batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy short answers, one per (image, question) pair (``config.vqa_prompt``), ``batch_size``
    pairs per ``generate`` call: prompts of different lengths are left-padded with an attention
    mask, so each answer equals the one-pair answer while the decoder's weights are read once per
    batch step instead of once per question (decode is memory-bound on CPU)."""
    from tqdm.auto import tqdm

    from ..data.images import ImageProcessor, load_images
    from .decode import generate

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    proc = ImageProcessor.from_config(model.config)
    w = next(model.parameters())
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out: list[str] = []
    for s in tqdm(range(0, len(images), batch_size), desc="answer", disable=not progress, dynamic_ncols=True):
        pil, _ = load_images(images[s:s + batch_size])
        px = proc(pil).to(w.device, w.dtype)
        ids = [question_prompt_ids(model, tokenizer, q) for q in questions[s:s + batch_size]]
        gen = generate(model, ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=0.0,
                       eos_token_id=stop_ids(tokenizer), pad_token_id=pad, model_kwargs={"pixel_values": px})
        out += [tokenizer.decode(g).strip() for g in gen]
    return out


def answer_question(model, tokenizer, image, question: str, max_new_tokens: int = 16) -> str:
    """Greedy short answer to a question about one image (``config.vqa_prompt``)."""
    return answer_questions(model, tokenizer, [image], [question], max_new_tokens)[0]
