"""Vision evaluation: image classification, linear probes, and ``polymodal eval``'s vision tasks.

* Image classification: accuracy and cross-entropy of a ViT classifier (``train-vit``) on a labelled
  split, optionally averaging the logits of each image and its mirror ("flip TTA").
* Linear probe (Radford et al., 2021, CLIP sec. 3.2 / appendix A.3): the frozen pooled features of an
  image tower (before the projection into the joint space for a dual encoder; before the head for a
  ViT) feed an L2-regularised multinomial logistic regression (scikit-learn, L-BFGS), whose inverse
  strength C is chosen on a stratified held-out part of the training split and then refit on all of it.
* :func:`eval_vision` is ``polymodal eval --task retrieval | image-classification``: the same numbers
  and JSON as ``eval-retrieval`` and as this module's classification evaluation.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.image_sets import ImageSet, decode_images, labelled_splits, normalize
from ..data.images import ImageProcessor

VISION_TASKS = ("retrieval", "image-classification")


# ---------------------------------------------------------------------------------------
# image classification
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def classify(model, images: ImageSet, processor: ImageProcessor, batch_size: int = 256,
             flip_tta: bool = False) -> torch.Tensor:
    """Logits (N, K), on the CPU, of a classifier ViT on decoded images; ``flip_tta`` averages them
    with the logits of the mirrored images."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = normalize(images.pixels[s:s + batch_size].to(device), processor)
        logits = model(x).float()
        if flip_tta:
            logits = 0.5 * (logits + model(x.flip(-1)).float())
        out.append(logits.cpu())
    model.train(was)
    return torch.cat(out)


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def load_classifier(path: str | Path):
    """(ViT with a head, its processor, its class names) from a checkpoint or a train-vit run folder."""
    from ..interop import resolve_model_path
    from ..models.registry import load_model

    model = load_model(resolve_model_path(path))
    if model.config.family != "vit" or getattr(model, "head", None) is None:
        raise ValueError(f"{path}: not a ViT classifier checkpoint (run 'polymodal train-vit')")
    id2label = model.config.id2label or {}
    classes = [id2label.get(str(i), str(i)) for i in range(model.config.num_labels)]
    return model, ImageProcessor.from_config(model.config), classes


def eval_image_classification(model: str, data: str, split: str = "val", batch_size: int = 256,
                              flip_tta: bool = True) -> dict:
    """Accuracy, loss and per-image predictions of a ViT classifier on a split of a labelled folder."""
    net, proc, classes = load_classifier(model)
    splits = labelled_splits(data)
    if split not in splits:
        raise ValueError(f"--split must be train or val, got {split!r}")
    images = decode_images(*splits[split], classes, proc, progress=False, desc=split)
    logits = classify(net, images, proc, batch_size, flip_tta)
    m = classification_scores(logits, images.labels)
    pred = logits.argmax(-1).tolist()
    return {"task": "image-classification", "split": split, "n_images": len(images), **m,
            "chance": 1 / len(classes), "flip_tta": flip_tta,
            "predictions": [{"image": str(p), "pred": classes[k], "label": classes[int(y)]}
                            for p, k, y in zip(images.paths, pred, images.labels)]}


# ---------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------
def evaluate_retrieval(model: str, data: str, split: str = "val", image_root: str | None = None,
                       skip_bad_images: bool = False) -> dict[str, float]:
    """R@1/5/10 both ways, mean / median rank, MRR and chance of a dual encoder on a caption set."""
    from ..data.captions import CaptionDataset, load_captions
    from ..models.dual_encoder import load_dual_encoder
    from .dual_encoder import retrieval_on

    net, tok, proc = load_dual_encoder(model)
    ds = CaptionDataset(load_captions(data, split, image_root), proc, skip_bad=skip_bad_images)
    return retrieval_on(net, tok, ds)


