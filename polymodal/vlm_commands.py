"""Generative VLM commands: ``train-vlm``, ``caption``, ``eval-caption``; ``answer_question``
for ``polymodal vqa`` on VLM checkpoints.

Training follows LLaVA's two stages (Liu et al., 2023, "Visual Instruction Tuning", sec. 4.2):

* stage 1, feature alignment: the image tower and the decoder are frozen and only the
  projector W learns, with the next-token loss on image-caption pairs (a caption is the
  answer to the image);
* stage 2, instruction tuning: starting from stage 1 (``--init``), the projector keeps
  training and the decoder gets LoRA adapters (Hu et al., 2021; ``--lora``), on question /
  answer pairs (easy-VQA, DAQUAR, VQAv2 through ``polymodal.data.vqa``). Without ``--init``
  it builds a fresh model from ``--vision``: a tower preset then trains from scratch with the
  projector (synthetic images such as easy-VQA's need no captions first), and
  ``--decoder smollm2:K`` keeps only SmolLM2's first K blocks to make each step cheap.

Both stages compute the loss on the target tokens only (the caption or the answer and the
end-of-turn token; LLaVA eq. 3): the prompt and the image placeholders carry label -100.

With a frozen tower the image features Z_v = g(X_v) never change, so they are computed once
per image (``--views`` of them: the plain centre crop and random crops / flips) and the tower
drops out of the training step, whose cost is then the decoder's forward and backward.

Run folder (``--out``): ``model/`` (the model with the lowest validation loss, a polymodal
checkpoint with the tokenizer, LoRA merged), ``metrics.jsonl`` and ``loss.png`` (train and
val loss), ``summary.json``, and ``resume/`` (trainable weights, optimiser and RNG state for
``--resume``). Every command taking ``--model`` accepts the run folder or ``model/``.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import torch

from .data.images import load_images

DEFAULT_DATA = "../shared/data/flickr8k"
LORA_ATTN = ("blocks.*.attn.qkv", "blocks.*.attn.proj")  # VLM.add_lora's default targets
LORA_MLP = ("blocks.*.mlp.fc", "blocks.*.mlp.proj")


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
def _has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end a generated caption / answer: the chat template's end of turn and EOS."""
    from .chat import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def _end_id(tokenizer, chat: bool) -> int:
    """The token a training target ends with: end of turn in a chat, else EOS."""
    ids = stop_ids(tokenizer)
    if not chat and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    if not ids:
        raise ValueError("the tokenizer has neither an end-of-turn nor an EOS token to end a caption with")
    return ids[0]


def caption_prompt_ids(model, tokenizer) -> list[int]:
    """The caption prompt of ``model.config`` (``caption_prompt``, chat-wrapped when ``caption_chat``
    and the tokenizer has a template; else after BOS), image placeholders expanded."""
    c = model.config
    chat = c.caption_chat and _has_chat(tokenizer)
    ids = model.prompt_ids(tokenizer, c.caption_prompt, chat=chat)
    return ids if chat or tokenizer.bos_id is None else [tokenizer.bos_id] + ids


def _vqa_chat(model, tokenizer) -> bool:
    return getattr(model.config, "vqa_chat", True) and _has_chat(tokenizer)


def question_prompt_ids(model, tokenizer, question: str) -> list[int]:
    """``config.vqa_prompt`` with the question, as a chat user turn when ``config.vqa_chat`` and the
    tokenizer has a template (else after BOS)."""
    text = model.config.vqa_prompt.replace("{question}", question.strip())  # not format(): a question may hold braces
    chat = _vqa_chat(model, tokenizer)
    ids = model.prompt_ids(tokenizer, text, chat=chat)
    return ids if chat or tokenizer.bos_id is None else [tokenizer.bos_id] + ids


def _target_ids(tokenizer, text: str, chat: bool) -> list[int]:
    return tokenizer.encode(text) + [_end_id(tokenizer, chat)]


def clean_caption(text: str) -> str:
    """Flickr8k's captions are pre-tokenized ("A dog runs .", "dog 's"); the decoder learns
    ordinary text, which the PTB tokenizer of the metrics splits back the same way."""
    s = " ".join(text.split())
    for a, b in ((" .", "."), (" ,", ","), (" 's", "'s"), (" n't", "n't"), (" !", "!"), (" ?", "?")):
        s = s.replace(a, b)
    return s


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """A train-vlm run folder means its ``model/`` checkpoint; any other folder is itself."""
    p = Path(path)
    return p / "model" if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file() else p


