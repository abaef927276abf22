"""Building blocks: SDPA vs the explicit reference attention for every mask kind, GQA and
additive bias; causality of every GPT preset shape; norms vs their formulas; RoPE's
relative-position property; LoRA's freezing, zero-init, merge and unmerge."""
from __future__ import annotations

import pytest
import torch

from polymodal import GPT, GPTConfig
from polymodal.nn import (Attention, LayerNorm, RMSNorm, RotaryEmbedding, apply_lora, apply_rotary, build_mask,
                          merge_lora, set_attention_impl)
from polymodal.nn.lora import LoRALinear


def _both_impls(attn: Attention, *args, **kw):
    outs = []
    for impl in ("reference", "sdpa"):
        attn.impl = impl
        with torch.no_grad():
            outs.append(attn(*args, **kw))
    return outs


def _key_valid(b, s, n_pad):
    kv = torch.ones(b, s, dtype=torch.bool)
    for i, n in enumerate(n_pad):
        kv[i, :n] = False  # left padding
    return kv


# -- attention: reference path == SDPA path ------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("kind", ["causal", "causal-kernel", "local", "bidirectional"])
def test_reference_equals_sdpa_self_attention(kind, n_kv_head):
    torch.manual_seed(0)
    b, t, dim = 3, 10, 32
    attn = Attention(dim, n_head=4, n_kv_head=n_kv_head).eval()
    x = torch.randn(b, t, dim)
    slots = torch.arange(t)
    kv = _key_valid(b, t, [0, 3, 6])
    if kind == "causal-kernel":  # no padding: the SDPA is_causal kernel vs the reference's own tril
        ref, fast = _both_impls(attn, x, None, is_causal=True)
    else:
        mask = build_mask(kind.split("-")[0], slots, slots, kv, window=3)
        ref, fast = _both_impls(attn, x, mask)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_reference_equals_sdpa_cross_attention_with_memory_padding(n_kv_head):
    torch.manual_seed(0)
    attn = Attention(32, n_head=4, n_kv_head=n_kv_head, cross=True, kv_dim=24).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    mask = build_mask("cross", torch.arange(5), torch.arange(7), _key_valid(2, 7, [0, 4]))
    ref, fast = _both_impls(attn, x, mask, memory=memory)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # padded memory slots must not matter
    memory2 = memory.clone()
    memory2[1, :4] = 100.0
    attn.impl = "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask, memory=memory2), fast, atol=1e-5, rtol=1e-5)


def test_reference_equals_sdpa_with_additive_bias_and_mask():
    torch.manual_seed(0)
    attn = Attention(32, n_head=4, n_kv_head=2).eval()
    x = torch.randn(2, 6, 32)
    bias = torch.randn(1, 4, 6, 6)  # e.g. a T5 relative-position bias, one per head
    mask = build_mask("causal", torch.arange(6), torch.arange(6), _key_valid(2, 6, [0, 2]))
    for m in (None, mask):
        ref, fast = _both_impls(attn, x, m, bias=bias)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_weights_are_a_distribution_over_allowed_keys():
    torch.manual_seed(0)
    attn = Attention(16, n_head=2).eval()
    attn.impl, attn.keep_weights = "reference", True
    mask = build_mask("local", torch.arange(6), torch.arange(6), None, window=2)
    with torch.no_grad():
        attn(torch.randn(1, 6, 16), mask)
    w = attn.last_weights
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert bool((w[0, :, ~mask[0, 0]] == 0).all())


# -- causality of the GPT family -------------------------------------------------------------------

def _gpt1_tiny():
    return GPTConfig.from_preset("gpt1", vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64)


@pytest.mark.parametrize("preset", ["nano", "nano-gpt3", "nano-llama", "gpt1-tiny"])
@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_future_tokens_never_change_earlier_logits(preset, impl):
    torch.manual_seed(0)
    cfg = _gpt1_tiny() if preset == "gpt1-tiny" else GPTConfig.from_preset(preset)
    model = GPT(cfg).eval()
    set_attention_impl(model, impl)
    a = torch.randint(0, 65, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 65, (2, 8))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(la[:, 12:], lb[:, 12:])  # and the later ones do change


def test_local_layers_do_not_see_past_the_window():
    """nano-gpt3 with only banded layers: a token > window back has no influence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("nano-gpt3", n_layer=1, attention_pattern=("local",), local_window=4)).eval()
    a = torch.randint(0, 65, (1, 12))
    b = a.clone()
    b[0, 2] = (a[0, 2] + 1) % 65
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[6:], lb[6:])      # positions 6.. see keys 3.. only (window 4)
    assert not torch.allclose(la[2:6], lb[2:6])


# -- norms ---------------------------------------------------------------------------------------

def test_layernorm_matches_formula():
    torch.manual_seed(0)
    ln = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 16) * 3 + 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)
    assert LayerNorm(16, bias=False).bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_formula(dtype):
    torch.manual_seed(0)
    rms = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    x = (torch.randn(3, 5, 16) * 3).to(dtype)  # bf16 input with an fp32 weight takes the upcast path
    xf = x.float()
    ref = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(rms(x).float(), ref, atol=tol, rtol=tol)


# -- RoPE ----------------------------------------------------------------------------------------

def test_rope_dot_product_depends_on_relative_position_only():
    torch.manual_seed(0)
    d = 16
    rope = RotaryEmbedding(d, max_len=64)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def dot(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 10, 40):
            assert abs(dot(m, n) - dot(m + shift, n + shift)) < 1e-4
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-3  # and it does depend on m - n
    # rotation preserves norms (it is a rotation of each feature pair)
    c, s = rope(torch.tensor([[17]]))
    torch.testing.assert_close(apply_rotary(q, c, s).norm(), q.norm())


# -- LoRA ----------------------------------------------------------------------------------------

def test_lora_freezes_base_zero_init_merge_and_unmerge():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("nano")).eval()
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        before = model(x)
    wrapped = apply_lora(model, ["*.attn.qkv", "*.mlp.fc"], r=4, alpha=8)
    assert len(wrapped) == 2 * model.config.n_layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # B = 0 at init: exactly the base model

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, before)
        lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        base_w = [m.base.weight.clone() for m in lora_layers]
        for m in lora_layers:
            m.merge()
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)  # merged == unmerged
        for m in lora_layers:
            m.unmerge()
        for m, w in zip(lora_layers, base_w):
            torch.testing.assert_close(m.base.weight, w, atol=1e-6, rtol=0)  # unmerge restores W0
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
        merge_lora(model)  # unwrap: plain nn.Linear again, same function
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_unmerge_restores_base_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    w0 = lin.weight.detach().clone()
    lora = LoRALinear(lin, r=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    lora.merge()
    assert not torch.allclose(lin.weight, w0)
    lora.unmerge()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)


def test_apply_lora_rejects_targets_that_match_nothing():
    with pytest.raises(ValueError, match="matched no"):
        apply_lora(GPT(GPTConfig.from_preset("nano")), ["*.does_not_exist"])
