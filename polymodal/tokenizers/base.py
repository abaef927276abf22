"""The polymodal ``Tokenizer``: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

The whole tokenisation pipeline (normaliser, pre-tokeniser, model - BPE
(Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units"; byte-level as in GPT-2, Radford et al. 2019), WordPiece, WordLevel -
post-processor and decoder) lives in one ``tokenizer.json``, so a tokenizer saved
here loads in ``transformers`` and a Hugging Face folder loads here. This class
adds what ``tokenizer.json`` does not carry: which tokens are BOS/EOS/PAD/UNK,
whether BOS is prepended, and the chat template (``tokenizer_config.json``).

``StreamDecoder`` turns a stream of token ids into text incrementally. A
byte-level token can end in the middle of a multi-byte UTF-8 character (an emoji
is 4 bytes, often split over 2-3 tokens), so it decodes a short window of recent
tokens and withholds text until the window no longer ends in U+FFFD, the
replacement character the decoder emits for an incomplete byte sequence (the
same scheme as text-generation-inference's ``decode_token``).
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers

from .chat import render_chat_template

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")  # cls/sep/mask: BERT-family folders


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json_obj(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pick_chat_template(value: Any, path: Path) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (we use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
    raise ValueError(f"{path}: 'chat_template' must be a string or a list of {{name, template}}, got {value!r}")


class Tokenizer:
    """Text <-> token ids, special tokens and chat formatting.

    Attributes:
        vocab_size: number of ids, added/special tokens included.
        bos_id, eos_id, pad_id, unk_id, cls_id, sep_id, mask_id: ids of the special tokens
            (``None`` if absent).
        bos_token, eos_token, pad_token, unk_token, cls_token, sep_token, mask_token: their strings.
        model_max_length: longest input the model was trained on, from tokenizer_config.json
            (``None`` if unset).
        add_bos: whether ``encode(..., add_special_tokens=True)`` prepends BOS (when the
            ``tokenizer.json`` post-processor does not already do it).
        chat_template: a Jinja2 chat template or ``None``.
        kind: "char", "bpe" for tokenizers trained here, "pretrained" otherwise.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, bos: str | int | None = None, eos: str | int | None = None,
                 pad: str | int | None = None, unk: str | int | None = None, add_bos: bool = False,
                 add_eos: bool = False, chat_template: str | None = None, kind: str = "pretrained",
                 extra_config: dict | None = None, cls: str | int | None = None, sep: str | int | None = None,
                 mask: str | int | None = None):
        if not isinstance(tok, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        # A tokenizer.json may carry fixed padding/truncation (sentence-transformers saves pad-to-128):
        # encode() must return exactly the text's ids, as transformers does, so both are switched off.
        if tok.padding is not None:
            tok.no_padding()
        if tok.truncation is not None:
            tok.no_truncation()
        self._tok = tok
        self.kind = kind
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self._extra_config = dict(extra_config or {})
        limit = self._extra_config.get("model_max_length")
        # transformers writes a huge sentinel (int(1e30)) when the length is unknown.
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1e9 else None
        for role, value in zip(_ROLES, (bos, eos, pad, unk, cls, sep, mask)):
            token, tid = self._resolve(role, value)
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_id", tid)
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        if self.add_eos and self.eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        # Hugging Face folders usually prepend BOS through the tokenizer.json post-processor
        # (TemplateProcessing); find out once whether it does, so BOS is never added twice.
        probe = tok.encode("", add_special_tokens=True).ids
        self._post_adds_bos = self.bos_id is not None and self.bos_id in probe[:1]
        self._post_adds_eos = self.eos_id is not None and self.eos_id in probe[-1:]

    def _resolve(self, role: str, value: str | int | None) -> tuple[str | None, int | None]:
        if value is None:
            return None, None
        if not isinstance(value, str):
            value = operator.index(value)  # ints, numpy ints and 0-d tensors
            token = self._tok.id_to_token(value)
            if token is None:
                raise ValueError(f"{role} id {value} is outside the vocabulary (size {self.vocab_size})")
            return token, value
        tid = self._tok.token_to_id(value)
        if tid is None:
            raise ValueError(f"{role} token {value!r} is not in the vocabulary")
        return value, tid

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, /, bos: str | int | None = None, eos: str | int | None = None,
                        pad: str | int | None = None, unk: str | int | None = None, chat_template: str | None = None,
                        add_bos: bool = False, add_eos: bool = False, kind: str = "pretrained",
                        **roles: str | int | None) -> "Tokenizer":
        """Wraps an existing ``tokenizers.Tokenizer``; special tokens are given as strings or ids
        (``roles`` may add ``cls``, ``sep``, ``mask``)."""
        unknown = set(roles) - {"cls", "sep", "mask"}
        if unknown:
            raise TypeError(f"unknown special-token roles {sorted(unknown)}")
        return cls(tok, bos=bos, eos=eos, pad=pad, unk=unk, chat_template=chat_template, add_bos=add_bos,
                   add_eos=add_eos, kind=kind, **roles)

    @classmethod
    def load(cls, folder: str | Path) -> "Tokenizer":
        """Loads a folder written by :meth:`save` or a Hugging Face tokenizer folder.

        Reads ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (special tokens,
        ``add_bos_token``/``add_eos_token``, ``chat_template``), ``special_tokens_map.json`` and
        ``chat_template.jinja``. Slow-tokenizer-only folders (vocab.txt, sentencepiece .model)
        are not supported: convert them to tokenizer.json with transformers first.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: tokenizer folder not found")
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            others = sorted(p.name for p in folder.iterdir() if p.suffix in (".model", ".txt") or p.name == "vocab.json")
            hint = f" (found {', '.join(others)}: only tokenizer.json is supported)" if others else ""
            raise FileNotFoundError(f"{path}: file not found{hint}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

        config: dict = {}
        if (folder / SPECIAL_TOKENS_MAP_FILE).is_file():
            config.update(_read_json_obj(folder / SPECIAL_TOKENS_MAP_FILE))
        if (folder / CONFIG_FILE).is_file():
            config.update(_read_json_obj(folder / CONFIG_FILE))
        chat_template = _pick_chat_template(config.get("chat_template"), folder / CONFIG_FILE)
        if (folder / CHAT_TEMPLATE_FILE).is_file():  # newer transformers save the template on its own
            chat_template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")

        specials = {}
        for role in _ROLES:
            token = _token_str(config.get(f"{role}_token"))
            # A config may name a token the vocabulary lacks (e.g. a pad token added later);
            # treat it as absent instead of failing the whole load.
            specials[role] = token if token is not None and tok.token_to_id(token) is not None else None
        known = {f"{r}_token" for r in _ROLES} | {"chat_template", "add_bos_token", "add_eos_token",
                                                  "polymodal_kind"}
        extra = {k: v for k, v in config.items() if k not in known and k != "added_tokens_decoder"}
        return cls(tok, **specials, add_bos=bool(config.get("add_bos_token", False)) and specials["bos"] is not None,
                   add_eos=bool(config.get("add_eos_token", False)) and specials["eos"] is not None,
                   chat_template=chat_template, kind=config.get("polymodal_kind", "pretrained"), extra_config=extra)

    def save(self, folder: str | Path) -> None:
        """Writes ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by transformers'
        ``PreTrainedTokenizerFast.from_pretrained``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        config = dict(self._extra_config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for role in _ROLES:
            token = getattr(self, f"{role}_token")
            if token is not None:
                config[f"{role}_token"] = token
        config.update(add_bos_token=self.add_bos, add_eos_token=self.add_eos, polymodal_kind=self.kind)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # -- properties ---------------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, chat_template={self.chat_template is not None})")

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` starts with BOS (flag or post-processor)."""
        return self.add_bos or self._post_adds_bos

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special (added, ``special=True``) tokens."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    # -- encode / decode ----------------------------------------------------------------------------
    def _finish(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.add_bos and not self._post_adds_bos:
                ids = [self.bos_id] + ids
            if self.add_eos and not self._post_adds_eos:
                ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens`` the post-processor runs and BOS (EOS)
        is prepended (appended) when the tokenizer is configured to (``add_bos``/``add_eos``).
        Special-token strings inside ``text`` (e.g. ``<|im_start|>``) map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._finish(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the Rust library)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, item {i} is {type(t).__name__}")
        encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [self._finish(e.ids, add_special_tokens) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple, numpy array or 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # -- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Renders ``messages`` with the tokenizer's chat template, exactly as transformers'
        ``apply_chat_template(..., tokenize=False)`` does. Extra keywords (``tools``, ``documents``,
        custom flags) are passed to the template."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (tokenizer_config.json has no 'chat_template'); "
                "set tokenizer.chat_template to a Jinja2 template or use a chat/instruct model")
        specials = {f"{r}_token": getattr(self, f"{r}_token") for r in _ROLES if getattr(self, f"{r}_token")}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=specials, **extra)


class StreamDecoder:
    """Incremental detokeniser: ``push(id)`` returns only newly completed text.

    The concatenation of every ``push`` result and ``flush()`` equals
    ``tokenizer.decode(all_ids)``. Text is withheld while the decoded window ends in an
    incomplete UTF-8 sequence (U+FFFD), so no replacement character is ever emitted for
    a character split across byte-level tokens; ``flush()`` emits whatever is left.
    Decoding a window that starts a few tokens back (rather than a single token) also keeps
    decoders that depend on context (SentencePiece's leading-space rule) correct.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (a character boundary)
        self._read = 0    # ids before this have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        """Returns any withheld text (possibly with U+FFFD if the stream ended mid-character)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0
