"""Data-parallel training: DDP and FSDP2, launched with ``torchrun``.

* DDP (Li et al., 2020, "PyTorch Distributed"): every rank holds the full model, computes the
  gradient of its slice of the global batch, and the gradients are averaged with an all-reduce
  (bucketed and overlapped with the backward pass).
* FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al., 2023, "PyTorch FSDP", the ZeRO-3
  scheme of Rajbhandari et al., 2020): parameters, gradients and optimizer state are sharded
  across ranks; each block's parameters are all-gathered just before use and its gradients
  reduce-scattered after the backward pass.

Both give the gradient of the *mean* loss over the global batch: each rank's loss is the mean
over its B / world windows and the gradients are averaged over ranks, so with equal slices
(1/world) * sum_r mean_r = mean over all B windows. Hence 2 ranks x batch B/2 equals 1 rank x B.

Backends: ``nccl`` on CUDA, ``gloo`` on CPU. Launch: ``torchrun --nproc-per-node 2 -m polymodal.cli train ...``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.world > 1


def setup(mode: str, device: str = "auto") -> DistInfo:
    """Joins the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...). Without those variables the run is single-process whatever ``mode`` says."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" or world == 1 and not dist.is_initialized():
        dev = torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistInfo("none" if world == 1 else mode, 0, 1, 0, dev)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
    return DistInfo(mode, dist.get_rank(), dist.get_world_size(), local_rank, dev)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP: wraps the model. FSDP2: shards each transformer block, then the root (which holds the
    embeddings and the tied head, so the tie survives sharding); the module stays the same object."""
    if not info.active:
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for blk in getattr(model, "blocks", []):
        fully_shard(blk)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_mean(x: float | torch.Tensor, info: DistInfo) -> float:
    if not info.active:
        return float(x)
    t = torch.as_tensor(float(x), dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / info.world


def broadcast_object(obj, info: DistInfo):
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts; a collective under FSDP."""
    if info.mode != "fsdp" or not info.active:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                    optimizer_sd: dict | None, info: DistInfo) -> None:
    """Inverse of :func:`full_state` (every rank passes the full dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optimizer_sd is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_sd, options=opts)
