"""ViT and CLIP against Hugging Face transformers (the reference), both directions.

Tiny random HF checkpoints are built from a config, saved with ``save_pretrained`` and
loaded into ours (lesson 4 of DESIGN.md: parity without downloads). Tolerance: 1e-4
absolute in fp32 for hidden states, logits and embeddings. Budget: < 60 s on CPU.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.interop.hf import export_hf, load_hf_folder  # noqa: E402
from polymodal.models.clip import CLIP, CLIPConfig, contrastive_loss  # noqa: E402
from polymodal.models.registry import load_model, save_model  # noqa: E402
from polymodal.models.vit import ViT, ViTConfig  # noqa: E402

TOL = 1e-4
transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waiting on a shared, busy CPU
    (measured 15x slower with 2 threads under load); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vit_hf_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                patch_size=8, num_labels=5)
    return transformers.ViTConfig(**{**base, **kw})


def _clip_hf_config(eos_token_id=98):
    tc = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, bos_token_id=97, eos_token_id=eos_token_id, pad_token_id=1)
    vc = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
    return transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24, logit_scale_init_value=2.0)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF initialises LayerNorms to (1, 0) and some biases to 0; random values make the
    parity test sensitive to a swapped weight/bias or a missed norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, cls, kw in (("model", transformers.ViTModel, {}),
                          ("cls", transformers.ViTForImageClassification, {})):
        m = _randomise(cls(_vit_hf_config(**kw)), 1)
        path = tmp_path_factory.mktemp(f"hf_vit_{name}")
        m.save_pretrained(path)
        out[name] = (m, path)
    return out


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, eos in (("eos", 98), ("legacy", 2)):
        m = _randomise(transformers.CLIPModel(_clip_hf_config(eos)), 2)
        path = tmp_path_factory.mktemp(f"hf_clip_{name}")
        m.save_pretrained(path)
        out[name] = (m, path)
    return out


def _pixels(b=2, h=32, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- ViT
def test_vit_model_hidden_states_and_pooler_match_hf(hf_vit):
    ref, path = hf_vit["model"]
    ours = load_hf_folder(path)
    assert isinstance(ours, ViT) and ours.pooler is not None and ours.head is None
    x = _pixels()
    with torch.no_grad():
        r = ref(pixel_values=x)
        h = ours(x)
        torch.testing.assert_close(h, r.last_hidden_state, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.pool(h), r.pooler_output, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.encode(x), r.pooler_output, atol=TOL, rtol=0)


def test_vit_classifier_logits_match_hf(hf_vit):
    ref, path = hf_vit["cls"]
    ours = load_hf_folder(path)
    assert ours.config.num_labels == 5 and ours.pooler is None
    x = _pixels(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, atol=TOL, rtol=0)


def test_vit_interpolated_positions_match_hf(hf_vit):
    """Same bicubic F.interpolate on the 2-D grid as HF's interpolate_pos_encoding=True."""
    ref, path = hf_vit["model"]
    ours = load_hf_folder(path)
    x = _pixels(2, 48, 40)  # 6 x 5 patches instead of 4 x 4
    with torch.no_grad():
        h = ours(x)
        assert h.shape == (2, 1 + 6 * 5, 32)
        torch.testing.assert_close(h, ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state,
                                   atol=TOL, rtol=0)
        # the trained resolution uses the table untouched
        assert ours.interpolate_pos_encoding(4, 4) is ours.pos_embed


def test_vit_export_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    for num_labels, cls in ((7, transformers.ViTForImageClassification), (0, transformers.ViTModel)):
        cfg = ViTConfig(image_size=32, patch_size=8, n_embd=32, n_layer=2, n_head=4, intermediate_size=40,
                        num_labels=num_labels, pooler=num_labels == 0)
        ours = _randomise(ViT(cfg), 4)
        out = export_hf(ours, tmp_path / f"vit{num_labels}")
        ref = cls.from_pretrained(out).eval()
        x = _pixels(2, seed=5)
        with torch.no_grad():
            if num_labels:
                torch.testing.assert_close(ref(pixel_values=x).logits, ours(x), atol=TOL, rtol=0)
            else:
                r = ref(pixel_values=x)
                torch.testing.assert_close(r.last_hidden_state, ours(x), atol=TOL, rtol=0)
                torch.testing.assert_close(r.pooler_output, ours.encode(x), atol=TOL, rtol=0)


