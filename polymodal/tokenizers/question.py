"""The word-level question tokenizer of VQA as classification (``polymodal train-vqa``).

VQA questions use a few thousand distinct words at most (easy-VQA: ~25, VQAv2: ~15k), so a
lower-cased word vocabulary over the training questions keeps sequences short and needs no
subword training; unseen words map to [UNK]. The input is BERT's single-segment template
[CLS] q [SEP] (Devlin et al., 2019, sec. 3), which VisualBERT and ViLBERT read.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def train_question_tokenizer(questions: Sequence[str]):
    """A :class:`polymodal.tokenizers.Tokenizer` over the words of ``questions``, most frequent
    first (ties alphabetical, so the vocabulary is a pure function of the questions)."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    from .base import Tokenizer

    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()  # words and punctuation, like BERT's basic tokenizer
    words = Counter(w for q in questions for w, _ in pre.pre_tokenize_str(norm.normalize_str(q)))
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return Tokenizer.from_tokenizers(tok, pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", kind="word")


def encode_question(tokenizer, question: str, max_len: int) -> list[int]:
    """[CLS] words [SEP], truncated to ``max_len`` with the [SEP] kept."""
    ids = tokenizer.encode(question, add_special_tokens=True)
    if len(ids) > max_len:
        ids = ids[:max_len - 1] + ids[-1:]
    return ids
