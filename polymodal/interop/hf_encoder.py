"""Hugging Face BERT / RoBERTa / ALBERT folders <-> polymodal ``encoder`` models.

Config translation uses the Hugging Face ``config.json`` fields
(``BertConfig``/``RobertaConfig``/``AlbertConfig``): hidden_size, num_hidden_layers,
num_attention_heads, intermediate_size, hidden_act, max_position_embeddings,
type_vocab_size, layer_norm_eps, pad_token_id, hidden_dropout_prob and, for
ALBERT, embedding_size, num_hidden_groups and inner_group_num.

Weight names follow ``modeling_bert.py`` / ``modeling_roberta.py`` /
``modeling_albert.py``. The *For* classes nest the bare model under
``bert.``/``roberta.``/``albert.`` (their ``base_model_prefix``); the bare
``*Model`` classes have no prefix. Which one a file holds is read from its
tensor names. The three separate query/key/value projections become our fused
``attn.qkv`` (and are split back on export). The MLM decoder weight is tied to
the word embeddings (and its bias to ``*.predictions.bias``), so copies of them
in older files are ignored, as are the ``position_ids`` buffers.
"""
from __future__ import annotations

from typing import Any

import dataclasses

from ..io import CheckpointError
from ..models.encoder import EncoderConfig, build_encoder
from ..models.heads import TaskConfig, build_task_model
from .hf import HFAdapter
from .weight_map import WeightMap, copy, fuse

# HF architectures entry -> our task (which head the folder holds)
ARCHITECTURES = {
    "bert": {"BertModel": "base", "BertForMaskedLM": "mlm", "BertForPreTraining": "pretraining"},
    "roberta": {"RobertaModel": "base", "RobertaForMaskedLM": "mlm"},
    "albert": {"AlbertModel": "base", "AlbertForMaskedLM": "mlm", "AlbertForPreTraining": "pretraining"},
}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _need(hf: dict[str, Any], key: str):
    if key not in hf:
        raise CheckpointError(f"config.json: missing field {key!r}")
    return hf[key]