def test_vit_rejects_bad_pixels():
    m = ViT(ViTConfig.from_preset("vit-nano-cifar")).eval()
    with pytest.raises(ValueError, match="channels"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="patch size"):
        m(torch.zeros(1, 3, 30, 32))


def test_vit_mean_pool_trains_and_roundtrips(tmp_path):
    """The CPU preset learns a trivially separable task and survives save/load."""
    torch.manual_seed(0)
    m = ViT(ViTConfig.from_preset("vit-nano-cifar", num_labels=2))
    x = torch.randn(16, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    back = load_model(save_model(m, tmp_path / "vit"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------- CLIP
def _text_batch():
    # right padding as CLIP tokenizers produce: [BOS] tokens [EOS] [PAD]...; row 1 pads with the EOS id
    ids = torch.tensor([[97, 5, 7, 9, 98, 1, 1, 1],
                        [97, 4, 6, 8, 10, 12, 14, 98],
                        [97, 3, 98, 98, 98, 98, 98, 98]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]])
    return ids, am


@pytest.mark.parametrize("variant", ["eos", "legacy"])
def test_clip_matches_hf(hf_clip, variant):
    ref, path = hf_clip[variant]
    ours = load_hf_folder(path)
    assert isinstance(ours, CLIP) and ours.config.text.eos_token_id == (98 if variant == "eos" else 2)
    x = _pixels(2, seed=1)
    ids, am = _text_batch()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=am, pixel_values=x)
        li, lt = ours(x, ids, am)
        torch.testing.assert_close(li, r.logits_per_image, atol=TOL, rtol=0)
        torch.testing.assert_close(lt, r.logits_per_text, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.encode_image(x, normalize=True), r.image_embeds, atol=TOL, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids, am, normalize=True), r.text_embeds, atol=TOL, rtol=0)
        img = ref.get_image_features(pixel_values=x)
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        torch.testing.assert_close(ours.encode_image(x), img, atol=TOL, rtol=0)
        # token-level states at the real (unpadded) positions
        th = ref.text_model(input_ids=ids, attention_mask=am).last_hidden_state
        ours_th = ours.text.hidden_states(ids, am)
        torch.testing.assert_close(ours_th[am.bool()], th[am.bool()], atol=TOL, rtol=0)
        # vision last_hidden_state is the un-normed block output in both
        vh = ref.vision_model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours.vision.hidden_states(x), vh, atol=TOL, rtol=0)


