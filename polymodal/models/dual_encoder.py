"""Assembling a CLIP / ALIGN-style dual encoder from tower presets, and running it on texts and images.

``train-clip`` picks an image tower and a text tower; :func:`dual_encoder_recipe` turns them into a
:class:`~polymodal.models.clip.CLIPConfig` plus what the config cannot hold (the tokenizer, and the
pretrained tower weights), and :meth:`DualEncoderRecipe.build` makes a fresh model from them as many
times as needed (a training run builds it once per process, and again for a resume).

Image towers: trained from scratch, a CPU-sized ViT (as CLIP, Radford et al., 2021, sec. 2.4) or a
small residual conv net; or *pretrained*, any model that has ``encode(pixels) -> (B, D)``: the
ImageNet EfficientNet-Lite0/1/2 (``efficientnet-lite0``: ALIGN, Jia et al., 2021, is an EfficientNet
image tower with a BERT text tower), a ViT checkpoint or train-vit run, the image tower of a CLIP
checkpoint, or a preset name (random init). A pretrained tower keeps its own preprocessing (size,
resize, crop, interpolation, mean/std: its config travels into the CLIP config) and is either
locked (LiT, Zhai et al., 2022: frozen, run in eval mode, its features computed once) or tuned,
fully or only its last ``tune_blocks`` blocks (the ``lr_scale`` of its parameter group is the
Task's). Text towers: all-MiniLM-L6-v2 (locked or tuned), a small BERT-style encoder or CLIP's causal
text transformer (trained from scratch on a BPE of the captions).

The text side is read out as its tower expects: a CLIP text tower at its end-of-text token (so one is
appended and kept when truncating), an encoder tower with the tokenizer's own specials.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

IMAGE_TOWERS = ("vit", "convnet")  # trained from scratch; any other --image-tower names a pretrained tower
TEXT_TOWERS = ("minilm", "encoder", "clip_text")
RESIZABLE = ("efficientnet", "convnet")  # towers whose weights do not depend on the input size


def image_tower_config(kind: str, image_size: int, width: int, depth: int) -> dict[str, Any]:
    """A CPU-sized image tower: a pre-norm CLIP-style ViT with an 8 x 8 patch grid, or a conv net of
    ``depth`` stride-2 stages ending ``width`` wide; CLIP's preprocessing (bicubic, shortest side)."""
    from ..data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    prep = dict(image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample="bicubic",
                resize_mode="shortest", center_crop=True)
    if kind == "vit":
        patch = max(image_size // 8, 1)
        if image_size % 8:
            raise ValueError(f"--image-size {image_size} must be a multiple of 8 for the ViT tower")
        heads = max(width // 64, 1) if width % 64 == 0 else (4 if width % 4 == 0 else 1)
        return dict(family="vit", image_size=image_size, patch_size=patch, n_embd=width, n_layer=depth,
                    n_head=heads, intermediate_size=2 * width, activation="gelu", norm_eps=1e-5, pre_norm=True,
                    final_norm="pooled", pool="cls", patch_bias=False, **prep)
    if kind == "convnet":
        widths = tuple(max(8, (width >> (depth - 1 - i)) // 8 * 8) for i in range(depth))
        return dict(family="convnet", image_size=image_size, widths=widths, **prep)
    raise ValueError(f"--image-tower must be one of {', '.join(IMAGE_TOWERS)}, got {kind!r}")


@dataclass
class ImageTower:
    """A named image tower for a dual encoder: its config (without a classification head) and its
    pretrained weights (None: a preset's random init)."""

    config: Any
    state: dict[str, torch.Tensor] | None
    source: str


def _headless(config):
    """The config of a vision model without its classifier: a dual encoder projects the pooled features."""
    d = config.to_dict()
    for key, value in (("num_labels", 0), ("id2label", None), ("labels", None)):
        if key in d:
            d[key] = value
    return type(config).from_dict(d)


def _resized(config, image_size: int, pretrained: bool, spec: str):
    """``--image-size`` on a named tower: its own size when 0; a conv net takes any size (the resize
    before the centre crop keeps the tower's ratio, 256 / 224 for EfficientNet), a pretrained ViT's
    position table is sized by its training resolution, so it keeps that."""
    if not image_size or image_size == config.image_size:
        return config
    if pretrained and config.family not in RESIZABLE:
        raise ValueError(f"--image-tower {spec}: a pretrained {config.family} keeps its input size "
                         f"({config.image_size} px); leave --image-size at 0")
    d = config.to_dict()
    if d.get("resize_size"):
        d["resize_size"] = int(round(image_size * d["resize_size"] / d["image_size"]))
    d["image_size"] = image_size
    return type(config).from_dict(d)


def named_image_tower(spec: str, image_size: int = 0) -> ImageTower:
    """``--image-tower`` other than vit/convnet: a model name or folder (an alias such as
    ``efficientnet-lite0``, a ViT / EfficientNet checkpoint, a train-vit run, or a CLIP checkpoint:
    its image tower), whose model has ``encode(pixels) -> (B, D)``; or a vision preset name without
    shipped weights (``efficientnet-lite3``, ``vit-tiny-cifar``...), randomly initialised."""
    from ..interop import load
    from ..interop.aliases import ALIASES, SYNONYMS
    from .clip import build_tower
    from .efficientnet import EfficientNetConfig
    from .vit import ViTConfig

    presets = {**{n: ViTConfig for n in ViTConfig.presets}, **{n: EfficientNetConfig for n in EfficientNetConfig.presets}}
    if spec in presets and SYNONYMS.get(spec.lower(), spec.lower()) not in ALIASES and not Path(spec).exists():
        config = _resized(_headless(presets[spec].from_preset(spec)), image_size, False, spec)
        return ImageTower(config, None, f"preset {spec} (random init)")
    try:
        model = load(spec).model
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--image-tower: {e} (from scratch: {', '.join(IMAGE_TOWERS)}; presets: "
                                f"{', '.join(sorted(presets))})") from None
    tower = model.vision if hasattr(model, "encode_image") and hasattr(model, "vision") else model
    if not (hasattr(tower, "encode") and hasattr(tower, "output_dim") and hasattr(tower.config, "image_size")):
        raise ValueError(f"--image-tower {spec}: a {getattr(model.config, 'family', type(model).__name__)!r} model "
                         "is no image tower (it needs encode(pixels) -> (B, D) and output_dim)")
    config = _resized(_headless(tower.config), image_size, True, spec)
    with torch.device("meta"):
        keys = build_tower(config).state_dict().keys()  # what the headless tower holds
    sd = tower.state_dict()
    return ImageTower(config, {k: sd[k].detach().clone() for k in keys}, f"{spec} ({config.family}, pretrained)")


def caption_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on the training captions, with a pad and an end-of-text token."""
    from ..tokenizers import Tokenizer, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(list(texts), vocab_size, special_tokens=("<pad>", "<|endoftext|>"))
    return Tokenizer.from_tokenizers(bpe.backend, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", kind="bpe")


def tower_blocks(tower: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name prefix, the ModuleList of blocks) of a tower: ``blocks`` of a ViT or an EfficientNet,
    ``encoder.blocks`` of a text encoder tower."""
    for prefix in ("", "encoder."):
        owner = tower.get_submodule(prefix[:-1]) if prefix else tower
        blocks = getattr(owner, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return f"{prefix}blocks.", blocks
    raise ValueError(f"{type(tower).__name__} has no blocks to tune partially")


def freeze_tower(tower: nn.Module, tune_blocks: int = 0) -> nn.Module:
    """Freezes a pretrained tower (LiT); with ``tune_blocks`` = N > 0 its last N blocks and whatever
    follows them (EfficientNet's head conv, a final norm) stay trainable: partial fine-tuning, whose
    early layers (generic edges and textures) keep their pretrained values. A parameter that was
    already frozen (an unused pooler) stays frozen."""
    params = list(tower.named_parameters())
    was = {n: p.requires_grad for n, p in params}
    for _, p in params:
        p.requires_grad_(False)
    if tune_blocks > 0:
        prefix, blocks = tower_blocks(tower)
        first = f"{prefix}{max(len(blocks) - tune_blocks, 0)}."
        start = next(i for i, (n, _) in enumerate(params) if n.startswith(first))
        for n, p in params[start:]:
            p.requires_grad_(was[n])
    return tower


@dataclass
class DualEncoderRecipe:
    """A dual encoder's config, its tokenizer, the pretrained tower weights (or None) and how the
    pretrained towers train (locked, or tuned: all blocks, or the last ``tune_blocks``)."""

    config: Any
    tokenizer: Any
    text_state: dict[str, torch.Tensor] | None = None
    text_tower: Any = None  # the pretrained tower itself (a locked one can embed captions beforehand)
    image_state: dict[str, torch.Tensor] | None = None
    lock_image: bool = False
    tune_blocks: int = 0

    def build(self) -> nn.Module:
        """A fresh model (random towers under the caller's RNG state, the pretrained weights loaded,
        frozen what trains not)."""
        from .clip import CLIP

        model = CLIP(self.config)
        if self.text_state is not None:
            model.text.load_state_dict(self.text_state)
            if self.tune_blocks and not getattr(self.config.text, "locked", False):
                freeze_tower(model.text, self.tune_blocks)
        if self.image_state is not None:
            model.vision.load_state_dict(self.image_state)
            if self.lock_image or self.tune_blocks:
                freeze_tower(model.vision, 0 if self.lock_image else self.tune_blocks)
        return model

    @property
    def image_locked(self) -> bool:
        return self.image_state is not None and self.lock_image

    def image_tower(self) -> nn.Module:
        """The pretrained image tower alone, in eval mode (a locked one embeds the images beforehand)."""
        from .clip import build_tower

        tower = build_tower(self.config.vision)
        tower.load_state_dict(self.image_state)
        return tower.eval()

    @property
    def pretrained_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the pretrained towers (trained at the tower learning rate)."""
        return (("vision.",) if self.image_state is not None else ()) + (("text.",) if self.text_state is not None else ())


def dual_encoder_recipe(image_tower: str, text_tower: str, texts: Sequence[str], image_size: int = 0,
                        width: int = 192, depth: int = 4, text_width: int = 128, text_depth: int = 2,
                        projection_dim: int = 128, loss: str = "infonce", lock_text: bool = True,
                        lock_image: bool = True, tune_blocks: int = 0, vocab_size: int = 2048,
                        minilm: str | None = None, tokenizer=None) -> DualEncoderRecipe:
    """``image_tower``: "vit" / "convnet" (from scratch, ``image_size`` 0 = 64 px, ``width``, ``depth``)
    or a named tower (:func:`named_image_tower`; pretrained ones are locked unless ``lock_image=False``).
    ``text_tower``: "minilm" (all-MiniLM-L6-v2, locked unless ``lock_text=False``: LiT), "encoder"
    (a small BERT + BPE trained on ``texts``) or "clip_text" (a small causal CLIP text transformer +
    BPE). ``tune_blocks`` > 0: an unlocked pretrained tower trains only its last N blocks.
    ``tokenizer`` reuses a tokenizer (a resumed run's) instead of training one."""
    from .clip import CLIPConfig
    from .contrastive import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, minilm_text_tower

    if loss not in ("infonce", "siglip"):
        raise ValueError(f"--loss must be infonce or siglip, got {loss!r}")
    if tune_blocks < 0:
        raise ValueError(f"--tune-blocks must be >= 0 (0 = every block of an unlocked tower), got {tune_blocks}")
    if image_tower in IMAGE_TOWERS:
        vision, image_state, image_name = image_tower_config(image_tower, image_size or 64, width, depth), None, image_tower
    else:
        named = named_image_tower(image_tower, image_size)
        vision, image_state, image_name = named.config, named.state, named.config.name
    scale = dict(logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT) if loss == "siglip" else {}
    heads = max(text_width // 32, 1)
    tower = None
    if text_tower == "minilm":
        tower, tok = minilm_text_tower(minilm, locked=lock_text)
        text = tower.config.to_dict()
    elif text_tower in ("encoder", "clip_text"):
        tok = tokenizer if tokenizer is not None else caption_tokenizer(texts, vocab_size)
        if text_tower == "encoder":
            enc = dict(family="encoder", vocab_size=tok.vocab_size, block_size=64, n_layer=text_depth, n_head=heads,
                       n_embd=text_width, intermediate_size=2 * text_width, dropout=0.0, pooler=False,
                       pad_token_id=tok.pad_id)
            text = dict(family="encoder_tower", encoder=enc, locked=False)
        else:
            text = dict(family="clip_text", vocab_size=tok.vocab_size, block_size=64, n_embd=text_width,
                        n_layer=text_depth, n_head=heads, intermediate_size=2 * text_width, activation="gelu",
                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    else:
        raise ValueError(f"--text-tower must be one of {', '.join(TEXT_TOWERS)}, got {text_tower!r}")
    # a pretrained tower's BatchNorm keeps its ImageNet statistics: a contrastive batch's own statistics
    # would be noisy and would make each image's embedding depend on the other images of the batch
    config = CLIPConfig(name=f"{image_name}+{text_tower}", vision=vision, text=text, projection_dim=projection_dim,
                        frozen_bn=image_state is not None, **scale)
    state = {k: v.detach().clone() for k, v in tower.state_dict().items()} if tower is not None else None
    return DualEncoderRecipe(config, tok, state, tower, image_state, lock_image, tune_blocks)


def build_dual_encoder(*args, **kwargs):
    """(CLIP model, tokenizer) of :func:`dual_encoder_recipe`'s arguments."""
    recipe = dual_encoder_recipe(*args, **kwargs)
    return recipe.build(), recipe.tokenizer


# ---------------------------------------------------------------------------------------
# running a trained dual encoder
# ---------------------------------------------------------------------------------------
def load_dual_encoder(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, image processor) of a dual-encoder checkpoint: a model folder, or a
    train-clip run folder (its best model, else its newest checkpoint)."""
    from ..data.images import ImageProcessor
    from ..interop import resolve_model_path
    from ..tokenizers import Tokenizer
    from .registry import load_model

    folder = resolve_model_path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder or a training run (no config.json)")
    model = load_model(folder, device=device)
    if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
        raise ValueError(f"{path}: not a dual-encoder checkpoint (family {model.config.family!r})")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder / 'tokenizer.json'}: not found (a dual encoder needs its tokenizer)")
    return model, Tokenizer.load(folder), ImageProcessor.from_config(model.config)


def tokenize_texts(model, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask) for the text tower of ``model`` (a dual encoder or its config)."""
    text = (model.config if hasattr(model, "config") else model).text
    limit = int(getattr(text, "block_size", 77))
    rows = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=True)
        if text.family == "clip_text":  # read out at the end-of-text token: keep one last
            eos = text.eos_token_id if text.eos_token_id not in (None, 2) else tokenizer.eos_id
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
            ids = ids[:limit - 1] + [eos] if len(ids) > limit else ids
        else:
            ids = ids[:limit]
        rows.append(ids or [tokenizer.pad_id or 0])
    longest = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (n, projection_dim), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize_texts(model, tokenizer, texts[s:s + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device), normalize=True).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)


@torch.no_grad()
def encode_images(model, processor, images: Sequence | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings (n, projection_dim) of PIL images, paths, or preprocessed pixels."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        px = chunk if isinstance(chunk, torch.Tensor) else processor(list(chunk))
        out.append(model.encode_image(px.to(device), normalize=True).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.projection_dim)
