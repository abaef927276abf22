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
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from ..data.vqa import VQAExample

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


# -- VQA as classification: predictions, references, the baseline -------------------------
def gold(examples: Sequence["VQAExample"]) -> list[str | list[str]]:
    """What :func:`evaluate_vqa` scores against: one string (exact match) or the human answers (soft)."""
    return [e.answers[0] if len(e.answers) == 1 else list(e.answers) for e in examples]


def majority_baseline(train: Sequence["VQAExample"], evaluated: Sequence["VQAExample"]) -> tuple[str, float]:
    """(the commonest training answer, its accuracy when predicted for every evaluated question):
    the language-prior floor a model must clear (Antol et al., 2015, sec. 6, "prior ('yes')")."""
    top = answer_vocab([e.answers for e in train])[0]
    return top, evaluate_vqa([top] * len(evaluated), gold(evaluated))["accuracy"]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Right-padded (ids, mask) LongTensors of token rows, ``length`` long (default: the longest row)."""
    import torch

    longest = max([len(r) for r in rows] + [length or 0])
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def predict_fusion(model, tokenizer, cache, examples: Sequence["VQAExample"], batch_size: int = 256,
                   top_k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-k (answer, probability) per question of a VisualBERT / ViLBERT that embeds its own
    pixels (``cache``: a ``polymodal.data.image_cache.PixelCache`` holding the examples' images).
    Questions are sorted by image, so the stem runs once per image of a batch."""
    import torch

    from ..tokenizers.question import encode_question

    answers, max_len = model.config.answers, model.config.max_text_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: cache.index[examples[i].image])
    out: list = [None] * len(examples)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            rows = [cache.index[examples[i].image] for i in idx]
            uniq = list(dict.fromkeys(rows))
            where = {r: j for j, r in enumerate(uniq)}
            ids, mask = pad_rows([encode_question(tokenizer, examples[i].question, max_len) for i in idx],
                                 tokenizer.pad_id)
            logits = model(ids.to(device), attention_mask=mask.to(device), pixel_values=cache.pixels(uniq).to(device),
                           image_index=torch.tensor([where[r] for r in rows], device=device))["vqa"]
            p, j = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
            for r, i in enumerate(idx):
                out[i] = [(answers[a], round(float(q), 5)) for a, q in zip(j[r].tolist(), p[r].tolist())]
    model.train(was_training)
    return out


def load_vqa_model(path):
    """(model, tokenizer, family) of a VisualBERT / ViLBERT / generative VLM checkpoint or run folder."""
    from ..interop import load, resolve_model_path

    path = resolve_model_path(path)
    model, tok = load(path)
    family = getattr(model.config, "family", None)
    if family not in ("visualbert", "vilbert", "vlm"):
        raise ValueError(f"{path}: a {family!r} checkpoint cannot answer questions (need visualbert, vilbert or vlm)")
    if family != "vlm" and (not model.config.answers or model.config.image_size <= 0):
        raise ValueError(f"{path}: this {family} checkpoint has no answer list or pixel front end "
                         "(train it with 'polymodal train-vqa')")
    if tok is None:
        raise ValueError(f"{path}: the checkpoint has no tokenizer (tokenizer.json)")
    return model.eval(), tok, family


def predict_answers(model, tokenizer, family: str, examples: Sequence["VQAExample"], batch_size: int = 256,
                    max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """One answer string per question: a fusion model's top class, or a VLM's greedy text
    (batched; each answer equals the one-question answer)."""
    if family == "vlm":
        from ..generate.vlm import answer_questions

        return answer_questions(model, tokenizer, [e.image for e in examples], [e.question for e in examples],
                                max_new_tokens=max_new_tokens, progress=progress)
    from ..data.image_cache import PixelCache
    from ..data.images import ImageProcessor

    cache = PixelCache(ImageProcessor.from_config(model.config), [e.image for e in examples], progress)
    return [p[0][0] for p in predict_fusion(model, tokenizer, cache, examples, batch_size)]


def baseline_for(data, split: str, image_root, examples: Sequence["VQAExample"], model) -> tuple[str, float, str]:
    """(answer, accuracy, source) of the most-frequent-answer baseline on ``examples``. The answer
    comes from training data: the train split beside the evaluated one, else the fusion model's
    answer list (most frequent first), else (a VLM, no train split) the evaluated split itself."""
    from pathlib import Path

    from ..data.vqa import load_vqa

    if split != "train" and Path(data).is_dir():
        try:
            return (*majority_baseline(load_vqa(data, "train", image_root), examples), "train split")
        except FileNotFoundError:
            pass
    answers = getattr(model.config, "answers", None)
    if answers:
        return answers[0], evaluate_vqa([answers[0]] * len(examples), gold(examples))["accuracy"], \
            "model's training answers"
    return (*majority_baseline(examples, examples), "evaluated split (oracle)")
