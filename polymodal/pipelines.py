"""``polymodal.pipeline(task, model)``: one call from a task name to an answer, the way
``transformers.pipeline`` reads, each task backed by the code its command runs:

| task | default model | input -> output | backed by (the command) |
|---|---|---|---|
| ``text-generation`` | ``smollm2`` | prompt -> ``[{"generated_text"}]`` | ``generate.decode.generate_text`` (``generate``) |
| ``chat`` | ``smollm2`` | text or messages -> ``[{"generated_text": messages + reply}]`` | ``generate.chat.ChatSession`` (``chat``) |
| ``feature-extraction`` | ``minilm`` | sentences -> (N, D) L2-normalised tensor | ``SentenceEncoder`` / CLIP ``encode_texts`` (``serve``'s ``/v1/embeddings``) |
| ``zero-shot-image-classification`` | - | image(s), labels -> ``[{"label", "score"}]`` | ``eval.dual_encoder.zero_shot_probs`` (``zero-shot``) |
| ``image-to-text`` | - | image(s) -> ``[{"generated_text"}]`` | ``generate.vlm.generate_captions`` (``caption``) |
| ``visual-question-answering`` | - | image, question -> ``[{"answer", "score"}]`` | ``generate.vlm.answer_question`` / ``eval.vqa.predict_fusion`` (``vqa``) |

``model`` is anything ``--model`` takes: an alias (``smollm2``, ``minilm``), a run name under
``runs/``, a model or run folder, a ``.gguf`` file. Defaults given to ``pipeline(...)`` (e.g.
``max_new_tokens=32``) apply to every call; keywords of a call override them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch


class Pipeline:
    task = ""
    default_model: str | None = None

    def __init__(self, model=None, tokenizer=None, device: str = "cpu", dtype: str | None = None, **defaults: Any):
        self.device, self.defaults = device, defaults
        if model is None and self.default_model is None:
            raise ValueError(f"pipeline({self.task!r}) needs model=...: a checkpoint folder, a run folder or a run "
                             "name (`polymodal list` shows them)")
        if isinstance(model, torch.nn.Module):
            self.model, self.tokenizer = model.eval(), tokenizer
        else:
            self.model, self.tokenizer = self.load(model if model is not None else self.default_model, device, dtype)

    def load(self, spec: str | Path, device: str, dtype: str | None):
        from .interop import load

        model, tok = load(spec, device=device, dtype=dtype)
        return model.eval(), tok

    def options(self, kw: dict) -> dict:
        return {**self.defaults, **kw}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, model={type(self.model).__name__})"


def _images(x) -> tuple[list, bool]:
    """(list of images, whether one image was given): paths and PIL images pass through."""
    single = not isinstance(x, (list, tuple))
    return ([x] if single else list(x)), single


class TextGeneration(Pipeline):
    task, default_model = "text-generation", "smollm2"

    def __call__(self, prompt: str | Sequence[str], return_full_text: bool = True, **kw) -> list:
        from .generate.decode import generate_text

        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files; text generation needs one")
        prompts, single = ([prompt], True) if isinstance(prompt, str) else (list(prompt), False)
        kw = self.options(kw)
        out = [[{"generated_text": (p if return_full_text else "") + generate_text(self.model, self.tokenizer, p, **kw)}]
               for p in prompts]
        return out[0] if single else out


class Chat(Pipeline):
    task, default_model = "chat", "smollm2"

    def __call__(self, messages: str | list[dict], **kw) -> list:
        from .generate.chat import ChatSession

        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if not msgs or msgs[-1].get("role") != "user":
            raise ValueError("chat: the last message must be the user's")
        kw = self.options(kw)
        session = ChatSession(self.model, self.tokenizer, **kw)
        session.messages = [dict(m) for m in msgs[:-1]]
        reply = session.reply(msgs[-1]["content"])
        return [{"generated_text": msgs + [{"role": "assistant", "content": reply.strip()}]}]


class FeatureExtraction(Pipeline):
    """Sentence embeddings: mean-pooled, L2-normalised (sentence-transformers' ``encode``) for a
    text encoder; ``CLIP.encode_text`` for a dual encoder."""
    task, default_model = "feature-extraction", "minilm"

    def __call__(self, sentences: str | Sequence[str], **kw) -> torch.Tensor:
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        if hasattr(self.model, "encode_text"):
            from .models.dual_encoder import encode_texts

            return encode_texts(self.model, self.tokenizer, texts)
        from .models.encoder import SentenceEncoder

        return SentenceEncoder(self.model, self.tokenizer, **self.options(kw)).encode(texts)


class ZeroShotImageClassification(Pipeline):
    task = "zero-shot-image-classification"

    def load(self, spec, device, dtype):
        from .models.dual_encoder import load_dual_encoder

        model, tok, self.processor = load_dual_encoder(spec, device=device)
        return model, tok

    def __call__(self, images, candidate_labels: Sequence[str], templates: Sequence[str] | None = None) -> list:
        from .data.images import ImageProcessor, load_images
        from .eval.dual_encoder import DEFAULT_TEMPLATES, zero_shot_probs

        ims, single = _images(images)
        pil, _ = load_images(ims)
        proc = getattr(self, "processor", None) or ImageProcessor.from_config(self.model.config)
        probs = zero_shot_probs(self.model, self.tokenizer, proc, pil, list(candidate_labels),
                                list(templates or DEFAULT_TEMPLATES))
        out = [sorted(({"label": lab, "score": float(p)} for lab, p in zip(candidate_labels, row)),
                      key=lambda d: -d["score"]) for row in probs]
        return out[0] if single else out


class ImageToText(Pipeline):
    task = "image-to-text"

    def __call__(self, images, **kw) -> list:
        from .generate.vlm import generate_captions

        ims, single = _images(images)
        caps = generate_captions(self.model, self.tokenizer, ims, **self.options(kw))
        out = [[{"generated_text": c}] for c in caps]
        return out[0] if single else out


class VisualQuestionAnswering(Pipeline):
    task = "visual-question-answering"

    def load(self, spec, device, dtype):
        from .eval.vqa import load_vqa_model

        model, tok, _ = load_vqa_model(spec)
        return model.to(device).eval(), tok

    def __call__(self, image, question: str, top_k: int = 1, **kw) -> list:
        if getattr(self.model.config, "family", None) == "vlm":
            from .generate.vlm import answer_question

            return [{"answer": answer_question(self.model, self.tokenizer, image, question, **self.options(kw)),
                     "score": None}]
        from .data.image_cache import PixelCache
        from .data.images import ImageProcessor
        from .data.vqa import VQAExample
        from .eval.vqa import predict_fusion

        ex = VQAExample(Path(image), question, [], "pipeline")
        cache = PixelCache(ImageProcessor.from_config(self.model.config), [ex.image])
        top = predict_fusion(self.model, self.tokenizer, cache, [ex], top_k=top_k)[0]
        return [{"answer": a, "score": float(p)} for a, p in top]


TASKS: dict[str, type[Pipeline]] = {c.task: c for c in (TextGeneration, Chat, FeatureExtraction,
                                                         ZeroShotImageClassification, ImageToText,
                                                         VisualQuestionAnswering)}
ALIASES = {"sentence-embeddings": "feature-extraction", "image-captioning": "image-to-text", "vqa": "visual-question-answering",
           "zero-shot": "zero-shot-image-classification", "conversational": "chat"}


def pipeline(task: str, model=None, tokenizer=None, device: str = "cpu", dtype: str | None = None,
             **defaults: Any) -> Pipeline:
    """A callable for ``task`` (see the table in this module's docstring) with ``model`` loaded
    once (a name, a path, or a module with its ``tokenizer``); ``defaults`` apply to every call."""
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown pipeline task {task!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name](model, tokenizer, device=device, dtype=dtype, **defaults)


__all__ = ["pipeline", "Pipeline", "TASKS"]
