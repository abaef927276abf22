"""polymodal.eval.caption_metrics against pycocoevalcap's own scorers on the same captions, the
Python tokenizer against Stanford's PTB tokenizer, and one BLEU worked out by hand."""
import math
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap")

from polymodal.eval import caption_metrics as cm  # noqa: E402

needs_java = pytest.mark.skipif(not cm.java_available(), reason="java not installed (apt-get install default-jre-headless)")
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"

REFS = {
    "1000268201_693b08cb0e.jpg": ["A child in a pink dress is climbing up a set of stairs in an entry way .",
                                  "A girl going into a wooden building .", "A little girl climbing into a wooden playhouse .",
                                  "A little girl climbing the stairs to her playhouse .",
                                  "A little girl in a pink dress going into a wooden cabin ."],
    "dog.jpg": ["A black dog and a spotted dog are fighting", "A black dog and a tri-colored dog playing with each other on the road .",
                "Two dogs of different breeds looking at each other on the road ."],
    "beach.jpg": ["A man's surfboard (blue) lies on the beach ; he isn't surfing .", "Surfer on the sand, near the water."],
    "empty.jpg": ["Nothing to see here ."],
}
PREDS = {"1000268201_693b08cb0e.jpg": "A little girl in a pink dress climbing stairs.",
         "dog.jpg": "Two dogs are playing on the road.",
         "beach.jpg": "A man with a blue surfboard on the beach.",
         "empty.jpg": "a dog"}


def _direct(gts, res, meteor=False):
    """pycocoevalcap's scorers called as COCOEvalCap.evaluate does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    b, b_each = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b[n] for n in range(4)}
    out["ROUGE-L"], r_each = Rouge().compute_score(gts, res)
    out["CIDEr"], c_each = Cider().compute_score(gts, res)
    if meteor:
        out["METEOR"], _ = cm.meteor_scorer().compute_score(gts, res)
    return out, b_each[3], r_each, c_each


@needs_java
def test_scores_equal_pycocoevalcap_with_the_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = cm.score_captions(PREDS, REFS, meteor=False, per_image=True)
    assert ours["tokenizer"] == "ptb" and ours["n_images"] == 4 and ours["METEOR"] is None
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    ref, b4, rl, cider = _direct(gts, res)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
    for i, k in enumerate(REFS):
        assert ours["per_image"][k]["BLEU-4"] == pytest.approx(b4[i], abs=1e-15)
        assert ours["per_image"][k]["ROUGE-L"] == pytest.approx(rl[i], abs=1e-15)
        assert ours["per_image"][k]["CIDEr"] == pytest.approx(cider[i], abs=1e-12)
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and ours["CIDEr"] > 0


def test_bleu1_by_hand():
    """One image, pre-tokenized: hypothesis "a dog runs", reference "a dog runs fast".
    Clipped unigram precision 3/3, brevity penalty exp(1 - r/c) = exp(1 - 4/3)."""
    m = cm.score_captions({"x": "a dog runs"}, {"x": ["a dog runs fast"]}, tokenizer="none", meteor=False)
    assert m["BLEU-1"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)
    assert m["BLEU-2"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)  # both bigrams match too
    same = cm.score_captions({"x": "a dog runs fast"}, {"x": ["a dog runs fast"]}, tokenizer="none", meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0) and same["ROUGE-L"] == pytest.approx(1.0)


@needs_java
def test_python_tokenizer_matches_ptb():
    captions = [c for v in REFS.values() for c in v] + list(PREDS.values()) + [
        'A dog\'s toy (red) is "here", isn\'t it?', "Two men--one in a t-shirt--play $5 poker & win 3.5 .",
        "We cannot see the girl's face... She's gonna jump!", "U.S. flag at St. Mary's; e-mail: a@b.com", ""]
    if FLICKR.is_dir():  # every caption of the shared Flickr8k copy (3765)
        from polymodal.data.captions import load_flickr8k

        captions += [c for r in load_flickr8k(FLICKR, "all") for c in r.captions]
    ptb = cm.ptb_tokenize({i: [c] for i, c in enumerate(captions)})
    mismatch = [(c, ptb[i][0], cm.simple_tokenize(c)) for i, c in enumerate(captions)
                if cm.simple_tokenize(c) != ptb[i][0]]
    assert not mismatch, mismatch[:3]


def test_without_java_falls_back_and_drops_meteor(monkeypatch):
    monkeypatch.setattr(cm, "java_available", lambda: False)
    with pytest.warns(UserWarning, match="METEOR"):
        m = cm.score_captions(PREDS, REFS)
    assert m["tokenizer"] == "simple" and m["METEOR"] is None
    direct, *_ = _direct({i: [cm.simple_tokenize(c) for c in REFS[k]] for i, k in enumerate(REFS)},
                         {i: [cm.simple_tokenize(PREDS[k])] for i, k in enumerate(REFS)})
    assert m["CIDEr"] == pytest.approx(direct["CIDEr"], rel=1e-12)
    with pytest.raises(RuntimeError, match="Java"):
        cm.ptb_tokenize({1: ["a dog"]})


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no references.*'b'"):
        cm.score_captions({"a": "x", "b": "y"}, {"a": ["x"]}, tokenizer="none", meteor=False)
    with pytest.raises(ValueError, match="one caption string"):
        cm.score_captions({"a": ["x"]}, {"a": ["x"]}, tokenizer="none", meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        cm.score_captions({"a": "x"}, {"a": "x"}, tokenizer="none", meteor=False)


@needs_java
@pytest.mark.slow  # METEOR's Java scorer loads a 60 MB paraphrase table: ~10 s of CPU at start-up
def test_meteor_equals_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = cm.score_captions(PREDS, REFS, per_image=True)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in REFS[k]] for i, k in enumerate(REFS)})
    res = tok.tokenize({i: [{"caption": PREDS[k]}] for i, k in enumerate(REFS)})
    direct, each = cm.meteor_scorer().compute_score(gts, res)
    assert ours["METEOR"] == pytest.approx(direct, rel=1e-12)
    assert [ours["per_image"][k]["METEOR"] for k in REFS] == pytest.approx(each, rel=1e-12)
    assert 0 < ours["METEOR"] < 1