def test_clip_left_padding_masks_keys(hf_clip):
    """Left padding takes the explicit causal+padding mask path (not SDPA's is_causal)."""
    ref, path = hf_clip["eos"]
    ours = load_hf_folder(path)
    ids = torch.tensor([[1, 1, 97, 5, 7, 98], [97, 4, 6, 8, 10, 98]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        th = ref.text_model(input_ids=ids, attention_mask=am).last_hidden_state
        torch.testing.assert_close(ours.text.hidden_states(ids, am)[am.bool()], th[am.bool()], atol=TOL, rtol=0)


def test_clip_class_token_shortcut_equals_full_pass(hf_clip):
    _, path = hf_clip["eos"]
    ours = load_hf_folder(path)
    x = _pixels(3, seed=2)
    with torch.no_grad():
        full = ours.vision.pool(ours.vision.hidden_states(x))
        torch.testing.assert_close(ours.vision.encode(x), full, atol=1e-5, rtol=0)


def test_prepacked_cpu_path_matches_and_goes_stale(hf_clip, hf_vit):
    """ViT.prepack (oneDNN blocked weights, fused bias + activation) gives the same outputs,
    is skipped when autograd is on, and is dropped once a weight changes."""
    clip = load_hf_folder(hf_clip["eos"][1])
    vit = load_hf_folder(hf_vit["model"][1])
    x = _pixels(3, seed=11)
    for model, fn in ((clip, lambda: clip.encode_image(x)), (vit, lambda: vit.encode(x))):
        with torch.no_grad():
            plain = fn()
        tower = model.vision if model is clip else model
        if not model.prepack():
            pytest.skip("this torch build has no oneDNN linear ops")
        with torch.inference_mode():
            torch.testing.assert_close(fn(), plain, atol=1e-5, rtol=0)
        assert tower._packs is not None
        with torch.no_grad():
            tower.blocks[0].mlp.fc.bias.add_(1.0)
            changed = fn()
        assert tower._packs is None  # stale packs dropped, plain path used
        with torch.no_grad():
            tower.blocks[0].mlp.fc.bias.sub_(1.0)
            torch.testing.assert_close(fn(), plain, atol=1e-6, rtol=0)
        assert not torch.allclose(changed, plain)


def test_clip_vision_model_adapter(tmp_path):
    """HF CLIPVisionModel (bare 5.x names or vision_model.* 4.x names) <-> our CLIP-shaped ViT."""
    from polymodal.interop.hf_vision import clip_vision_config_from_hf, clip_vision_config_to_hf, clip_vision_weight_map
    from polymodal.interop.weight_map import load_into

    torch.manual_seed(12)
    ref = _randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)), 13)
    cfg = clip_vision_config_from_hf(ref.config.to_dict())
    ours = ViT(cfg).eval()
    sd = ref.state_dict()
    load_into(ours, clip_vision_weight_map(cfg, set(sd)).to_ours(sd), "CLIPVisionModel")
    x = _pixels(2, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), ref(pixel_values=x).pooler_output, atol=TOL, rtol=0)
    hf_sd = clip_vision_weight_map(cfg).to_hf(ours.state_dict())
    assert all(k.startswith("vision_model.") for k in hf_sd)
    assert clip_vision_config_to_hf(cfg)["hidden_size"] == 32


def test_clip_export_loads_in_transformers(tmp_path):
    torch.manual_seed(6)
    cfg = CLIPConfig.from_preset("clip-nano")
    ours = _randomise(CLIP(cfg), 7)
    out = export_hf(ours, tmp_path / "clip", model_type="clip")
    ref = transformers.CLIPModel.from_pretrained(out).eval()
    x = _pixels(2, seed=8)
    ids = torch.tensor([[1, 50, 60, 1000, 0, 0], [1, 30, 40, 50, 60, 1000]])  # legacy eos=2: argmax pooling
    am = (torch.arange(6)[None] < torch.tensor([[4], [6]])).long()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=am, pixel_values=x)
        li, _ = ours(x, ids, am)
        torch.testing.assert_close(li, r.logits_per_image, atol=TOL, rtol=0)
    # and back into ours
    back = load_hf_folder(out)
    with torch.no_grad():
        torch.testing.assert_close(back(x, ids, am)[0], li, atol=TOL, rtol=0)


def test_clip_polymodal_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(9)
    m = CLIP(CLIPConfig.from_preset("clip-nano")).eval()
    back = load_model(save_model(m, tmp_path / "clip"))
    assert back.config.to_dict() == m.config.to_dict()
    x = _pixels(2, seed=10)
    ids = torch.randint(3, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(x, ids)[0], m(x, ids)[0], atol=0, rtol=0)


def test_contrastive_loss_goes_down():
    torch.manual_seed(0)
    m = CLIP(CLIPConfig.from_preset("clip-nano"))
    x = torch.randn(8, 3, 32, 32)
    ids = torch.randint(3, 1000, (8, 6))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = contrastive_loss(m(x, ids)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.clamp_logit_scale()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
