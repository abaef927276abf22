"""Generative vision-language model: image tower -> projector -> decoder
(LLaVA, Liu et al., 2023, "Visual Instruction Tuning", eq. 1; nanoVLM / Idefics3 for the
pixel-shuffle projector, Laurencon et al., 2024, "Building and better understanding
vision-language models", sec. 2.2).

An image X_v is encoded by a vision transformer g into patch features Z_v = g(X_v)
(N x D_v; the class token, if any, is dropped). A projector W maps them into the decoder's
embedding space, H_v = W(Z_v) (LLaVA eq. 1: a linear map in v1, a 2-layer GELU MLP in
v1.5). Pixel shuffle (space-to-depth) first folds each r x r block of neighbouring patch
tokens into one token of r^2 * D_v features, so the decoder sees N / r^2 image tokens:

    (B, g*g, D) -> (B, (g/r)*(g/r), r*r*D)       (nanoVLM ``ModalityProjector.pixel_shuffle``)

The decoder is any polymodal causal LM taking ``inputs_embeds`` (GPT family; SmolLM2 by
default). The prompt carries the image as ``n_image_tokens`` copies of a placeholder id
per image (what the Hugging Face LLaVA / nanoVLM processors do); the model replaces the
placeholders' token embeddings by H_v, image by image in prompt order, and trains with
the usual next-token loss on the text (LLaVA eq. 2-3). Expanding the placeholder in the
prompt, not inside the model, keeps the sequence length the token count, so attention
masks, positions and the KV cache of ``polymodal.generate`` need no special case.
``prompt_ids`` does the expansion from text containing ``config.image_token``.

Generation: ``generate(vlm, ids, model_kwargs={"pixel_values": x})``. The images enter
only at the prefill (empty cache); decode steps embed the new token as plain text and
ignore ``pixel_values``. Without a cache every step re-runs the whole sequence, images
included, so both paths give the same tokens. The placeholder id's logit is set to -inf
(``suppress_image_token``) so the model can never emit a placeholder (which would have
no image behind it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import apply_lora
from .config import ConfigBase


def _nano_vit(**kw) -> dict[str, Any]:
    from .vit import ViTConfig

    d = ViTConfig.from_preset("vit-nano-cifar", num_labels=0).to_dict()
    return {**d, **kw}


def _nano_decoder(**kw) -> dict[str, Any]:
    from .gpt import GPTConfig

    d = GPTConfig.from_preset("nano-llama", vocab_size=66, block_size=128).to_dict()
    return {**d, **kw}


def _sub_config(d: Any, default_family: str) -> ConfigBase:
    if isinstance(d, ConfigBase):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"a sub-model config must be a dict or a Config, got {type(d).__name__}")
    from .registry import config_from_dict

    return config_from_dict({**d, "family": d.get("family", default_family)}, "VLMConfig")


@dataclasses.dataclass
class VLMConfig(ConfigBase):
    family: ClassVar[str] = "vlm"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str = "custom"
    vision: Any = dataclasses.field(default_factory=_nano_vit)  # ViT (or CLIP image tower) config
    decoder: Any = dataclasses.field(default_factory=_nano_decoder)  # causal LM config (GPT family)
    projector: str = "mlp"  # mlp (LLaVA-1.5: Linear-GELU-Linear) | linear (LLaVA-1 / nanoVLM)
    projector_hidden: int | None = None  # default: the decoder width
    pixel_shuffle: int = 2  # r: fold r x r patch tokens into one (1 = off)
    image_token: str = "<image>"  # the placeholder in prompt text (split out by prompt_ids)
    image_token_id: int = 65  # the placeholder id in the decoder's vocabulary
    suppress_image_token: bool = True
    # Prompts the training task used (polymodal.train.tasks.vlm), so inference asks the same way.
    caption_prompt: str = "<image>"  # stage 1 / ``polymodal caption``: the caption follows this text
    caption_chat: bool = False  # wrap caption_prompt in the chat template as a user turn
    # LLaVA-1.5's short-answer VQA prompt (Liu et al., 2023b, "Improved Baselines...", table 7)
    vqa_prompt: str = "<image>\n{question}\nAnswer the question using a single word or phrase."
    vqa_chat: bool = True  # wrap vqa_prompt in the chat template (when the tokenizer has one); off: BOS + prompt

    def __post_init__(self):
        self.vision = _sub_config(self.vision, "vit")
        self.decoder = _sub_config(self.decoder, "gpt")
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"projector must be 'mlp' or 'linear', got {self.projector!r}")
        grid = getattr(self.vision, "grid", None)
        if grid is None:
            raise ValueError(f"vision tower family {self.vision.family!r} has no patch grid (need a ViT config)")
        if self.pixel_shuffle < 1 or grid % self.pixel_shuffle:
            raise ValueError(f"pixel_shuffle={self.pixel_shuffle} must divide the {grid}x{grid} patch grid")
        if not 0 <= self.image_token_id < self.decoder.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the decoder vocabulary "
                             f"({self.decoder.vocab_size} tokens)")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"], d["decoder"] = self.vision.to_dict(), self.decoder.to_dict()
        d["family"] = self.family
        return d

    @property
    def n_image_tokens(self) -> int:
        """Decoder tokens per image: (grid / r)^2."""
        return (self.vision.grid // self.pixel_shuffle) ** 2

    # generation reads these from model.config
    @property
    def block_size(self) -> int:
        return self.decoder.block_size

    @property
    def eos_token_id(self):
        return getattr(self.decoder, "eos_token_id", None)


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, g*g, D) -> (B, (g/r)^2, r*r*D): each output token holds an r x r block of
    neighbouring patches, row-major inside the block (nanoVLM's layout)."""
    if r == 1:
        return x
    b, n, d = x.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % r:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {r}; got {n} tokens")
    x = x.reshape(b, g // r, r, g // r, r, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (g // r) ** 2, r * r * d)


class Projector(nn.Module):
    """Pixel shuffle, then Linear (or Linear-GELU-Linear) into the decoder width."""

    def __init__(self, in_dim: int, out_dim: int, r: int = 1, kind: str = "mlp", hidden: int | None = None):
        super().__init__()
        self.r = r
        d = in_dim * r * r
        if kind == "linear":
            self.fc, self.proj = nn.Linear(d, out_dim), None
        else:
            self.fc, self.proj = nn.Linear(d, hidden or out_dim), nn.Linear(hidden or out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(pixel_shuffle(x, self.r))
        return x if self.proj is None else self.proj(F.gelu(x))


class VLM(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, cache, last_only, pixel_values)`` -> logits.

    ``pixel_values``: (B, C, H, W) one image per row, or (B, M, C, H, W) up to M images per
    row; a row with k placeholder groups uses its first k images. ``image_features`` instead
    gives the image tower's patch features (``vision_features``), (B, P, D_v) or (B, M, P, D_v):
    with a frozen tower they can be computed once per image and reused every epoch."""

    def __init__(self, config: VLMConfig, vision: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        from .registry import build_model

        self.config = config
        self.vision = vision if vision is not None else build_model(config.vision)
        self.decoder = decoder if decoder is not None else build_model(config.decoder)
        self.projector = Projector(config.vision.n_embd, config.decoder.n_embd, config.pixel_shuffle,
                                   config.projector, config.projector_hidden)
        for m in self.projector.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tie_weights(self) -> None:
        if hasattr(self.decoder, "tie_weights"):
            self.decoder.tie_weights()

    # -- images ------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the tower's patch features Z_v (N, grid^2, D_v), class token dropped."""
        h = self.vision.hidden_states(pixel_values)
        return h[:, int(getattr(self.vision.config, "class_token", False)):]

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) pixels or (N, grid^2, D_v) patch features -> H_v (N, n_image_tokens, decoder width)."""
        return self.projector(self.vision_features(pixel_values) if features is None else features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder group replaced by its image's tokens."""
        x = self.decoder.wte(input_ids)
        is_img = input_ids == self.config.image_token_id
        if attention_mask is not None:
            is_img = is_img & attention_mask.to(torch.bool)  # a pad id equal to the placeholder is not an image
        counts = is_img.sum(-1).tolist()
        if not any(counts):
            return x
        n = self.config.n_image_tokens
        if image_features is None:
            images, name, one, shapes = pixel_values, "pixel_values", 3, "(B, C, H, W) or (B, M, C, H, W)"
        else:
            images, name, one, shapes = image_features, "image_features", 2, "(B, P, D_v) or (B, M, P, D_v)"
        if images is None:
            raise ValueError("the prompt has image placeholder tokens but no pixel_values were given")
        if images.dim() == one + 1:  # one image per row
            images = images[:, None]
        if images.dim() != one + 2 or images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{name} must be {shapes} with B={input_ids.shape[0]}, got {tuple(images.shape)}")
        picks = []
        for row, c in enumerate(counts):
            if c % n:
                raise ValueError(f"row {row} has {c} image placeholder tokens, not a multiple of the "
                                 f"{n} tokens per image (build prompts with VLM.prompt_ids)")
            if c // n > images.shape[1]:
                raise ValueError(f"row {row} has {c // n} images in its prompt but {name} hold "
                                 f"{images.shape[1]} per row")
            picks += [images[row, j] for j in range(c // n)]
        picks = torch.stack(picks)
        feats = (self.encode_images(picks) if image_features is None
                 else self.encode_images(features=picks.to(self.projector.fc.weight.dtype))).to(x.dtype)
        # masked_scatter fills placeholders row-major: row by row, images and tokens in prompt order
        return x.masked_scatter(is_img[..., None], feats.reshape(-1, feats.shape[-1]))

    # -- decoder ----------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None):
        return self.decoder.new_cache(batch_size, max_len, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, last_only: bool = False,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with ``labels``, the next-token loss instead (``loss``), so a
        training step goes through ``forward`` (what DDP's gradient hooks need)."""
        if labels is not None:
            return self.loss(input_ids, pixel_values, labels, attention_mask, image_features)
        if cache is not None and cache.pos > 0:
            # decode step: the image is already in the cache; only the new text token enters
            embeds = self.decoder.wte(input_ids)
        else:
            embeds = self.embed(input_ids, pixel_values, attention_mask, image_features)
        logits = self.decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                              last_only=last_only, inputs_embeds=embeds)
        if self.config.suppress_image_token:
            logits = logits.index_fill(-1, torch.tensor([self.config.image_token_id], device=logits.device),
                                       float("-inf"))
        return logits

    def loss(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy. ``labels`` (B, T) align with ``input_ids`` (shifted here);
        -100 is ignored. Default labels: the inputs, with image placeholders and padding ignored.

        The LM head runs only at the positions that have a label: with a 49k vocabulary it is a
        fifth of SmolLM2's forward cost, and stage-1/2 batches label only the caption/answer."""
        logits, targets = self.labelled_logits(input_ids, pixel_values, labels, attention_mask, image_features)
        return F.cross_entropy(logits.float(), targets)

    def labelled_logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) at the positions ``loss`` scores, in row-major order: the next-token
        logits (K, vocab) of the K labelled targets (K,). ``argmax == target`` over a row's positions
        is teacher-forced exact match, which equals greedy decoding's answer (same prefix each step)."""
        if labels is None:
            labels = input_ids.masked_fill(input_ids == self.config.image_token_id, -100)
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.to(torch.bool), -100)
        embeds = self.embed(input_ids, pixel_values, attention_mask, image_features)
        targets = labels[:, 1:]
        keep = targets != -100
        dec = self.decoder
        if hasattr(dec, "hidden_states") and hasattr(dec, "lm_head"):
            h = dec.hidden_states(input_ids, attention_mask, None, None, embeds)
            logits = dec.lm_head(h[:, :-1][keep])
        else:
            logits = dec(input_ids, attention_mask=attention_mask, inputs_embeds=embeds)[:, :-1][keep]
        if self.config.suppress_image_token:  # as in forward: the placeholder is never a prediction
            logits = logits.index_fill(-1, torch.tensor([self.config.image_token_id], device=logits.device),
                                       float("-inf"))
        return logits, targets[keep]

    # -- prompts ----------------------------------------------------------------------
    def prompt_ids(self, tokenizer, text: str, chat: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``text`` with each ``config.image_token`` expanded to ``n_image_tokens``
        placeholder ids. With ``chat`` the text is first wrapped as one user turn by the tokenizer's
        chat template. The placeholder string is split out before tokenising, so the tokenizer
        need not know it."""
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat=True needs a tokenizer with a chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=add_generation_prompt)
        pieces = text.split(self.config.image_token)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.config.image_token_id] * self.config.n_image_tokens
            if piece:
                ids += tokenizer.encode(piece)
        return ids

    # -- training set-ups -------------------------------------------------------------
    def freeze(self, vision: bool = True, decoder: bool = False, projector: bool = False) -> "VLM":
        """Stops gradients into the chosen parts (stage 1 of LLaVA: only the projector trains)."""
        for part, flag in ((self.vision, vision), (self.decoder, decoder), (self.projector, projector)):
            for p in part.parameters():
                p.requires_grad_(not flag)
        return self

    def add_lora(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: Sequence[str] = ("blocks.*.attn.qkv", "blocks.*.attn.proj")) -> list[str]:
        """LoRA adapters on the decoder (the rest of the decoder frozen; vision tower and projector
        untouched). Merge with ``polymodal.nn.merge_lora`` before ``save_model``."""
        return apply_lora(self.decoder, list(targets), r=r, alpha=alpha, dropout=dropout, freeze_rest=True)

    def num_params(self, trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)


# -- SmolLM2 as the decoder ---------------------------------------------------------------
SMOLLM2_IMAGE_TOKEN_ID = 16  # "<empty_output>": a StarCoder-era special token chat never uses


def extend_vocab(gpt: nn.Module, n_new: int = 1) -> list[int]:
    """Adds ``n_new`` rows to a GPT's (tied) embedding and LM head, initialised to the mean
    embedding (so the new tokens' logits start near the average, not random). Returns the new ids."""
    old = gpt.wte.weight.data
    v = old.shape[0]
    new = torch.cat([old, old.mean(0, keepdim=True).expand(n_new, -1)], 0)
    gpt.wte = nn.Embedding(v + n_new, old.shape[1], device=old.device, dtype=old.dtype)
    gpt.wte.weight.data.copy_(new)
    if gpt.config.tie_embeddings:
        gpt.lm_head = nn.Linear(old.shape[1], v + n_new, bias=False, device=old.device, dtype=old.dtype)
        gpt.tie_weights()
    else:
        head = gpt.lm_head.weight.data
        gpt.lm_head = nn.Linear(old.shape[1], v + n_new, bias=False, device=old.device, dtype=old.dtype)
        gpt.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(n_new, -1)], 0))
    gpt.config = dataclasses.replace(gpt.config, vocab_size=v + n_new)
    return list(range(v, v + n_new))


def truncate_layers(gpt: nn.Module, n_layer: int) -> nn.Module:
    """Keeps a causal LM's first ``n_layer`` transformer blocks, in place; the embeddings, the
    final norm and the (tied) LM head stay as they are, so the result is the same network with
    its top blocks removed (the residual stream after block K goes straight to the final norm).

    Layer pruning of pretrained LMs: Gromov et al., 2024, "The Unreasonable Ineffectiveness of
    the Deeper Layers" (sec. 3-4: the deeper half of Llama-2-70B can go with little QA loss after
    a brief LoRA "healing"), and Men et al., 2024, "ShortGPT: Layers in Large Language Models are
    More Redundant Than You Expect" (sec. 3: removing the blocks of least Block Influence). Here
    the kept blocks are simply the first K (their embeddings and early features are what a short
    answer needs), which makes a VLM's training step about K / n_layer of the full decoder's.
    Returns ``gpt`` with ``config.n_layer == n_layer``."""
    blocks = getattr(gpt, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(gpt.config, "n_layer"):
        raise ValueError(f"{type(gpt).__name__} has no ``blocks`` list to truncate (need a GPT-family decoder)")
    if not 1 <= n_layer <= len(blocks):
        raise ValueError(f"can keep 1 to {len(blocks)} decoder blocks, got {n_layer}")
    gpt.blocks = nn.ModuleList(list(blocks)[:n_layer])
    name = gpt.config.name if n_layer == len(blocks) else f"{gpt.config.name} (first {n_layer} of {len(blocks)} blocks)"
    gpt.config = dataclasses.replace(gpt.config, n_layer=n_layer, name=name)
    return gpt


# Image towers for small synthetic images, trained from scratch inside the VLM (``--vision NAME``).
# vit-nano-conv64: 64 px in, Xiao et al.'s (2021) convolutional stem (four stride-2 3x3 convs:
# 64 -> 4 px, as train-vqa's ResNet stem) then 2 narrow blocks over the 4x4 grid: easy-VQA's
# shapes and colours need locality more than depth, and the stem lets a fresh tower learn them in
# minutes. ``pixel_shuffle=1`` gives the decoder 16 image tokens.
TOWER_PRESETS: dict[str, dict[str, Any]] = {
    "vit-nano-conv64": dict(name="vit-nano-conv64", image_size=64, patch_size=16, n_embd=128, n_layer=2, n_head=4,
                            intermediate_size=256, pool="mean", class_token=False, stem="conv",
                            stem_channels=(32, 64, 128, 128), stem_strides=(2, 2, 2, 2), norm_eps=1e-6,
                            image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), resample="bilinear",
                            resize_mode="square"),
}


def vision_config(name: str, **overrides) -> ConfigBase:
    """A tower config by name: a ViT preset (``ViTConfig.presets``) or one of ``TOWER_PRESETS``."""
    from .vit import ViTConfig

    if name in ViTConfig.presets:
        return ViTConfig.from_preset(name, **{"num_labels": 0, **overrides})
    if name in TOWER_PRESETS:
        return ViTConfig(**{**TOWER_PRESETS[name], "num_labels": 0, **overrides})
    raise ValueError(f"{name!r} is not a tower preset ({', '.join(sorted({*ViTConfig.presets, *TOWER_PRESETS}))})")


def vlm_from_smollm2(vision: str | dict | ConfigBase = "vit-nano-cifar", *, path=None, pixel_shuffle: int = 1,
                     projector: str = "mlp", image_token_id: int | str | None = SMOLLM2_IMAGE_TOKEN_ID,
                     freeze_decoder: bool = True, freeze_vision: bool = False, lora_rank: int = 0,
                     decoder_layers: int = 0, vision_model: nn.Module | None = None, **vision_overrides):
    """A VLM whose decoder is SmolLM2-135M-Instruct with its real weights (``polymodal.load(path)``).

    The image placeholder: by default the id of ``<empty_output>`` (16), an unused special token of
    SmolLM2's vocabulary, so the decoder's weights and vocabulary stay exactly as loaded (its
    embedding row is never read: placeholders are overwritten by image features, and its logit is
    suppressed). ``image_token_id=None`` instead appends a new row to the embedding / LM head
    (vocab 49152 -> 49153); ``"auto"`` uses id 16 when the tokenizer names it ``<empty_output>``
    and a new row otherwise (any other decoder given by ``path``). ``vision``: a tower preset name
    (``vision_config``), a config dict/object, or pass a ready ``vision_model`` (e.g. a pretrained
    CLIP image tower) with its config as ``vision``. ``decoder_layers=K`` keeps only the decoder's
    first K blocks (``truncate_layers``; 0 = all), with the real embeddings, final norm, tied head
    and tokenizer.
    Returns ``(vlm, tokenizer)``."""
    from ..interop import load

    decoder, tokenizer = load(path)
    if decoder_layers:
        truncate_layers(decoder, decoder_layers)
    if image_token_id == "auto":  # SmolLM2's unused special token where the vocabulary has it, else a new row
        has = tokenizer is not None and tokenizer.id_to_token(SMOLLM2_IMAGE_TOKEN_ID) == "<empty_output>"
        image_token_id = SMOLLM2_IMAGE_TOKEN_ID if has else None
    if image_token_id is None:
        image_token_id = extend_vocab(decoder, 1)[0]
    if isinstance(vision, str):
        vcfg = vision_config(vision, **vision_overrides)
    else:
        vcfg = _sub_config(vision, "vit")
    cfg = VLMConfig(name="smollm2-vlm", vision=vcfg, decoder=decoder.config, projector=projector,
                    pixel_shuffle=pixel_shuffle, image_token_id=image_token_id)
    vlm = VLM(cfg, vision=vision_model, decoder=decoder)
    vlm.freeze(vision=freeze_vision, decoder=freeze_decoder)
    if lora_rank:
        vlm.add_lora(r=lora_rank, alpha=2.0 * lora_rank)
    return vlm, tokenizer


# -- assembly from presets and checkpoints (``polymodal train-vlm``) ------------------------
LORA_ATTN = ("blocks.*.attn.qkv", "blocks.*.attn.proj")  # VLM.add_lora's default targets
LORA_MLP = ("blocks.*.mlp.fc", "blocks.*.mlp.proj")


def load_vision_tower(spec: str):
    """(tower module or None, ViT config, pretrained?) from a tower preset name or a checkpoint
    (a run folder too): a polymodal / Hugging Face CLIP (its image tower), a ViT, or a VLM (its tower)."""
    from pathlib import Path

    from .vit import ViTConfig

    if Path(spec).exists():
        from ..interop import load

        model, _ = load(spec)
        family = getattr(model.config, "family", None)
        if family in ("clip", "vlm"):
            tower = model.vision
        elif family == "vit":
            tower = model
        else:
            raise ValueError(f"{spec}: --vision needs a CLIP, ViT or VLM checkpoint, got family {family!r}")
        if not isinstance(tower.config, ViTConfig):
            raise ValueError(f"{spec}: the image tower is a {tower.config.family!r}, which has no patch grid; "
                             "the VLM needs a ViT tower")
        return tower, tower.config, True
    if spec in ViTConfig.presets or spec in TOWER_PRESETS:
        return None, vision_config(spec), False
    raise ValueError(f"--vision {spec!r}: not an existing checkpoint path nor a tower preset "
                     f"({', '.join(sorted({*ViTConfig.presets, *TOWER_PRESETS}))})")


def parse_decoder(spec: str) -> tuple[str | None, int]:
    """``--decoder`` -> (checkpoint path or None for SmolLM2, blocks to keep or 0 for all).

    ``smollm2`` is SmolLM2-135M-Instruct's real weights; ``smollm2:K`` (or ``PATH:K``) keeps only
    their first K transformer blocks (:func:`truncate_layers`)."""
    from pathlib import Path

    name, layers = spec, 0
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and not Path(spec).exists():
        name, layers = head, int(tail)
        if layers < 1:
            raise ValueError(f"--decoder {spec!r}: keep at least one block (NAME:K with K >= 1)")
    return (None if name in ("smollm2", "default", "") else name), layers


def build_vlm(vision: str, decoder: str = "smollm2", pixel_shuffle: int = 2, projector: str = "mlp",
              train_vision: bool | None = None):
    """(VLM, tokenizer, tower_frozen): the decoder frozen, the projector trainable, the tower frozen
    when pretrained (or ``train_vision=False``) and trainable when freshly initialised.
    ``decoder``: see :func:`parse_decoder` (``smollm2:K`` = SmolLM2's first K blocks)."""
    tower, vcfg, pretrained = load_vision_tower(vision)
    frozen = pretrained if train_vision is None else not train_vision
    path, layers = parse_decoder(decoder)
    vlm, tok = vlm_from_smollm2(vcfg, path=path, pixel_shuffle=pixel_shuffle, projector=projector,
                                image_token_id="auto", freeze_decoder=True, freeze_vision=frozen,
                                decoder_layers=layers, vision_model=tower)
    if tok is None:
        raise ValueError(f"{decoder}: the decoder checkpoint has no tokenizer")
    return vlm, tok, frozen


VLMConfig.presets["vlm-nano"] = {}