def config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise CheckpointError(f"config.json: model_type {mt!r} is not an encoder ({sorted(ARCHITECTURES)})")
    if _head_task(hf) is not None:  # *ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering
        return task_config_from_hf(hf)
    archs = hf.get("architectures") or [next(iter(ARCHITECTURES[mt]))]
    task = ARCHITECTURES[mt].get(archs[0])
    if task is None:
        raise CheckpointError(f"config.json: architecture {archs[0]!r} is not supported; "
                              f"supported: {sorted(ARCHITECTURES[mt])}")
    pet = hf.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise CheckpointError(f"config.json: position_embedding_type={pet!r} is not supported (only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError("config.json: is_decoder/add_cross_attention encoders are not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise CheckpointError(f"config.json: hidden_act={act!r} is not supported; choose from {sorted(_ACT_FROM_HF)}")
    n_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    kw: dict[str, Any] = dict(
        name=hf.get("_name_or_path") or mt, variant=mt, task=task,
        vocab_size=_need(hf, "vocab_size"), block_size=hf.get("max_position_embeddings", 512),
        n_layer=_need(hf, "num_hidden_layers"), n_head=_need(hf, "num_attention_heads"),
        n_embd=_need(hf, "hidden_size"), intermediate_size=_need(hf, "intermediate_size"),
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_ACT_FROM_HF[act], dropout=hf.get("hidden_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        # BertModel/RobertaModel/AlbertModel build the pooler by default, *ForMaskedLM do not.
        pooler=task != "mlm", n_pair_labels=n_labels,
    )
    if mt == "roberta":
        kw.update(position_from_padding=True, mlm_activation="gelu")  # RobertaLMHead calls gelu() directly
        if kw["pad_token_id"] is None:
            raise CheckpointError("config.json: RoBERTa needs pad_token_id (positions start after it)")
    if mt == "albert":
        groups, inner = hf.get("num_hidden_groups", 1), hf.get("inner_group_num", 1)
        if groups != 1 or inner != 1:
            raise CheckpointError(
                f"config.json: ALBERT with num_hidden_groups={groups}, inner_group_num={inner} is not supported; "
                "only one shared layer (num_hidden_groups=1, inner_group_num=1, as in all released ALBERTs)")
        kw.update(embedding_size=hf.get("embedding_size", 128), share_layers=True)
    try:
        return EncoderConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def config_to_hf(c: EncoderConfig) -> dict[str, Any]:
    if isinstance(c, TaskConfig):
        return task_config_to_hf(c)
    if not isinstance(c, EncoderConfig):
        raise TypeError(f"not an encoder config: {type(c).__name__}")
    mt = c.variant
    arch = {v: k for k, v in ARCHITECTURES[mt].items()}.get(c.task)
    if arch is None:
        raise ValueError(f"{mt} has no Hugging Face class for task {c.task!r}")
    if (mt == "albert") != c.share_layers or (mt == "albert") != (c.embedding_size is not None):
        raise ValueError(f"a {mt} export needs share_layers={mt == 'albert'} and "
                         f"embedding_size {'set' if mt == 'albert' else 'None'}")
    if (mt == "roberta") != c.position_from_padding:
        raise ValueError(f"a {mt} export needs position_from_padding={mt == 'roberta'}")
    if mt == "roberta" and (c.mlm_activation or c.activation) != "gelu":
        raise ValueError("RoBERTa's lm_head always uses erf-GELU; mlm_activation must be 'gelu'")
    if c.mlm_activation not in (None, c.activation) and mt != "roberta":
        raise ValueError(f"{mt}'s MLM head uses hidden_act; mlm_activation must equal activation")
    if (c.task == "base") != c.pooler and c.task != "pretraining":
        raise ValueError(f"{arch} {'has' if c.task == 'base' else 'has no'} pooler; config.pooler={c.pooler}")
    hf = dict(
        architectures=[arch], model_type=mt, vocab_size=c.vocab_size, hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, intermediate_size=c.hidden,
        hidden_act=_ACT_TO_HF[c.activation], hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
        max_position_embeddings=c.block_size, type_vocab_size=c.type_vocab_size, initializer_range=c.init_std,
        layer_norm_eps=c.norm_eps, pad_token_id=c.pad_token_id, position_embedding_type="absolute",
        tie_word_embeddings=True,
    )
    if c.bos_token_id is not None:
        hf["bos_token_id"] = c.bos_token_id
    if c.eos_token_id is not None:
        hf["eos_token_id"] = c.eos_token_id
    if c.task == "pretraining" and c.n_pair_labels != 2:
        hf["num_labels"] = c.n_pair_labels
    if mt == "albert":
        hf.update(embedding_size=c.embedding_size, num_hidden_groups=1, inner_group_num=1,
                  classifier_dropout_prob=c.dropout)
    return hf


def _linear(hf: str, ours: str, optional: bool = False):
    return [copy(f"{hf}.weight", f"{ours}.weight", optional), copy(f"{hf}.bias", f"{ours}.bias", optional)]


def _qkv(hf_layer: str, ours_attn: str, n: int):
    return [fuse([f"{hf_layer}{p}.{w}" for p in ("query", "key", "value")], f"{ours_attn}.qkv.{w}", [n, n, n])
            for w in ("weight", "bias")]


def weight_map(c: EncoderConfig, hf_keys: set[str] | None = None) -> WeightMap:
    if isinstance(c, TaskConfig):
        return task_weight_map(c, hf_keys)
    mt = c.variant
    if hf_keys is not None:  # a *For* class nests the model under its base_model_prefix
        prefix = f"{mt}." if any(k.startswith(f"{mt}.") for k in hf_keys) else ""
    else:
        prefix = "" if c.task == "base" else f"{mt}."
    o = "" if c.task == "base" else "encoder."  # our heads hold the Encoder as .encoder
    e, h = f"{prefix}embeddings.", f"{o}embeddings."
    rules = [
        copy(f"{e}word_embeddings.weight", f"{h}word.weight"),
        copy(f"{e}position_embeddings.weight", f"{h}position.weight"),
        *_linear(f"{e}LayerNorm", f"{h}norm"),
    ]
    if c.type_vocab_size > 0:
        rules.append(copy(f"{e}token_type_embeddings.weight", f"{h}token_type.weight"))
    if mt == "albert":
        rules += _linear(f"{prefix}encoder.embedding_hidden_mapping_in", f"{h}proj")
        L, B = f"{prefix}encoder.albert_layer_groups.0.albert_layers.0.", f"{o}blocks.0."  # the one shared layer
        rules += [*_qkv(f"{L}attention.", f"{B}attn", c.n_embd),
                  *_linear(f"{L}attention.dense", f"{B}attn.proj"),
                  *_linear(f"{L}attention.LayerNorm", f"{B}norm1"),
                  *_linear(f"{L}ffn", f"{B}mlp.fc"),
                  *_linear(f"{L}ffn_output", f"{B}mlp.proj"),
                  *_linear(f"{L}full_layer_layer_norm", f"{B}norm2")]
        pooler = f"{prefix}pooler"
    else:
        L, B = f"{prefix}encoder.layer.{{}}.", f"{o}blocks.{{}}."
        rules += [*_qkv(f"{L}attention.self.", f"{B}attn", c.n_embd),
                  *_linear(f"{L}attention.output.dense", f"{B}attn.proj"),
                  *_linear(f"{L}attention.output.LayerNorm", f"{B}norm1"),
                  *_linear(f"{L}intermediate.dense", f"{B}mlp.fc"),
                  *_linear(f"{L}output.dense", f"{B}mlp.proj"),
                  *_linear(f"{L}output.LayerNorm", f"{B}norm2")]
        pooler = f"{prefix}pooler.dense"
    if c.pooler:
        rules += _linear(pooler, f"{o}pooler.dense")

    mlm = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions"),
           "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head"),
           "albert": ("predictions.dense", "predictions.LayerNorm", "predictions")}[mt]
    pair = {"bert": "cls.seq_relationship", "albert": "sop_classifier.classifier", "roberta": None}[mt]
    if c.task in ("mlm", "pretraining"):
        rules += [*_linear(mlm[0], "mlm.dense"), *_linear(mlm[1], "mlm.norm"),
                  copy(f"{mlm[2]}.bias", "mlm.decoder.bias")]
    if c.task == "pretraining":
        if pair is None:
            raise CheckpointError(f"{mt} has no pre-training sentence-pair head")
        rules += _linear(pair, "pair_head")

    ignore_hf = ["*position_ids", "*token_type_ids",  # buffers some versions saved
                 f"{mlm[2]}.decoder.weight", f"{mlm[2]}.decoder.bias"]  # tied to the embeddings / to .bias
    if c.task != "pretraining":
        # e.g. bert-base-uncased ships BertForPreTraining weights under architectures=BertForMaskedLM;
        # transformers drops the unused NSP head (and pooler) the same way.
        ignore_hf += [f"{pair}.*"] if pair else []
        if not c.pooler:
            ignore_hf += [f"{prefix}pooler.*"]
    n = 1 if c.share_layers else c.n_layer
    return WeightMap(rules, n, ignore_hf=ignore_hf, ignore_ours=["mlm.decoder.weight"])


