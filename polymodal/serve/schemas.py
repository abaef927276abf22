"""Request bodies of the OpenAI-compatible routes (https://platform.openai.com/docs/api-reference).

Unknown fields are ignored, as OpenAI's own server does, but the fields that would change what
a reply *means* and that polymodal does not implement yet (structured output, tool calls, logit
bias, completion suffixes) are refused with 400 ``unsupported_parameter`` by :func:`refuse_unsupported`
rather than silently answered with prose.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import ApiError

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Base):
    url: str
    detail: str | None = None


class ContentPart(_Base):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Base):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # not implemented yet (refused unless neutral): structured output and tool calling
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None  # refused unless empty (no fill-in-the-middle)
    best_of: int | None = Field(None, ge=1)


class EmbeddingRequest(_Base):
    model: str
    input: Union[str, list[Union[str, ContentPart]], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class SearchRequest(_Base):
    model: str | None = None
    query: str = Field(min_length=1)
    top_k: int = Field(8, ge=1, le=100)


def _unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"{param}: {what} is not supported by this server yet", param=param,
                    code="unsupported_parameter")


def refuse_unsupported(body: _Sampling) -> None:
    """400 ``unsupported_parameter`` for a field whose value asks for something not implemented."""
    if body.logit_bias:
        raise _unsupported("logit_bias", "biasing token logits")
    if isinstance(body, ChatRequest):
        fmt = (body.response_format or {}).get("type", "text")
        if fmt != "text":
            raise _unsupported("response_format", f"response_format type {fmt!r} (structured output)")
        if body.tools:
            raise _unsupported("tools", "tool calling")
        if body.functions:
            raise _unsupported("functions", "function calling")
        if body.tool_choice not in (None, "none", "auto"):
            raise _unsupported("tool_choice", "forcing a tool call")
        if body.function_call not in (None, "none", "auto"):
            raise _unsupported("function_call", "forcing a function call")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise _unsupported("suffix", "a completion suffix (fill-in-the-middle)")
        if body.best_of is not None and body.best_of != body.n:
            raise _unsupported("best_of", "best_of other than n")