def eval_vision(task: str, model: str, data: str | None = None, split: str = "val", batch_size: int = 64,
                out: str | None = None) -> dict:
    """``polymodal eval`` for the vision tasks: ``retrieval`` (a dual encoder on a Flickr8k folder or
    COCO-captions JSON; what ``eval-retrieval`` prints and writes) and ``image-classification`` (a
    train-vit model, with flip TTA). Writes the metrics JSON to ``out`` (default: beside the model)."""
    from ..interop import resolve_model_path

    if task not in VISION_TASKS:
        raise ValueError(f"unknown vision task {task!r}; choose {' or '.join(VISION_TASKS)}")
    folder = resolve_model_path(model)
    if task == "retrieval":
        from .retrieval import format_metrics

        m = evaluate_retrieval(model, data or "../shared/data/flickr8k", split)
        path = Path(out) if out else folder / f"retrieval_{split}.json"
        print(format_metrics(m))
        result, metrics = m, m
    else:
        r = eval_image_classification(model, data or "../shared/data/cifar10", split, max(batch_size, 1))
        path = Path(out) if out else folder / f"image_classification_{split}.json"
        print(f"{split} accuracy {100 * r['accuracy']:.1f}% on {r['n_images']} images "
              f"(chance {100 * r['chance']:.1f}%)")
        result, metrics = r, {k: r[k] for k in ("accuracy", "loss", "chance")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return {"task": task, "split": split, "metrics": metrics, "json": str(path)}


# ---------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------
def load_image_tower(path: str | Path):
    """(tower with ``encode(pixels) -> (B, D)``, processor, kind) of a dual-encoder checkpoint (its
    image tower, before the projection: a CLIP's ViT, an ALIGN's EfficientNet), a ViT checkpoint or an
    EfficientNet (``efficientnet-lite0``: its pooled features, before the classifier)."""
    from ..interop import resolve_model_path
    from ..models.registry import load_model

    model = load_model(resolve_model_path(path))
    if hasattr(model, "encode_image") and hasattr(model, "vision"):
        return model.vision, ImageProcessor.from_config(model.config), "clip-image-tower"
    if model.config.family in ("vit", "efficientnet"):
        return model, ImageProcessor.from_config(model.config), model.config.family
    raise ValueError(f"{path}: neither a dual-encoder, a ViT nor an EfficientNet checkpoint "
                     f"(family {model.config.family!r})")


@torch.no_grad()
def tower_features(tower, images: ImageSet, processor: ImageProcessor, batch_size: int = 256) -> np.ndarray:
    """Frozen pooled features (N, D) float64 of decoded images."""
    tower.eval()
    out = [tower.encode(normalize(images.pixels[s:s + batch_size], processor)).double()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = 2000, seed: int = 0):
    """Standardised features -> L2 multinomial logistic regression (L-BFGS) with inverse strength C."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # a C far too large may stop at max_iter: still a valid point of the sweep
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        clf.fit(features, labels)
    return clf


def stratified_holdout(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A boolean mask holding out ``share`` of each class (seeded)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        held[idx[:int(round(share * len(idx)))]] = True
    if held.all() or not held.any():
        raise ValueError(f"--holdout {share} leaves no examples on one side of the C sweep")
    return held


def linear_probe_eval(model: str, data: str, c_values=None, holdout: float = 0.2, max_iter: int = 2000,
                      batch_size: int = 256, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Fits the probe (C swept on a held-out part of train, then refit on all of it); val accuracy."""
    tower, proc, kind = load_image_tower(model)
    splits = labelled_splits(data, val_fraction, seed)
    classes = sorted(set(splits["train"][1]))
    train = decode_images(*splits["train"], classes, proc, progress=False, desc="train")
    val = decode_images(*splits["val"], classes, proc, progress=False, desc="val")
    x_tr, x_val = tower_features(tower, train, proc, batch_size), tower_features(tower, val, proc, batch_size)
    y_tr, y_val = train.labels.numpy(), val.labels.numpy()
    held = stratified_holdout(y_tr, holdout, seed)
    sweep = []
    for c in [float(c) for c in (c_values or np.logspace(-3, 3, 13))]:
        clf = fit_probe(x_tr[~held], y_tr[~held], c, max_iter, seed)
        sweep.append({"C": c, "holdout_accuracy": float((clf.predict(x_tr[held]) == y_tr[held]).mean())})
    # best hold-out accuracy; ties go to the smaller C (the stronger regularisation)
    best_c = max(sweep, key=lambda r: (r["holdout_accuracy"], -r["C"]))["C"]
    acc = float((fit_probe(x_tr, y_tr, best_c, max_iter, seed).predict(x_val) == y_val).mean())
    return {"model": str(model), "tower": kind, "feature_dim": int(x_tr.shape[1]), "n_train": len(y_tr),
            "n_val": len(y_val), "n_holdout": int(held.sum()), "C": best_c, "accuracy": acc,
            "chance": 1 / len(classes), "sweep": sweep, "classes": classes}
