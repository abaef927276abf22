"""BLEU/chrF and ROUGE from `polymodal score-text` equal sacrebleu's and rouge-score's own
numbers on the same files; lead-3 picks the first three body sentences."""
import json
from pathlib import Path

import pytest

from polymodal import cli
from polymodal.eval.text_metrics import bleu_chrf, lead_n, rouge

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

HYPS = ["Ein Mann fährt Fahrrad auf der Straße .", "Zwei Hunde spielen im Schnee .", "Eine Frau liest ein Buch ."]
REFS = ["Ein Mann fährt mit dem Fahrrad die Straße entlang .", "Zwei Hunde spielen im Schnee .", "Eine Frau liest."]


def _files(tmp_path: Path):
    h, r = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    h.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    r.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    return str(h), str(r)


def test_bleu_and_chrf_equal_sacrebleu_through_the_cli(tmp_path, capsys):
    h, r = _files(tmp_path)
    cli.main(["score-text", "--hypotheses", h, "--references", r, "--metric", "bleu"])
    got = bleu_chrf(HYPS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert f"bleu {got['bleu']:.2f}" in capsys.readouterr().out
    assert 0 < got["bleu"] < 100


def test_rouge_equals_rouge_score(tmp_path):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {k: 100 * sum(scorer.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS)) / len(REFS)
            for k in ("rouge1", "rouge2", "rougeL")}
    got = rouge(HYPS, REFS)
    assert got == pytest.approx(want, abs=1e-9)
    h, r = _files(tmp_path)
    assert cli.run_command("score-text", ["--hypotheses", h, "--references", r, "--metric", "rouge"]) == {**got, "n": 3}


def test_misaligned_files_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        bleu_chrf(HYPS[:2], REFS)


def test_lead3_skips_the_headline_and_keeps_three_sentences():
    article = "Ad sales boost profit\n\nProfits jumped 76%. Sales rose! Did costs fall? Yes, they did.\n\nMore text."
    assert lead_n(article, 3) == "Profits jumped 76%. Sales rose! Did costs fall?"


def test_lead3_on_real_bbc_articles_scores_in_a_sane_range():
    val = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbc_news_summary" / "val.jsonl"
    if not val.is_file():
        pytest.skip("../shared/data/bbc_news_summary not present")
    recs = [json.loads(line) for line in val.read_text(encoding="utf-8").splitlines()[:50] if line.strip()]
    scores = rouge([lead_n(r["article"]) for r in recs], [r["summary"] for r in recs])
    # BBC summaries are extractive, so lead-3 overlaps them substantially but not entirely
    assert 20 < scores["rougeL"] < 90 and scores["rouge1"] >= scores["rouge2"]
