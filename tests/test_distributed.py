"""DDP and FSDP2 on 2 CPU processes (gloo): the same result as one process on the same global batch."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_train import make_shards, nano_recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, recipe: dict, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from polymodal.train.loop import Trainer

    trainer = Trainer(recipe, out)
    trainer.fit()
    # every rank writes its full parameters (DTensor shards gathered under FSDP)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in trainer.raw_model.named_parameters()}
    from safetensors.torch import save_file

    save_file(params, str(Path(out) / f"params-rank{rank}.safetensors"))
    trainer.close()


def _losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    shards = make_shards(tmp_path_factory.mktemp("shards"), n_train=50_000)
    # one process, global batch 8 (grad_accum 2 exercises no_sync / deferred gradient sync)
    recipe = nano_recipe(shards, max_steps=3, eval_interval=3, grad_accum=2, keep_checkpoints=1)
    ref = tmp_path_factory.mktemp("single")
    from polymodal.train.loop import Trainer

    t = Trainer(recipe, ref)
    t.fit()
    ref_params = {n: p.detach().clone() for n, p in t.raw_model.named_parameters()}
    t.close()
    return recipe, _losses(ref), ref_params


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(setup, tmp_path, mode):
    from safetensors.torch import load_file

    recipe, ref_losses, ref_params = setup
    recipe = {**recipe, "distributed": mode}
    mp.spawn(_worker, args=(2, _free_port(), recipe, str(tmp_path)), nprocs=2, join=True)
    losses = _losses(tmp_path)
    assert len(losses) == len(ref_losses) == 3
    assert losses == pytest.approx(ref_losses, abs=1e-5, rel=0)
    p0 = load_file(str(tmp_path / "params-rank0.safetensors"))
    p1 = load_file(str(tmp_path / "params-rank1.safetensors"))
    assert p0.keys() == p1.keys() == ref_params.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k  # ranks end identical
        torch.testing.assert_close(p0[k], ref_params[k], atol=1e-5, rtol=0)
    # rank 0 wrote a checkpoint with the full (unsharded) weights, resumable by one process
    from polymodal.train.checkpoint import resume

    ck = resume(tmp_path)
    assert ck.trainer_state["world_size"] == 2 and set(ck.rng) == {0, 1}
    assert torch.equal(ck.model_sd["blocks.0.attn.qkv.weight"], p0["blocks.0.attn.qkv.weight"])
