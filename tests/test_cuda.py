"""Every Task on CUDA, where a GPU is present (skipped otherwise): a few steps with bf16 autocast
through the one Trainer, the loss finite, the weights on the GPU, the best model exported. The
tiny tasks and data come from each Task's own test module."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from test_clip_engine import make_task as clip_task, tiny_flickr  # noqa: E402,F401 - fixtures
from test_finetune import make_task as text_task, slices, tiny_model  # noqa: E402,F401
from test_seq2seq_train import M30K, make_task as seq2seq_task  # noqa: E402
from test_vit_engine import make_task as vit_task, tiny_cifar  # noqa: E402,F401
from test_vlm_task import assets, vlm_task  # noqa: E402,F401
from test_vqa_task import tiny, vqa_task  # noqa: E402,F401
from test_train import make_shards  # noqa: E402


def _run(task, tmp_path, **kw):
    from polymodal.train.trainer import TrainArgs, Trainer

    t = Trainer(task, TrainArgs(out=str(tmp_path / "run"), device="cuda", dtype="bf16", max_steps=3, eval_every=3,
                                log_every=1, progress=False, tensorboard=False, **kw))
    s = t.fit()
    assert next(t.raw_model.parameters()).device.type == "cuda" and t.dtype == "bf16"
    t.close()
    assert math.isfinite(s["last"][task.metric]) and (tmp_path / "run" / "model").is_dir()
    return s


def test_causal_lm(tmp_path):
    from polymodal.train.tasks.causal_lm import CausalLMTask

    shards = make_shards(tmp_path / "shards", n_train=20_000)
    _run(CausalLMTask(shards, "nano", batch_size=8, block_size=32, eval_batches=2), tmp_path)


@pytest.mark.parametrize("kind", ["sst2", "conll2003", "squad"])
def test_text_tasks(slices, tiny_model, tmp_path, kind):  # noqa: F811
    _run(text_task(kind, str(tiny_model), str(slices[kind]), batch_size=8, max_length=48, max_train=48, max_val=8),
         tmp_path)


def test_mlm(tmp_path):
    from polymodal.train.tasks.mlm import MLMTask
    from test_pretrain_mlm import _task_for_ranks

    src = tmp_path / "text.txt"
    src.write_text((M30K.parent / "tiny_shakespeare" / "train.txt").read_text()[:8000])
    task = _task_for_ranks(str(src), "tiny-bert")
    assert isinstance(task, MLMTask)
    _run(task, tmp_path)


def test_seq2seq(tmp_path):
    _run(seq2seq_task(str(M30K), "t5-tiny"), tmp_path)


def test_image_classification(tiny_cifar, tmp_path):  # noqa: F811
    _run(vit_task(str(tiny_cifar)), tmp_path)


def test_contrastive(tiny_flickr, tmp_path):  # noqa: F811
    _run(clip_task(str(tiny_flickr)), tmp_path)


@pytest.mark.parametrize("arch", ["visualbert", "vilbert"])
def test_vqa(tiny, tmp_path, arch):  # noqa: F811
    _run(vqa_task(str(tiny), arch), tmp_path)


def test_vlm(assets, tmp_path):  # noqa: F811
    _run(vlm_task(str(assets)), tmp_path)
