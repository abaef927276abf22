"""The shared source/target subword tokenizer of an encoder-decoder (T5 / BART trained from scratch).

One vocabulary is trained on the source AND the target training text, so both sides share the
(tied) embedding, as in T5 (Raffel et al. 2020, sec. 2.2: one SentencePiece vocabulary for every
language). Two models, both over a SentencePiece-style Metaspace pre-tokenizer (spaces become
``▁`` and are part of the pieces, so decoding restores the text):

* ``unigram``: Kudo 2018, "Subword Regularization", sec. 3.2: start from a large seed vocabulary
  and prune the pieces whose removal costs the corpus likelihood least;
* ``bpe``: Sennrich et al. 2016, Algorithm 1: merge the most frequent adjacent pair.

Special ids follow T5: ``<pad>`` = 0 (also the decoder start of a T5), ``</s>`` = 1, ``<unk>`` = 2.
"""
from __future__ import annotations

from typing import Iterable

from .base import Tokenizer

SEQ2SEQ_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: T5's pad / eos / unk layout
KINDS = ("unigram", "bpe")


def train_seq2seq_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "unigram") -> Tokenizer:
    """A Metaspace Unigram or BPE tokenizer with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("no training text for the tokenizer: every source and target is empty")
    if vocab_size <= len(SEQ2SEQ_SPECIALS):
        raise ValueError(f"--vocab-size must exceed the {len(SEQ2SEQ_SPECIALS)} special tokens, got {vocab_size}")
    specials = list(SEQ2SEQ_SPECIALS)
    if kind == "unigram":
        tok = HFTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    elif kind == "bpe":
        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                      show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(KINDS)}")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "unigram":
        tok = canonical_unigram(tok, len(specials))
    return Tokenizer.from_tokenizers(tok, eos="</s>", pad="<pad>", unk="<unk>", kind=kind)


def canonical_unigram(tok, n_special: int):
    """The same Unigram vocabulary, ids and scores from every run on the same text.

    The ``tokenizers`` Unigram trainer is not reproducible across processes: it walks hash maps
    in a per-process random order, so the scores jitter in the last bits (float sums in another
    order), pieces of (nearly) equal score swap ids, and the characters it must keep but had
    pruned get a ladder of scores (1e-4 apart, below every trained piece) in random order. Two
    runs of one command would then train different models. The piece set itself is the same, so
    this rewrites the scores rounded to 1e-6 (far below any difference that matters to a
    segmentation), gives the ladder characters one shared score, and orders ids by (score, piece)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    head, rest = vocab[:n_special], vocab[n_special:]
    floor = min((s for p, s in rest if len(p) > 1), default=float("inf"))
    ladder = [s for p, s in rest if len(p) == 1 and s < floor]
    low = round(min(ladder), 4) if ladder else 0.0

    def score(piece: str, s: float) -> float:
        return low if len(piece) == 1 and s < floor else round(s, 6)

    spec["model"]["vocab"] = head + sorted(([p, score(p, s)] for p, s in rest), key=lambda ps: (-ps[1], ps[0]))
    return HFTokenizer.from_str(json.dumps(spec))