# -- task heads: *ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering ------------
# They load as a ``TaskConfig`` (polymodal.models.heads) whose backbone is the bare encoder; the HF head
# tensors keep their names (classifier.*, classifier.dense/out_proj for RoBERTa, qa_outputs.*).
_HEAD_SUFFIX = {"ForSequenceClassification": "seq_cls", "ForTokenClassification": "token_cls",
                "ForQuestionAnswering": "qa"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "albert": "Albert"}


def _head_task(hf: dict[str, Any]) -> str | None:
    archs = hf.get("architectures") or [""]
    prefix = _CLASS_PREFIX.get(hf.get("model_type"), "?")
    return next((t for suf, t in _HEAD_SUFFIX.items() if archs[0] == prefix + suf), None)


def task_config_from_hf(hf: dict[str, Any]) -> TaskConfig:
    task, mt = _head_task(hf), hf["model_type"]
    base = config_from_hf({**hf, "architectures": [f"{_CLASS_PREFIX[mt]}Model"]})
    # HF builds the pooler only for BERT/ALBERT sequence classification (add_pooling_layer=False elsewhere).
    base.pooler = task == "seq_cls" and mt != "roberta"
    id2label = hf.get("id2label") or {}
    names = tuple(id2label[k] for k in sorted(id2label, key=int))
    n = len(names) or hf.get("num_labels") or 2
    if all(v == f"LABEL_{i}" for i, v in enumerate(names)):  # HF's placeholder names carry nothing
        names = ()
    pt = hf.get("problem_type")
    problem = {"regression": "regression", "multi_label_classification": "multi_label",
               "single_label_classification": "classification"}.get(pt, "regression" if n == 1 else "classification")
    drop = hf.get("classifier_dropout_prob" if mt == "albert" else "classifier_dropout")
    head = ("roberta" if mt == "roberta" else "pooler") if task == "seq_cls" else "linear"
    try:
        return TaskConfig(name=base.name, task=task, backbone={**base.to_dict(), "task": "base"}, num_labels=n,
                          problem=problem, head=head, labels=names, classifier_dropout=drop,
                          pad_token_id=base.pad_token_id)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def task_config_to_hf(c: TaskConfig) -> dict[str, Any]:
    base = c.backbone_config()
    if not isinstance(base, EncoderConfig):
        raise TypeError(f"not an encoder backbone: {type(base).__name__}")
    if getattr(c, "word_shapes", 0) or getattr(c, "crf", False):
        raise ValueError("a token classifier with word shapes (--cased) or a CRF (--crf) has no Hugging Face class")
    hf = config_to_hf(dataclasses.replace(base, task="base", pooler=True))
    mt = base.variant
    suffix = {t: s for s, t in _HEAD_SUFFIX.items()}[c.task]
    names = list(c.labels) or [f"LABEL_{i}" for i in range(c.num_labels)]
    hf.update(architectures=[_CLASS_PREFIX[mt] + suffix], id2label={str(i): v for i, v in enumerate(names)},
              label2id={v: i for i, v in enumerate(names)})
    if c.task == "seq_cls":
        hf["problem_type"] = {"classification": "single_label_classification", "regression": "regression",
                              "multi_label": "multi_label_classification"}[c.problem]
    if c.classifier_dropout is not None:
        hf["classifier_dropout_prob" if mt == "albert" else "classifier_dropout"] = c.classifier_dropout
    return hf


