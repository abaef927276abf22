"""k-shot in-context classification by label likelihood (GPT-3 style).

Brown et al. 2020, "Language Models are Few-Shot Learners", sec. 2.4: for tasks with a small set of
answers, the model is conditioned on K demonstrations ``context -> answer`` followed by the query
context, and each candidate completion ``c`` is scored by its likelihood

    score(c) = sum_{j=1..|c|} log P(c_j | prompt, c_<j)                       (summed log-probability)

optionally normalised per token, ``score(c) / |c|`` (the per-token normalisation the paper uses on
most tasks). The prediction is the argmax over candidates; no parameter is updated.

Implementation: every (prompt, candidate) sequence is ``tokens(prompt) + tokens(candidate)`` (the
two are tokenised separately so the candidate's tokens are the same for every prompt), left-padded
to the longest sequence of its batch with an ``attention_mask`` so that every continuation ends at
the last column and its log-probabilities are read from the last ``|c|`` positions. When every
candidate is a single token the prompt is run once and all candidates are read from its final
position, which is the common case for verbalisers such as " positive" / " negative". The token
prefix common to all prompts (the k demonstrations) is run once into a KV cache that every batch
reuses; the per-query rest is left-padded after it and the padding masked out of attention.

Demonstrations are drawn once per seed from the training split, balanced across labels
(k // n_labels of each, the remainder drawn at random), and shared by every evaluation query, as in
Zhao et al. 2021 ("Calibrate Before Use") - GPT-3 itself redraws them per query; a fixed set makes
the seed the only source of variance and keeps runs reproducible.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal, Sequence

import torch

# The GPT-3 style template. A demonstration is rendered as
#     Review: <sentence>
#     Sentiment: <label word>
# demonstrations are separated by a blank line, and the query ends after "Sentiment:" so the
# candidate continuations are the label words with a leading space (" positive" / " negative").
DEFAULT_TEMPLATE = "Review: {text}\nSentiment:{label}"
DEMO_SEPARATOR = "\n\n"

# Verbalisers: label id -> the word the model should continue with (leading space added by the
# template's "Sentiment:{label}" slot).
VERBALIZERS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
}


def build_prompt(demos: Sequence[tuple[str, str]], query: str, template: str = DEFAULT_TEMPLATE,
                 separator: str = DEMO_SEPARATOR) -> str:
    """The k-shot prompt: each ``(text, label_word)`` demo rendered with ``template``, then the query
    rendered with an empty label.

    ``template`` must contain ``{text}`` and ``{label}``; the label slot receives ``" " + word``
    for demonstrations and ``""`` for the query, so the prompt ends exactly where the candidate
    continuation (``" " + word``) starts. Example with the default template and one demo::

        Review: a gorgeous film
        Sentiment: positive

        Review: dull and overlong
        Sentiment:
    """
    if "{text}" not in template or "{label}" not in template:
        raise ValueError(f"template must contain {{text}} and {{label}}, got {template!r}")
    if not template.rstrip().endswith("{label}"):
        raise ValueError(f"template must end with {{label}} (the continuation is scored after it), got {template!r}")
    parts = [template.format(text=t, label=" " + lab) for t, lab in demos]
    parts.append(template.format(text=query, label=""))
    return separator.join(parts)


def _score_positions(model, ids: torch.Tensor, mask: torch.Tensor, n_last: int, cache=None) -> torch.Tensor:
    """Log-softmax over the vocabulary at the last ``n_last`` positions (B, n_last, V).

    Only those positions go through the LM head: with a 49k vocabulary the head dominates the cost
    of long few-shot prompts otherwise. With ``cache`` (holding a shared prompt prefix) ``ids`` are
    the tokens that follow it."""
    if cache is not None:
        h = model.hidden_states(ids, attention_mask=mask, cache=cache)
        return torch.log_softmax(model.lm_head(h[:, -n_last:]).float(), dim=-1)
    am = mask if not bool(mask.all()) else None
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        h = model.hidden_states(ids, attention_mask=am)
        logits = model.lm_head(h[:, -n_last:])
    else:
        logits = model(ids, attention_mask=am)[:, -n_last:]
    return torch.log_softmax(logits.float(), dim=-1)


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _expand_cache(cache, batch: int):
    """A batch-``batch`` copy of a batch-1 cache (the original is left untouched)."""
    import copy

    c = copy.copy(cache)
    c.k, c.v = list(cache.k), list(cache.v)
    c.reorder(torch.zeros(batch, dtype=torch.long, device=cache.key_valid.device))  # index_select copies
    return c


@torch.no_grad()
def label_likelihood_scores(model, tokenizer, prompts: Sequence[str], candidates: Sequence[str],
                            batch_size: int = 8, normalize: str = "none", pad_id: int | None = None,
                            add_bos: bool = False, share_prefix: bool = True) -> torch.Tensor:
    """Log-likelihood of each candidate continuation given each prompt, (N, C) float32.

    Args:
        model: a causal LM; ``model(ids, attention_mask=...)`` -> logits (B, T, V), left padding
            supported through ``attention_mask`` (1 = real token).
        tokenizer: has ``encode(text) -> list[int]``.
        prompts: N prompt strings (e.g. from ``build_prompt``).
        candidates: C continuation strings, scored after the prompt (include the leading space).
        batch_size: sequences per forward pass.
        normalize: "none" (summed log-probability), "token" (divided by the candidate's token
            count) or "char" (divided by its character count).
        pad_id: id placed in padded slots (masked out, so any valid id works); default the
            tokenizer's pad id, else 0.
        add_bos: prepend the tokenizer's BOS id to every prompt.
        share_prefix: run the token prefix common to all prompts (the k demonstrations) once and
            reuse its KV cache for every batch (needs ``model.new_cache`` / ``hidden_states``);
            the rest of each prompt is left-padded after it, which the cache masks out.
    """
    if normalize not in ("none", "token", "char"):
        raise ValueError(f"normalize must be 'none', 'token' or 'char', got {normalize!r}")
    if not candidates:
        raise ValueError("label_likelihood_scores: no candidates")
    if not prompts:
        return torch.zeros(0, len(candidates))
    cand_ids = [list(tokenizer.encode(c)) for c in candidates]
    for c, ids in zip(candidates, cand_ids):
        if not ids:
            raise ValueError(f"candidate {c!r} encodes to no tokens")
    prompt_ids = [list(tokenizer.encode(p)) for p in prompts]
    if add_bos:
        if getattr(tokenizer, "bos_id", None) is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        prompt_ids = [[tokenizer.bos_id] + p for p in prompt_ids]
    for i, p in enumerate(prompt_ids):
        if not p:  # the first candidate token needs a position to be predicted from
            raise ValueError(f"prompt {i} encodes to no tokens; pass add_bos=True or a non-empty prompt")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_id", None)
        pad_id = 0 if pad_id is None else pad_id
    device = next(model.parameters()).device
    n, c = len(prompt_ids), len(cand_ids)
    scores = torch.zeros(n, c)
    single = all(len(ci) == 1 for ci in cand_ids)

    # The shared prefix (token level, so it is exact whatever the tokenizer merges) keeps at least
    # one prompt token outside it: the last prompt position must be computed to score candidates.
    prefix_cache, p0 = None, 0
    if share_prefix and hasattr(model, "new_cache") and hasattr(model, "hidden_states"):
        p0 = min(_common_prefix_len(prompt_ids), min(len(p) for p in prompt_ids) - 1)
        if p0 > 0:
            longest = max(len(p) for p in prompt_ids) + max(len(ci) for ci in cand_ids)
            prefix_cache = model.new_cache(1, longest, device=device)
            model.hidden_states(torch.tensor([prompt_ids[0][:p0]], device=device), cache=prefix_cache)
        else:
            p0 = 0

    # Work items: (prompt index, candidate index or -1 for "all single-token candidates").
    items = [(i, -1) for i in range(n)] if single else [(i, j) for i in range(n) for j in range(c)]
    # Sorting by length keeps padding (wasted compute) small inside each batch.
    seq = lambda it: prompt_ids[it[0]][p0:] + ([] if it[1] < 0 else cand_ids[it[1]])
    items.sort(key=lambda it: len(seq(it)))
    first_tok = torch.tensor([ci[0] for ci in cand_ids], device=device)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        seqs = [seq(it) for it in chunk]
        t = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for b, x in enumerate(seqs):
            ids[b, t - len(x):] = torch.tensor(x)
            mask[b, t - len(x):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = _expand_cache(prefix_cache, len(chunk)) if prefix_cache is not None else None
        if single:
            logp = _score_positions(model, ids, mask, 1, cache)[:, 0]  # (B, V) next-token log-probs
            for b, (i, _) in enumerate(chunk):
                scores[i] = logp[b, first_tok].cpu()
            continue
        n_last = max(len(cand_ids[j]) for _, j in chunk)
        # position p predicts token p+1: the candidate's L tokens are predicted from the L
        # positions just before the end of the sequence.
        logp = _score_positions(model, ids[:, :-1], mask[:, :-1], n_last, cache)  # (B, n_last, V)
        for b, (i, j) in enumerate(chunk):
            L = len(cand_ids[j])
            tgt = torch.tensor(cand_ids[j], device=device)
            scores[i, j] = logp[b, n_last - L:].gather(-1, tgt[:, None]).sum().cpu()
    if normalize == "token":
        scores = scores / torch.tensor([len(ci) for ci in cand_ids], dtype=torch.float32)
    elif normalize == "char":
        scores = scores / torch.tensor([max(len(cs), 1) for cs in candidates], dtype=torch.float32)
    return scores


def pick_demos(examples: Sequence, k: int, n_labels: int, seed: int) -> list:
    """``k`` training examples, balanced across labels (``k // n_labels`` each, the remainder from
    random labels), in a seeded random order. Examples need a ``label`` attribute."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rng = random.Random(seed)
    by_label: dict[int, list] = {lab: [] for lab in range(n_labels)}
    for e in examples:
        by_label[int(e.label)].append(e)
    counts = {lab: k // n_labels for lab in by_label}
    for lab in rng.sample(sorted(by_label), k % n_labels):
        counts[lab] += 1
    demos = []
    for lab in sorted(by_label):
        if counts[lab] > len(by_label[lab]):
            raise ValueError(f"need {counts[lab]} demonstrations of label {lab}, the split has {len(by_label[lab])}")
        demos += rng.sample(by_label[lab], counts[lab])
    rng.shuffle(demos)
    return demos


def fewshot_classify(model, tokenizer, task: str = "sst2", k: int = 4, seed: int = 0, n_eval: int | None = 200,
                     data_dir: str | Path | None = None, template: str = DEFAULT_TEMPLATE,
                     batch_size: int = 8, normalize: str = "none", train=None, val=None) -> dict:
    """Accuracy of k-shot classification on the task's validation split.

    Demonstrations come from the train split (``pick_demos``); the first ``n_eval`` validation
    examples (all when None) are classified by ``label_likelihood_scores``. ``train``/``val`` may
    be passed as lists of examples (``text_a``, ``label``) to skip reading files.

    Returns ``{"k", "accuracy", "majority", "n", "seconds", "pred_positive_rate"}`` where ``majority`` is the accuracy of
    always predicting the train split's most frequent label on the same examples and
    ``pred_positive_rate`` the fraction of predictions that are label 1.
    """
    from ..data.tasks import load_split

    if task not in VERBALIZERS:
        raise ValueError(f"no verbaliser for task {task!r}; known: {sorted(VERBALIZERS)}")
    words = VERBALIZERS[task]
    if train is None:
        train = load_split(task, "train", data_dir)
    if val is None:
        val = load_split(task, "val", data_dir)
    val = list(val)[:n_eval] if n_eval is not None else list(val)
    if not val:
        raise ValueError(f"{task}: no validation examples to evaluate")
    demos = [(e.text_a, words[int(e.label)]) for e in pick_demos(train, k, len(words), seed)]
    prompts = [build_prompt(demos, e.text_a, template) for e in val]
    t0 = time.perf_counter()
    scores = label_likelihood_scores(model, tokenizer, prompts, [" " + w for w in words],
                                     batch_size=batch_size, normalize=normalize)
    seconds = time.perf_counter() - t0
    gold = torch.tensor([int(e.label) for e in val])
    pred = scores.argmax(-1)
    counts = torch.bincount(torch.tensor([int(e.label) for e in train]), minlength=len(words))
    majority_label = int(counts.argmax())
    return {"k": k, "accuracy": float((pred == gold).float().mean()),
            "majority": float((gold == majority_label).float().mean()), "n": len(val), "seconds": seconds,
            "pred_positive_rate": float((pred == 1).float().mean())}


def format_table(rows: list[dict]) -> str:
    """One line per k; ``pred_pos`` is the fraction predicted as label 1, which exposes label bias."""
    lines = [f"{'k':>3}  {'accuracy':>8}  {'majority':>8}  {'pred_pos':>8}  {'n':>5}  {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['k']:>3}  {r['accuracy']:>8.3f}  {r['majority']:>8.3f}  {r['pred_positive_rate']:>8.3f}"
                     f"  {r['n']:>5}  {r['seconds']:>8.1f}")
    return "\n".join(lines)
