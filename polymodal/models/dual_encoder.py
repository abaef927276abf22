"""Assembling a CLIP / ALIGN-style dual encoder from tower presets, and running it on texts and images.

``train-clip`` picks an image tower (a ViT, as CLIP, Radford et al., 2021, sec. 2.4; or the small
residual conv net standing in for ALIGN's EfficientNet, Jia et al., 2021, sec. 4) and a text tower
(all-MiniLM-L6-v2, locked as in LiT, Zhai et al., 2022; a small BERT-style encoder; or CLIP's causal
text transformer), each sized by a few flags; :func:`dual_encoder_recipe` turns those into a
:class:`~polymodal.models.clip.CLIPConfig` plus what the config cannot hold (the tokenizer, and the
pretrained text weights), and :meth:`DualEncoderRecipe.build` makes a fresh model from them as many
times as needed (a training run builds it once per process, and again for a resume).

The text side is read out as its tower expects: a CLIP text tower at its end-of-text token (so one is
appended and kept when truncating), an encoder tower with the tokenizer's own specials.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

IMAGE_TOWERS = ("vit", "convnet")
TEXT_TOWERS = ("minilm", "encoder", "clip_text")


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


def caption_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on the training captions, with a pad and an end-of-text token."""
    from ..tokenizers import Tokenizer, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(list(texts), vocab_size, special_tokens=("<pad>", "<|endoftext|>"))
    return Tokenizer.from_tokenizers(bpe.backend, bos="<|endoftext|>", eos="<|endoftext|>", pad="<pad>", kind="bpe")


@dataclass
class DualEncoderRecipe:
    """A dual encoder's config, its tokenizer, and the pretrained text-tower weights (or None)."""

    config: Any
    tokenizer: Any
    text_state: dict[str, torch.Tensor] | None = None
    text_tower: Any = None  # the pretrained tower itself (a locked one can embed captions beforehand)

    def build(self) -> nn.Module:
        """A fresh model (random towers under the caller's RNG state, the pretrained text weights loaded)."""
        from .clip import CLIP

        model = CLIP(self.config)
        if self.text_state is not None:
            model.text.load_state_dict(self.text_state)
        return model


def dual_encoder_recipe(image_tower: str, text_tower: str, texts: Sequence[str], image_size: int = 64,
                        width: int = 192, depth: int = 4, text_width: int = 128, text_depth: int = 2,
                        projection_dim: int = 128, loss: str = "infonce", lock_text: bool = True,
                        vocab_size: int = 2048, minilm: str | None = None, tokenizer=None) -> DualEncoderRecipe:
    """``text_tower``: "minilm" (all-MiniLM-L6-v2, locked unless ``lock_text=False``: LiT), "encoder"
    (a small BERT + BPE trained on ``texts``) or "clip_text" (a small causal CLIP text transformer +
    BPE). ``tokenizer`` reuses a tokenizer (a resumed run's) instead of training one."""
    from .clip import CLIPConfig
    from .contrastive import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, minilm_text_tower

    if loss not in ("infonce", "siglip"):
        raise ValueError(f"--loss must be infonce or siglip, got {loss!r}")
    vision = image_tower_config(image_tower, image_size, width, depth)
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
    config = CLIPConfig(name=f"{image_tower}+{text_tower}", vision=vision, text=text, projection_dim=projection_dim,
                        **scale)
    state = {k: v.detach().clone() for k, v in tower.state_dict().items()} if tower is not None else None
    return DualEncoderRecipe(config, tok, state, tower)


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