def task_weight_map(c: TaskConfig, hf_keys: set[str] | None = None) -> WeightMap:
    base_cfg = c.backbone_config()
    mt = base_cfg.variant
    # the *For* classes always nest the encoder under "<model_type>."
    base = weight_map(base_cfg, hf_keys if hf_keys is not None else {f"{mt}.embeddings.word_embeddings.weight"})
    rules = [dataclasses.replace(r, ours=tuple(f"backbone.{n}" for n in r.ours)) for r in base.rules]
    if c.task == "qa":
        rules += _linear("qa_outputs", "qa_outputs")
    elif c.head == "roberta":
        rules += [*_linear("classifier.dense", "classifier.dense"), *_linear("classifier.out_proj", "classifier.out_proj")]
    else:
        rules += _linear("classifier", "classifier")
    return WeightMap(rules, 1, ignore_hf=base.ignore_hf, ignore_ours=[f"backbone.{g}" for g in base.ignore_ours])


def _build(c) -> Any:
    return build_task_model(c) if isinstance(c, TaskConfig) else build_encoder(c)


ADAPTER = HFAdapter(config_from_hf=config_from_hf, config_to_hf=config_to_hf, weight_map=weight_map,
                    build=_build)


def load_sentence_encoder(folder, device="cpu", dtype=None):
    """A sentence-transformers folder (Transformer -> Pooling [-> Normalize]) as a ``SentenceEncoder``.

    Reads ``modules.json``, ``sentence_bert_config.json`` (max_seq_length) and
    ``1_Pooling/config.json`` (mean or CLS pooling); the encoder comes from the
    folder's Hugging Face ``config.json`` + ``model.safetensors``."""
    import json
    from pathlib import Path

    from ..models.encoder import SentenceEncoder
    from ..tokenizers import Tokenizer
    from .hf import load_hf_folder

    folder = Path(folder)
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling, max_len = "mean", 512
    if (folder / "sentence_bert_config.json").is_file():
        max_len = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length", max_len)
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pc = json.loads((folder / m["path"] / "config.json").read_text())
            if pc.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif pc.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                raise CheckpointError(f"{folder / m['path'] / 'config.json'}: only mean or CLS pooling is supported")
    model = load_hf_folder(folder, device=device, dtype=dtype)
    return SentenceEncoder(model, Tokenizer.load(folder), max_length=max_len, pooling=pooling,
                           normalize="Normalize" in types)
