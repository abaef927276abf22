"""Chat templates: Jinja2 programs that turn a list of messages into one prompt string.

Hugging Face stores a model's chat format as a Jinja2 template in
``tokenizer_config.json`` (``chat_template``) or ``chat_template.jinja``; the
format the model was fine-tuned on (ChatML for SmolLM2, ...) must be reproduced
character for character or the model sees an out-of-distribution prompt.

We render exactly the way ``transformers`` does (``utils/chat_template_utils.py``):
an :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (templates from a hub are
untrusted code: the sandbox blocks attribute access to Python internals and the
immutable variant forbids mutating the caller's messages) with
``trim_blocks=True, lstrip_blocks=True``, the ``loopcontrols`` extension, a
``tojson`` filter that does not HTML-escape, and the globals
``raise_exception`` / ``strftime_now``. Variables: ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the special-token strings
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) and any extra keyword.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used by HF to mark assistant
    tokens for training masks) and renders its body unchanged, so such templates parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson HTML-escapes '<', '>' and '&', which would corrupt prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles (and caches) a chat template; a syntax error names the template line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                         special_tokens: dict[str, str] | None = None, **extra: Any) -> str:
    """Renders ``messages`` (a list of ``{"role", "content"}`` dicts) with ``template``.

    ``extra`` keywords override the special-token variables, as in transformers.
    Errors raised by the template itself (``raise_exception``) become ``ValueError``.
    """
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {messages!r}")
    variables: dict[str, Any] = {"tools": None, "documents": None}
    variables.update(special_tokens or {})
    variables.update(extra)
    try:
        return compile_chat_template(template).render(messages=[dict(m) for m in messages],
                                                      add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None
