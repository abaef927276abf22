"""Hugging Face GPT-2 / LLaMA / Qwen2 <-> polymodal parity without downloads (DESIGN lesson 4).

A tiny random HF model is built from a config, saved as safetensors, loaded with
``polymodal.load`` and its logits compared with HF's in float32; our export must load
back in ``transformers`` with the same logits.
"""
from __future__ import annotations

import json

import pytest
import torch

import polymodal
from polymodal.interop import convert
from polymodal.interop.hf import export_hf
from polymodal.io import CheckpointError

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _gpt2_cfg(**kw):
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
                                   bos_token_id=0, eos_token_id=1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **kw)


def _llama_cfg(**kw):  # GQA: 4 query heads share 2 KV heads
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                    rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=0, eos_token_id=1, **kw)


def _qwen2_cfg(**kw):
    return transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                    rms_norm_eps=1e-6, rope_theta=20000.0, **kw)


CONFIGS = {
    "gpt2": lambda: _gpt2_cfg(),
    "gpt2-untied-base-gelu": lambda: _gpt2_cfg(tie_word_embeddings=False, activation_function="gelu", n_inner=40),
    "llama-gqa": lambda: _llama_cfg(),
    "llama-tied-bias": lambda: _llama_cfg(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: _qwen2_cfg(),
}


def _hf_model(cfg):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them so the maps are tested
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 11), generator=g)


def _hf_logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _our_logits(m, ids):
    with torch.no_grad():
        return m(ids)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_import_export_parity(name, tmp_path):
    cfg = CONFIGS[name]()
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = _ids()
    ref = _hf_logits(hf, ids)

    ours, tok = polymodal.load(tmp_path / "hf")
    assert tok is None  # no tokenizer files were saved
    assert ours.config.tie_embeddings == bool(cfg.tie_word_embeddings)
    torch.testing.assert_close(_our_logits(ours, ids), ref, atol=TOL, rtol=0)

    # export: transformers loads our folder and computes the same logits
    export_hf(ours, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["model_type"] == cfg.model_type
    assert exported["architectures"] == [type(hf).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(_hf_logits(back, ids), ref, atol=TOL, rtol=0)


def test_sharded_safetensors_load(tmp_path):
    hf = _hf_model(_llama_cfg())
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours, _ = polymodal.load(tmp_path)
    ids = _ids()
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), atol=TOL, rtol=0)


def test_gpt2_base_model_without_prefix(tmp_path):
    """GPT2Model (no LM head, no ``transformer.`` prefix) loads with tied embeddings."""
    cfg = _gpt2_cfg()
    torch.manual_seed(0)
    base = transformers.GPT2Model(cfg).eval()
    base.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = polymodal.load(tmp_path)
    ids = _ids()
    with torch.no_grad():
        h = base(ids).last_hidden_state
        torch.testing.assert_close(ours.hidden_states(ids), h, atol=TOL, rtol=0)


def test_convert_roundtrip_polymodal_folder(tmp_path):
    hf = _hf_model(_qwen2_cfg())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert(tmp_path / "hf", tmp_path / "pm", to="polymodal")
    assert json.loads((tmp_path / "pm" / "config.json").read_text())["family"] == "gpt"
    ours, _ = polymodal.load(tmp_path / "pm")
    ids = _ids()
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("bad, needle", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding"),
    ({"hidden_act": "gelu_quick_unknown"}, "hidden_act"),
])
def test_unsupported_config_is_refused(tmp_path, bad, needle):
    hf = _hf_model(_llama_cfg())
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in bad else None
    cfg.update(bad)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=needle) as e:
        polymodal.load(tmp_path)
    assert "config.json" in str(e.value)


def test_export_refuses_unsupported_layout(tmp_path):
    from polymodal.models import GPT, GPTConfig

    m = GPT(GPTConfig.from_preset("nano-gpt3"))  # alternating local attention has no HF class here
    with pytest.raises(CheckpointError, match="no Hugging Face export"):
        export_hf(m, tmp_path / "x")
