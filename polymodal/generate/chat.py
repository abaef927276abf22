"""Multi-turn chat sessions with a chat model (what ``polymodal chat`` and the server's chat use).

Each turn renders the whole conversation with the model's own chat template
(``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, the
Jinja2 template shipped with the checkpoint, e.g. ChatML's
``<|im_start|>role\\n...<|im_end|>`` for SmolLM2), generates the assistant's reply
with the shared sampler (``polymodal.generate.stream``, penalties -> temperature
-> top-k -> top-p) until the template's end-of-turn token, and prints it as it
is produced. Lines are read from stdin, so a conversation can be piped in:

    printf 'Hi!\\n/reset\\nWhat is 2+2?\\n' | polymodal chat --temperature 0

With a generative VLM (``polymodal train-vlm``), ``--image`` files enter through the chat
template: the first user turn starts with one ``<image>`` placeholder per image (expanded to
the model's image tokens by ``VLM.prompt_ids``), and the images' pixels go to every model call
of the conversation (``pixel_values`` of shape (1, M, C, H, W)).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3, Mistral).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn marker(s) plus EOS."""
    template = getattr(tokenizer, "chat_template", None) or ""
    ids = []
    for marker in END_OF_TURN:
        tid = tokenizer.token_to_id(marker) if hasattr(tokenizer, "token_to_id") else None
        if tid is not None and (marker in template or not template):
            ids.append(tid)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
        ids.append(tokenizer.eos_id)
    return ids


class ChatSession:
    """A conversation with one model: ``reply(text)`` streams the assistant's answer."""

    def __init__(self, model, tokenizer, system: str | None = None, images=None, **gen: Any):
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; chat needs one")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                             "chat needs an instruction-tuned model")
        self.model, self.tokenizer, self.system, self.gen = model, tokenizer, system, gen
        self.stop_ids = end_of_turn_ids(tokenizer)
        # images: (M, C, H, W) pixels for a VLM; they belong to the first user turn
        if images is not None and getattr(getattr(model, "config", None), "family", None) != "vlm":
            raise ValueError("images need a generative VLM checkpoint (polymodal train-vlm); "
                             "this model reads text only")
        self.images = images
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        if self.images is not None:  # each <image> becomes the model's run of placeholder ids
            return self.model.prompt_ids(self.tokenizer, text)
        # The rendered template already holds every special token (BOS included where the
        # template writes it), so nothing more is added here.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(self, user_text: str, out: TextIO | None = None) -> str:
        from . import stream
        from ..tokenizers import StreamDecoder

        gen = dict(self.gen)
        if self.images is not None:
            if not any(m["role"] == "user" for m in self.messages):
                user_text = (self.model.config.image_token + "\n") * len(self.images) + user_text
            gen["model_kwargs"] = {"pixel_values": self.images[None]}
        self.messages.append({"role": "user", "content": user_text})
        decoder = StreamDecoder(self.tokenizer)
        pieces = []
        for t in stream(self.model, [self.prompt_ids()], eos_token_id=self.stop_ids, tokenizer=self.tokenizer,
                        truncate=True, **gen):
            piece = decoder.push(t)
            if piece:
                pieces.append(piece)
                if out is not None:
                    out.write(piece)
                    out.flush()
        tail = decoder.flush() if hasattr(decoder, "flush") else ""
        if tail:
            pieces.append(tail)
            if out is not None:
                out.write(tail)
        text = "".join(pieces)
        self.messages.append({"role": "assistant", "content": text.strip()})
        return text