def load_vlm(path: str | Path, device: str = "cpu"):
    """(VLM, tokenizer, image processor) of a VLM checkpoint or train-vlm run folder."""
    from .data.images import ImageProcessor
    from .interop import load

    p = resolve_model_dir(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder")
    model, tok = load(p, device=device)
    if getattr(model.config, "family", None) != "vlm":
        raise ValueError(f"{p}: not a generative VLM checkpoint (family {getattr(model.config, 'family', '?')!r})")
    if tok is None:
        raise ValueError(f"{p}: the checkpoint has no tokenizer (tokenizer.json)")
    return model.eval(), tok, ImageProcessor.from_config(model.config)


def load_vision_tower(spec: str):
    """(tower module or None, ViT config, pretrained?) from a ViT preset name or a checkpoint:
    a polymodal / Hugging Face CLIP (its image tower), a ViT, or a VLM (its tower)."""
    from .models.vit import ViTConfig
    from .models.vlm import TOWER_PRESETS, vision_config

    path = Path(spec)
    if path.exists():
        from .interop import load

        model, _ = load(resolve_model_dir(path))
        family = getattr(model.config, "family", None)
        if family in ("clip", "vlm"):
            tower = model.vision
        elif family == "vit":
            tower = model
        else:
            raise ValueError(f"{path}: --vision needs a CLIP, ViT or VLM checkpoint, got family {family!r}")
        if not isinstance(tower.config, ViTConfig):
            raise ValueError(f"{path}: the image tower is a {tower.config.family!r}, which has no patch grid; "
                             "the VLM needs a ViT tower")
        return tower, tower.config, True
    if spec in ViTConfig.presets or spec in TOWER_PRESETS:
        return None, vision_config(spec), False
    raise ValueError(f"--vision {spec!r}: not an existing checkpoint path nor a ViT preset "
                     f"({', '.join(sorted({*ViTConfig.presets, *TOWER_PRESETS}))})")


def parse_decoder(spec: str) -> tuple[str | None, int]:
    """``--decoder`` -> (checkpoint path or None for SmolLM2, blocks to keep or 0 for all).

    ``smollm2`` is SmolLM2-135M-Instruct's real weights; ``smollm2:K`` (or ``PATH:K``) keeps only
    their first K transformer blocks (``polymodal.models.vlm.truncate_layers``)."""
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
    ``decoder``: see ``parse_decoder`` (``smollm2:K`` = SmolLM2's first K blocks)."""
    from .models.vlm import vlm_from_smollm2

    tower, vcfg, pretrained = load_vision_tower(vision)
    frozen = pretrained if train_vision is None else not train_vision
    path, layers = parse_decoder(decoder)
    vlm, tok = vlm_from_smollm2(vcfg, path=path, pixel_shuffle=pixel_shuffle, projector=projector,
                                image_token_id="auto", freeze_decoder=True, freeze_vision=frozen,
                                decoder_layers=layers, vision_model=tower)
    if tok is None:
        raise ValueError(f"{decoder}: the decoder checkpoint has no tokenizer")
    return vlm, tok, frozen


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
class _Images:
    """The images of one split, loaded once; with a frozen tower, their patch features for
    ``views`` views (view 0 = the evaluation crop, the others random crops / flips)."""

    def __init__(self, paths: Sequence[Path], processor, model, frozen: bool, views: int,
                 generator: torch.Generator, skip_bad: bool = False, progress: bool = True, desc: str = "images"):
        from tqdm import tqdm

        from .data.captions import CaptionDataset, ImageCaptions

        self.data = CaptionDataset([ImageCaptions(Path(p), []) for p in paths], processor, skip_bad=skip_bad)
        self.index = {str(r.image): i for i, r in enumerate(self.data.records)}
        self.features = None
        if frozen:
            n, bs = len(self.data), 64
            chunks = []
            model.vision.eval()
            with torch.no_grad():
                for s in tqdm(range(0, n, bs), desc=f"features ({desc}, {views} view{'s' * (views > 1)})",
                              disable=not progress, dynamic_ncols=True):
                    idx = list(range(s, min(s + bs, n)))
                    ims = [self.data.images[i] for i in idx]
                    per_view = [model.vision_features(self.data.pixels(idx))]
                    per_view += [model.vision_features(processor.train(ims, generator)) for _ in range(views - 1)]
                    # bf16 halves the memory; the projector sees ~0.4% rounding, far below the crop noise
                    chunks.append(torch.stack(per_view, 1).to(torch.bfloat16))
            self.features = torch.cat(chunks)  # (N, views, P, D_v)

    def inputs(self, idx: Sequence[int], generator: torch.Generator, augment: bool) -> dict:
        """Model keyword arguments for these images: ``image_features`` or ``pixel_values``."""
        if self.features is not None:
            v = self.features.shape[1]
            views = (torch.randint(v, (len(idx),), generator=generator) if augment and v > 1
                     else torch.zeros(len(idx), dtype=torch.long))
            return {"image_features": self.features[torch.tensor(idx), views].float()}
        ims = [self.data.images[i] for i in idx]
        return {"pixel_values": self.data.processor.train(ims, generator) if augment else self.data.pixels(idx)}


def _caption_samples(records, images: _Images, prompt: list[int], tokenizer, chat: bool):
    out = []
    for r in records:
        i = images.index.get(str(r.image))
        if i is None:  # skipped unreadable image
            continue
        out += [(i, prompt, _target_ids(tokenizer, clean_caption(c), chat)) for c in r.captions]
    return out


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (first on ties): VQAv2's ten human answers -> one target."""
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


def _vqa_samples(examples, images: _Images, model, tokenizer):
    chat = _vqa_chat(model, tokenizer)
    out = []
    for e in examples:
        i = images.index.get(str(e.image))
        if i is not None:
            out.append((i, question_prompt_ids(model, tokenizer, e.question),
                        _target_ids(tokenizer, majority_answer(e.answers), chat)))
    return out


def _collate(samples, pad: int, block_size: int):
    """Right-padded (ids, labels): labels -100 on the prompt and the padding. Right padding keeps
    every real token's position, and causality hides the pads, so no attention mask is needed."""
    rows = [(p + t)[:block_size] for _, p, t in samples]
    t_max = max(map(len, rows))
    ids = torch.full((len(rows), t_max), pad, dtype=torch.long)
    labels = torch.full((len(rows), t_max), -100, dtype=torch.long)
    for r, ((_, p, _t), row) in enumerate(zip(samples, rows)):
        ids[r, :len(row)] = torch.tensor(row)
        labels[r, len(p):len(row)] = torch.tensor(row[len(p):])
    return ids, labels


# ---------------------------------------------------------------------------------------
# train-vlm
# ---------------------------------------------------------------------------------------
def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_vlm(data: str = DEFAULT_DATA, out: str = "runs/vlm", stage: Literal[1, 2] = 1,
              vision: str | None = None, decoder: str = "smollm2", init: str | None = None,
              val_data: str | None = None, image_root: str | None = None, pixel_shuffle: int = 2,
              projector: Literal["mlp", "linear"] = "mlp", train_vision: bool | None = None, lora: int = 0,
              lora_mlp: bool = False, train_decoder: bool = False,
              caption_prompt: str | None = None, caption_chat: bool | None = None, vqa_prompt: str | None = None,
              vqa_chat: bool | None = None, views: int = 0, crop_scale: float = 0.5, flip: bool | None = None,
              batch_size: int = 16, lr: float = 1e-3, lora_lr: float | None = None, weight_decay: float = 0.0,
              warmup: int = 30, max_steps: int = 2000, minutes: float = 0.0, eval_every: int = 100,
              val_samples: int = 64, limit: int = 0, log_every: int = 10, seed: int = 0, threads: int = 0,
              resume: bool = False, skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Train a LLaVA-style VLM: stage 1 aligns the projector on captions, stage 2 tunes on VQA.

    Args:
        data: stage 1: Flickr8k-format folder or COCO-captions .json; stage 2: easy-VQA/DAQUAR folder or VQAv2 .json.
        out: run folder (model/ = the best checkpoint, metrics.jsonl, loss.png, summary.json, resume/).
        stage: 1 (captions, projector only) or 2 (VQA, projector + LoRA; from --init, or a fresh model from --vision).
        vision: image tower: a tower preset (trained from scratch; default vit-nano-cifar) or a CLIP / ViT / VLM checkpoint (its tower, frozen).
        decoder: smollm2 (SmolLM2-135M-Instruct, real weights), smollm2:K (its first K blocks only) or a causal-LM checkpoint; frozen but for LoRA.
        init: a VLM checkpoint or run folder to start from (stage 2: the stage-1 run); replaces --vision/--decoder.
        val_data: validation data (default: the val split of --data where it has one).
        image_root: image folder of a COCO / VQAv2 JSON.
        pixel_shuffle: fold r x r patch tokens into one image token (must divide the tower's patch grid).
        projector: mlp (LLaVA-1.5) or linear (LLaVA-1).
        train_vision: train the tower (default: only a fresh one); a frozen tower's features are computed once.
        lora: LoRA rank on the decoder's attention (0 = none); stage 2 usually 8.
        lora_mlp: LoRA on the decoder's MLPs too (what a truncated decoder needs to relearn its upper computation).
        train_decoder: train every decoder weight instead (a small decoder; LLaVA's stage 2 tunes the whole LLM).
        caption_prompt: stage 1 prompt text with <image> (default: the model config's, '<image>').
        caption_chat: wrap the caption prompt in the chat template (default: the model config's, off).
        vqa_prompt: stage 2 prompt text with <image> and {question} (default: the model config's, LLaVA-1.5's).
        vqa_chat: wrap the VQA prompt in the chat template (default: the model config's, on); off: BOS + prompt, fewer tokens.
        views: precomputed views per image, frozen tower (0 = 4 for captions, 1 for VQA: no flips of left/right).
        crop_scale: smallest area fraction of a random training crop (1 = whole images, no crops).
        flip: random horizontal flips (default: captions yes, VQA no; easy-VQA never says left or right).
        batch_size: sequences per step.
        lr: projector (and tower) learning rate, linear warm-up then cosine to 0.
        lora_lr: LoRA learning rate (default: lr).
        weight_decay: AdamW weight decay (LLaVA uses none).
        warmup: linear warm-up steps.
        max_steps: the most optimiser steps.
        minutes: training time budget (0 = none); the cosine ends when it runs out.
        eval_every: steps between validation-loss evaluations and resumable checkpoints.
        val_samples: validation sequences per evaluation (fixed, each val image's first caption first); stage 2 also logs their answer accuracy.
        limit: use only the first N training images (stage 1) or questions (stage 2); 0 = all.
        log_every: steps per train-loss record in metrics.jsonl (the mean over them).
        seed: seeds the initialisation, the batches and the augmented views.
        threads: torch CPU threads (0 = torch's default).
        resume: continue the run in --out from its last checkpoint (same arguments).
        skip_bad_images: warn and skip unreadable images instead of stopping.
        progress: show progress bars and the final summary.
    """
    from tqdm import tqdm

    from .data.images import ImageProcessor
    from .models.registry import save_model
    from .nn.lora import merge_lora
    from .train.checkpoint import capture_rng, restore_rng, save_checkpoint
    from .train.checkpoint import resume as resume_checkpoint
    from .train.loop import plot_losses

    if threads:
        torch.set_num_threads(threads)
    if stage not in (1, 2):
        raise ValueError(f"--stage must be 1 or 2, got {stage}")
    if stage == 2 and not init and vision is None:
        raise ValueError("stage 2 starts from a stage-1 model (--init <stage-1 run or checkpoint>) or builds a fresh "
                         "one: pass --vision <tower preset or checkpoint> (a fresh tower trains with the projector)")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")
    torch.manual_seed(seed)
    out_dir = Path(out)
    resume_dir = out_dir / "resume"
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise ValueError(f"{out_dir} already holds a run (metrics.jsonl); pass --resume to continue it or "
                         "choose another --out")

    # -- model ----------------------------------------------------------------------------
    if init:
        vlm, tok, _ = load_vlm(init)
        frozen = not bool(train_vision)
        vlm.freeze(vision=frozen, decoder=True, projector=False)
    else:
        vlm, tok, frozen = build_vlm(vision or "vit-nano-cifar", decoder, pixel_shuffle, projector, train_vision)
    cfg = vlm.config
    if caption_prompt is not None:
        if cfg.image_token not in caption_prompt:
            raise ValueError(f"--caption-prompt must contain the image placeholder {cfg.image_token!r}")
        cfg.caption_prompt = caption_prompt
    if caption_chat is not None:
        cfg.caption_chat = caption_chat
    if vqa_prompt is not None:
        if cfg.image_token not in vqa_prompt or "{question}" not in vqa_prompt:
            raise ValueError(f"--vqa-prompt must contain the image placeholder {cfg.image_token!r} and '{{question}}'")
        cfg.vqa_prompt = vqa_prompt
    if vqa_chat is not None:
        cfg.vqa_chat = vqa_chat
    if lora and train_decoder:
        raise ValueError("choose --lora (adapters on a frozen decoder) or --train-decoder (every weight), not both")
    if lora_mlp and not lora:
        raise ValueError("--lora-mlp adds MLP adapters to --lora's: give a --lora rank")
    if lora:  # adapters on the decoder's attention (and MLPs); the rest of the decoder stays frozen
        vlm.add_lora(r=lora, alpha=2.0 * lora, targets=LORA_ATTN + (LORA_MLP if lora_mlp else ()))
    if train_decoder:
        for p in vlm.decoder.parameters():
            p.requires_grad_(True)
    params = _trainable(vlm)
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    # A trained tower's BatchNorm statistics (conv stem) belong with its weights: the best copy,
    # the resume checkpoint and the saved model all take them together.
    tower_sd = set(vlm.vision.state_dict())
    tracked = {**params, **({} if frozen else {f"vision.{n}": b for n, b in vlm.vision.named_buffers()
                                               if n in tower_sd})}

    # -- data -----------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(seed)
    proc = ImageProcessor.from_config(cfg)
    proc.crop_scale = (crop_scale, 1.0)  # captions and questions describe the whole scene: keep most of it
    proc.hflip = (stage == 1) if flip is None else flip  # VQA: "on the left" must stay on the left
    augment = crop_scale < 1 or proc.hflip
    if stage == 1:
        from .data.captions import load_captions

        records = load_captions(data, "train", image_root)
        records = records[:limit] if limit else records
        if val_data is None and Path(data).is_dir():
            val_data = data
        val_records = load_captions(val_data, "val", image_root) if val_data else []
        views = views or 4
        train_paths = [r.image for r in records]
        val_paths = [r.image for r in val_records]
    else:
        from .data.vqa import load_vqa

        examples = load_vqa(data, "train", image_root)
        examples = examples[:limit] if limit else examples
        val_examples = []
        try:
            val_examples = load_vqa(val_data or data, "val", image_root)
        except FileNotFoundError:
            if val_data:
                raise
        views = views or 1
        train_paths = list(dict.fromkeys(e.image for e in examples))
        vg = torch.Generator().manual_seed(seed + 1)
        val_examples = [val_examples[i] for i in torch.randperm(len(val_examples), generator=vg)[:val_samples]]
        val_paths = list(dict.fromkeys(e.image for e in val_examples))
    if not train_paths:
        raise ValueError(f"{data}: no training examples")
    train_images = _Images(train_paths, proc, vlm, frozen, views, gen, skip_bad_images, progress, "train")
    val_images = (_Images(val_paths, proc, vlm, frozen, 1, gen, skip_bad_images, progress, "val")
                  if val_paths else None)
    chat = cfg.caption_chat and _has_chat(tok)
    if stage == 1:
        prompt = caption_prompt_ids(vlm, tok)
        samples = _caption_samples(records, train_images, prompt, tok, chat)
        val_samples_l = []
        if val_images is not None:  # each image's first caption, then the second ... (fixed set)
            per_image = [_caption_samples([r], val_images, prompt, tok, chat) for r in val_records]
            for k in range(5):
                val_samples_l += [s[k] for s in per_image if len(s) > k]
    else:
        samples = _vqa_samples(examples, train_images, vlm, tok)
        val_samples_l = _vqa_samples(val_examples, val_images, vlm, tok) if val_images is not None else []
    val_set = val_samples_l[:val_samples]
    if not samples:
        raise ValueError(f"{data}: no usable training examples")
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id != cfg.image_token_id else _end_id(tok, chat)
    block = cfg.block_size

    # -- optimiser -----------------------------------------------------------------------
    lora_ps = [p for n, p in params.items() if "lora_" in n]
    other = [p for n, p in params.items() if "lora_" not in n]
    groups = [{"params": other, "lr": lr, "base_lr": lr}]
    if lora_ps:
        groups.append({"params": lora_ps, "lr": lora_lr or lr, "base_lr": lora_lr or lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.999))
    budget = 60.0 * minutes

    state = {"step": 0, "elapsed": 0.0, "best_val": math.inf, "best_step": None, "best_accuracy": None,
             "order": [], "pos": 0, "history": []}
    best: dict[str, torch.Tensor] | None = None
    if resume:
        ck = resume_checkpoint(resume_dir)
        missing = set(tracked) - set(ck.model_sd)
        if missing:
            raise ValueError(f"{ck.folder}: no weights for {sorted(missing)[:3]}; resume with the run's arguments")
        with torch.no_grad():
            for n, p in tracked.items():
                p.copy_(ck.model_sd[n])
        best = {n[5:]: t for n, t in ck.model_sd.items() if n.startswith("best.")} or None
        opt.load_state_dict(ck.optimizer_sd)
        for g in opt.param_groups:  # the schedule sets lr from base_lr; keep this run's base
            g["base_lr"] = lr if g is opt.param_groups[0] else (lora_lr or lr)
        state.update({k: ck.trainer_state[k] for k in state if k in ck.trainer_state})
        restore_rng(*ck.rng[0], data_generator=gen)
        # records written after that checkpoint belong to steps that will run again
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["history"]))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        if budget:  # whichever runs out first, steps or time, ends the cosine at 0
            frac = max(frac, elapsed() / budget)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    t0 = time.perf_counter()

    def elapsed() -> float:
        return state["elapsed"] + time.perf_counter() - t0

    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(rec: dict) -> None:
        state["history"].append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    @torch.no_grad()
    def val_loss() -> tuple[float | None, float | None]:
        """(mean target-token loss, answer accuracy) on the fixed val set. The accuracy is
        teacher-forced exact match: a row counts when every target token (the answer and its
        end token) is the argmax, which is when greedy decoding writes exactly that answer."""
        if not val_set:
            return None, None
        vlm.eval()
        total, count, right = 0.0, 0, 0
        for s in range(0, len(val_set), batch_size):
            chunk = val_set[s:s + batch_size]
            ids, labels = _collate(chunk, pad, block)
            logits, targets = vlm.labelled_logits(ids, labels=labels,
                                                  **val_images.inputs([c[0] for c in chunk], gen, False))
            total += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
            count += len(targets)
            keep = labels[:, 1:] != -100
            hit = torch.ones_like(keep)
            hit[keep] = logits.argmax(-1) == targets
            right += int(hit.all(-1).sum())
        vlm.train()
        if frozen:
            vlm.vision.eval()
        return total / max(count, 1), right / len(val_set)

    def trainable_copy() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in tracked.items()}

    def checkpoint() -> None:
        sd = {**{n: p.detach() for n, p in tracked.items()}, **{f"best.{n}": t for n, t in (best or {}).items()}}
        save_checkpoint(resume_dir, step=state["step"], model_config=cfg, model_sd=sd, optimizer_sd=opt.state_dict(),
                        trainer_state={**state, "elapsed": elapsed()}, rng={0: capture_rng(gen)}, keep=1)

    def evaluate() -> None:
        nonlocal best
        v, acc = val_loss()
        rec = {"step": state["step"], "val_loss": v, "elapsed_s": round(elapsed(), 2)}
        if stage == 2 and acc is not None:
            rec["val_accuracy"] = acc
        log(rec)
        if v is None or v < state["best_val"]:
            if v is not None:
                state["best_val"] = v
            state["best_step"] = state["step"]
            state["best_accuracy"] = rec.get("val_accuracy")
            best = trainable_copy()
        if progress and v is not None:
            tqdm.write(f"step {state['step']}: val loss {v:.4f}" + (f", answer accuracy {100 * acc:.1f}%"
                                                                   if "val_accuracy" in rec else "")
                       + f" (best {state['best_val']:.4f} at step {state['best_step']})")

    def finish(reason: str) -> dict:
        """The best trainable weights back in, LoRA merged, the model saved atomically."""
        if best is not None:
            with torch.no_grad():
                for n, p in tracked.items():
                    p.copy_(best[n])
        merge_lora(vlm)
        vlm.freeze(vision=True, decoder=True, projector=True)
        save_model(vlm.eval(), out_dir / "model", tok)
        plot_losses(state["history"], out_dir / "loss.png")
        summary = {"stage": stage, "steps": state["step"], "seconds": round(elapsed(), 1), "stop_reason": reason,
                   "best_val_loss": None if math.isinf(state["best_val"]) else state["best_val"],
                   "best_step": state["best_step"], "best_val_accuracy": state["best_accuracy"],
                   "train_samples": len(samples), "val_samples": len(val_set),
                   "trainable_params": sum(p.numel() for p in params.values()), "frozen_tower": frozen,
                   "n_image_tokens": cfg.n_image_tokens, "model": str(out_dir / "model")}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    vlm.train()
    if frozen:
        vlm.vision.eval()
    if state["step"] == 0:
        evaluate()
    bar = tqdm(total=None if budget else max_steps, initial=state["step"], disable=not progress,
               desc=f"train-vlm stage {stage}", dynamic_ncols=True)
    reason = "max_steps"
    window: list[float] = []
    try:
        while state["step"] < max_steps:
            if budget and elapsed() >= budget:
                reason = "time budget"
                break
            if state["pos"] + batch_size > len(state["order"]):  # a new epoch
                state["order"] = torch.randperm(len(samples), generator=gen).tolist()
                state["pos"] = 0
            chunk = [samples[i] for i in state["order"][state["pos"]:state["pos"] + batch_size]]
            state["pos"] += batch_size
            ids, labels = _collate(chunk, pad, block)
            f = lr_factor(state["step"])
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            loss = vlm.loss(ids, labels=labels, **train_images.inputs([c[0] for c in chunk], gen, augment))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {state['step']}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            state["step"] += 1
            window.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr * f:.2e}")
            if state["step"] % log_every == 0:
                log({"step": state["step"], "loss": sum(window) / len(window), "lr": lr * f,
                     "elapsed_s": round(elapsed(), 2)})
                window = []
            if eval_every and state["step"] % eval_every == 0:
                evaluate()
                plot_losses(state["history"], out_dir / "loss.png")
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        summary = finish("interrupted")
        print(f"\ninterrupted at step {state['step']}; best model saved to {summary['model']}")
        raise
    bar.close()
    if window:
        log({"step": state["step"], "loss": sum(window) / len(window), "elapsed_s": round(elapsed(), 2)})
    if not any(r["step"] == state["step"] and "val_loss" in r for r in state["history"]):
        evaluate()
    checkpoint()
    summary = finish(reason)
    if progress:
        print(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------


def generate_captions(model, tokenizer, images: Sequence, beam: int = 3, max_new_tokens: int = 30,
                      no_repeat_ngram: int = 3, batch_size: int = 16, prompt: str | None = None,
                      progress: bool = False) -> list[str]:
    """One caption per image (paths or PIL images): greedy (beam=1) or beam search over the KV
    cache, with the model's caption prompt (or ``prompt``, text holding ``<image>``)."""
    from tqdm import tqdm

    from .data.images import ImageProcessor
    from .generate import generate

    proc = ImageProcessor.from_config(model.config)
    if prompt is not None:
        if model.config.image_token not in prompt:
            raise ValueError(f"--prompt must contain the image placeholder {model.config.image_token!r}")
        ids = model.prompt_ids(tokenizer, prompt, chat=_has_chat(tokenizer))
    else:
        ids = caption_prompt_ids(model, tokenizer)
    w = next(model.parameters())
    device, dtype = w.device, w.dtype
    out: list[str] = []
    for s in tqdm(range(0, len(images), batch_size), desc="caption", disable=not progress, dynamic_ncols=True):
        pil, _ = load_images(images[s:s + batch_size])
        px = proc(pil).to(device, dtype)
        gen = generate(model, [ids] * len(pil), max_new_tokens=max_new_tokens, num_beams=beam, do_sample=False,
                       temperature=0.0, no_repeat_ngram_size=no_repeat_ngram, eos_token_id=stop_ids(tokenizer),
                       pad_token_id=tokenizer.pad_id or 0, model_kwargs={"pixel_values": px})
        out += [" ".join(tokenizer.decode(g).split()) for g in gen]  # a caption is one line
    return out


def answer_questions(model, tokenizer, images: Sequence, questions: Sequence[str], max_new_tokens: int = 16,
                     batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy short answers of a VLM, one per (image, question) pair (``config.vqa_prompt``),
    ``batch_size`` pairs per ``generate`` call: prompts of different lengths are left-padded with
    an attention mask, so each answer equals the one-pair answer while the decoder's weights are
    read once per batch step instead of once per question (decode is memory-bound on CPU)."""
    from tqdm import tqdm

    from .data.images import ImageProcessor
    from .generate import generate

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


def answer_question(model, tokenizer, image_path, question: str, max_new_tokens: int = 16) -> str:
    """Greedy short answer of a VLM to a question about one image (``config.vqa_prompt``)."""
    return answer_questions(model, tokenizer, [image_path], [question], max_new_tokens)[0]


def load_references(spec: str | Path, image_root: str | Path | None = None) -> dict[str, list[str]]:
    """{image file name: captions} from a Flickr8k-format folder (every split), a COCO-captions
    .json, or a text file of ``<image>[#k]<TAB><caption>`` lines."""
    from .data.captions import load_captions

    p = Path(spec)
    refs: dict[str, list[str]] = {}
    if p.is_dir() or p.suffix.lower() == ".json":
        for r in load_captions(p, "all", image_root):
            refs.setdefault(r.image.name, []).extend(r.captions)
        return refs
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such references file or folder")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, cap = line.partition("\t")
        if not sep or not cap.strip():
            raise ValueError(f"{p}:{n}: expected '<image>[#k]<TAB><caption>', got {line[:80]!r}")
        refs.setdefault(Path(key.split("#")[0].strip()).name, []).append(cap.strip())
    return refs


def caption(model: str, image: list[str], beam: int = 3, max_new_tokens: int = 30, no_repeat_ngram: int = 3,
            out: str | None = None, references: str | None = None, prompt: str | None = None,
            batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """Caption images with a VLM (greedy or beam search); --out draws them with their captions.

    Args:
        model: a VLM checkpoint or train-vlm run folder.
        image: image files.
        beam: beam width (1 = greedy).
        max_new_tokens: the longest caption in tokens.
        no_repeat_ngram: never repeat an n-gram of this size (0 = off).
        out: write a PNG grid of the images with generated (and reference) captions.
        references: reference captions: a Flickr8k folder, a COCO-captions .json or a '<image><TAB><caption>' file.
        prompt: a prompt with <image> instead of the model's caption prompt.
        batch_size: images per generation batch.
        device: cpu, cuda, ...
    """
    if not image:
        raise ValueError("give at least one --image")
    m, tok, _ = load_vlm(model, device=device)
    caps = generate_captions(m, tok, image, beam, max_new_tokens, no_repeat_ngram, batch_size, prompt)
    refs = load_references(references) if references else {}
    rows = []
    for path, c in zip(image, caps):
        rows.append({"image": str(path), "caption": c, "references": refs.get(Path(path).name, [])})
        print(f"{path}\t{c}")
    if out:
        from .viz.caption_grid import caption_grid

        grid = caption_grid(image, caps, out, references=[r["references"] for r in rows] if refs else None)
        print(f"wrote {grid}")
    return rows


def eval_caption(model: str, data: str = DEFAULT_DATA, split: str = "val", limit: int = 0, beam: int = 3,
                 max_new_tokens: int = 30, no_repeat_ngram: int = 3, batch_size: int = 16,
                 image_root: str | None = None, out: str | None = None, grid: str | None = None,
                 meteor: bool = True, skip_bad_images: bool = False, device: str = "cpu") -> dict:
    """Caption every image of a split and score against all its references: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

    Args:
        model: a VLM checkpoint or train-vlm run folder.
        data: a Flickr8k-format folder or a COCO-captions .json.
        split: the Flickr8k split (train, val, all).
        limit: caption only the first N images (0 = all).
        beam: beam width (1 = greedy).
        max_new_tokens: the longest caption in tokens.
        no_repeat_ngram: never repeat an n-gram of this size (0 = off).
        batch_size: images per generation batch.
        image_root: image folder of a COCO-captions .json (default: beside it or its images/).
        out: the predictions + metrics JSON (default: <model>/eval-caption-<split>.json).
        grid: also draw the first 8 images with generated and reference captions to this PNG.
        meteor: compute METEOR (Java, ~10 s to start).
        skip_bad_images: warn and skip unreadable images instead of stopping.
        device: cpu, cuda, ...
    """
    from .data.captions import load_captions
    from .eval.caption_metrics import format_caption_metrics, score_captions

    m, tok, _ = load_vlm(model, device=device)
    records = load_captions(data, split, image_root)
    records = records[:limit] if limit else records
    pil, keep = load_images([r.image for r in records], skip_bad_images)
    records = [records[i] for i in keep]
    if not records:
        raise ValueError(f"{data}: no images to caption in split {split!r}")
    t = time.perf_counter()
    caps = generate_captions(m, tok, pil, beam, max_new_tokens, no_repeat_ngram, batch_size, progress=True)
    gen_s = time.perf_counter() - t
    keys = [str(r.image) for r in records]
    scores = score_captions(dict(zip(keys, caps)), {k: r.captions for k, r in zip(keys, records)},
                            meteor=None if meteor else False, per_image=True)  # None: when Java is there
    per = scores.pop("per_image")
    result = {**scores, "split": split, "beam": beam, "max_new_tokens": max_new_tokens,
              "model": str(resolve_model_dir(model)), "data": str(data), "generation_s": round(gen_s, 1),
              "predictions": [{"image": k, "caption": c, "references": r.captions, **per[k]}
                              for k, c, r in zip(keys, caps, records)]}
    print(format_caption_metrics(scores) + f"  ({len(records)} images)")
    path = Path(out) if out else Path(model) / f"eval-caption-{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if grid:
        from .viz.caption_grid import caption_grid

        n = min(8, len(records))
        caption_grid(pil[:n], caps[:n], grid, references=[r.captions for r in records[:n]],
                     notes=[f"CIDEr {per[k]['CIDEr']:.2f}" for k in keys[:n]])
        print(f"wrote {grid}")
    return result
