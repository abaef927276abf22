"""VQA accuracy (Antol et al., 2015, "VQA: Visual Question Answering", sec. 2 and the
official evaluation script ``vqaEval.py`` of the VQA v1/v2 challenge).

Every question has 10 human answers. A predicted answer is correct to the degree that
humans agree with it:

    Acc(a) = min(#humans that said a / 3, 1)                       (paper, sec. 2)

The official script makes that robust to the choice of humans by averaging over the
C(10, 9) = 10 subsets of nine answers (leave one out):

    Acc(a) = 1/10 * sum_{i=1..10} min(#{j != i : answer_j == a} / 3, 1)

so an answer given by 3 humans scores (7 * 1 + 3 * 2/3) / 10 = 0.9, not 1. We implement
that average exactly (``vqa_accuracy``); ``soft_score`` is the plain min(n/3, 1) used as the
training target of answer-classification models.

Answers are normalised like the official script (written anew here, with its quirks kept
on purpose so numbers compare): newlines/tabs -> spaces, strip; punctuation removed (or
replaced by a space when it sits inside a word and the text has no "digit,digit"); a
period is removed unless a digit follows it; lowercase; number words zero..ten and
"none" -> digits; articles a/an/the dropped; apostrophe-less contractions restored
("dont" -> "don't"). Quirk kept: the official script normalises the prediction and the
human answers *only when the humans disagree* (``len(set(answers)) > 1``); with
``official=False`` both sides are always normalised (what most re-implementations, e.g.
lmms-eval, effectively do for sets with one distinct answer).

For data sets with one answer per question (easy-VQA, DAQUAR) the accuracy is exact
match of the normalised strings (``exact_match``).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that
# never matches "<=digit" before a period, so it reduces to "a period not followed by a digit".
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    num_comma = _COMMA_NUM.search(text) is not None
    for p in PUNCT:
        # Punctuation next to a space (or any text with "1,000") is dropped; inside a word
        # ("black-and-white") it becomes a space.
        if (p + " " in text or " " + p in text) or num_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) as the *count* argument: at most 32 periods go.
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full official normalisation of one answer string."""
    return process_digit_article(process_punctuation(_clean(text)))


def soft_score(count: int) -> float:
    """min(#humans / 3, 1): the soft target of answer-classification training."""
    return min(count / 3.0, 1.0)


def vqa_accuracy(prediction: str, answers: Sequence[str], official: bool = True) -> float:
    """Accuracy of one prediction against the human answers (normally 10), averaged over the
    leave-one-out subsets as the official script does (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if not official or len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    if len(gts) == 1:  # no subset to leave out: plain agreement
        return float(gts[0] == pred)
    matches = sum(a == pred for a in gts)
    accs = [min((matches - (a == pred)) / 3.0, 1.0) for a in gts]
    return sum(accs) / len(accs)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised strings are equal (single-answer sets: easy-VQA, DAQUAR)."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def evaluate_vqa(predictions: Sequence[str], answers: Sequence[Sequence[str] | str],
                 official: bool = True) -> dict[str, float]:
    """Mean accuracy in [0, 1] over questions: ``answers[i]`` is a list of human answers
    (soft VQA accuracy) or one string (exact match). Returns {"accuracy", "n"}."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer sets")
    scores = [exact_match(p, a) if isinstance(a, str) else vqa_accuracy(p, a, official)
              for p, a in zip(predictions, answers)]
    return {"accuracy": sum(scores) / max(len(scores), 1), "n": float(len(scores))}


def answer_vocab(answer_lists: Iterable[Sequence[str] | str], min_count: int = 1) -> list[str]:
    """Normalised answers seen at least ``min_count`` times, most frequent first (the
    classifier's label set for VQA as classification)."""
    counts: dict[str, int] = {}
    for ans in answer_lists:
        for a in ([ans] if isinstance(ans, str) else ans):
            a = normalize_answer(a)
            counts[a] = counts.get(a, 0) + 1
    return [a for a, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
