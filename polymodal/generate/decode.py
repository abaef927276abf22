"""Autoregressive decoding: greedy, sampling and beam search over a KV cache.

A causal LM gives p(x_t | x_<t); generation extends a prompt one token at a
time. With a KV cache (``model.new_cache``) the prompt is processed once
("prefill") and each later step feeds only the newest token, so a step costs
one token's worth of matmuls instead of the whole sequence. ``use_cache=False``
recomputes the full sequence every step; it is slow and exists so tests can
check that both paths give the same tokens.

Batching: prompts of different lengths are LEFT-padded into one (B, T) batch
with an attention mask (1 = real token); the model gives a padded row the same
positions as the unpadded prompt, and the cache remembers which slots are
padding, so decode steps pass the new token only.

Outputs are the NEW tokens of each prompt, without padding. Generation of a
row stops at the first EOS token (the EOS itself is NOT included in the
output), at a stop string (``stop=[...]``, needs ``tokenizer``), or after
``max_new_tokens``. Finished rows of a batch are fed padding until the whole
batch is done.

Beam search (num_beams > 1; Graves 2012, Wu et al. 2016 sec. 7) keeps the
num_beams best partial sequences by sum of log-probabilities; a finished
hypothesis of n generated tokens (counting its EOS) is scored
    score = sum_t log p(y_t | y_<t, x) / n ** length_penalty
(the Hugging Face convention: length_penalty > 0 favours longer sequences,
< 0 shorter ones, 0 is the plain sum). A prompt is done when it has num_beams
finished hypotheses and no running beam can still beat the worst of them.

Models: anything with ``new_cache(batch_size, max_len)`` and
``forward(input_ids, attention_mask=..., cache=..., last_only=True, **model_kwargs)``
returning (B, T, V) logits; ``model.config.block_size`` (if present) is the
context limit.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from .sampler import LogitsProcessor, SamplingParams

NEG_INF = float("-inf")


# -- input handling ------------------------------------------------------------------------------

def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T) or (T,), got shape {tuple(input_ids.shape)}")
        return [list(map(int, row)) for row in input_ids.tolist()]
    input_ids = list(input_ids)
    if input_ids and all(isinstance(t, int) for t in input_ids):
        return [list(input_ids)]  # a single prompt given as a flat list
    prompts = [list(map(int, row)) for row in input_ids]
    return prompts


def _eos_ids(eos_token_id, tokenizer, model) -> list[int]:
    """None = the tokenizer's EOS, else the model config's; [] disables EOS stopping."""
    if eos_token_id is None:
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        eos_token_id = eos
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _check_lengths(prompts: list[list[int]], max_new_tokens: int, model, truncate: bool) -> list[list[int]]:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
    ctx = getattr(getattr(model, "config", None), "block_size", None)
    if ctx is None:
        return prompts
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens <= ctx:
        return prompts
    keep = ctx - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {ctx} tokens (model.config.block_size)")
    if not truncate:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of {ctx} tokens (model.config.block_size); shorten the prompt, lower max_new_tokens, "
            f"or pass truncate=True to keep only the last {keep} prompt tokens"
        )
    return [p[-keep:] for p in prompts]  # keep the most recent tokens: they condition the next one


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, t - len(p):] = 1
    padded = any(len(p) != t for p in prompts)
    return ids.to(device), (mask.to(device) if padded else None)


def _no_repeat_ngram_ban(logits: torch.Tensor, seqs: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Sets -inf for every token that would repeat an n-gram already in the row's
    sequence (prompt + generated), as fairseq / Hugging Face ``no_repeat_ngram_size``."""
    if n <= 0:
        return logits
    bans: list[tuple[int, int]] = []
    for row, seq in enumerate(seqs):
        if len(seq) + 1 < n:
            continue
        prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        for i in range(len(seq) - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                bans.append((row, seq[i + n - 1]))
    if bans:
        r, c = torch.tensor(bans, device=logits.device).T
        logits = logits.index_put((r, c), torch.tensor(NEG_INF, device=logits.device, dtype=logits.dtype))
    return logits


# -- stop strings --------------------------------------------------------------------------------

def _find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def _stop_overlap(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string
    (text that may still turn into a stop string and must be held back when streaming)."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _tokens_before(tokens: list[int], chars: int, tokenizer, start: int = 0) -> int:
    """Largest k such that the text of tokens[:k] has at most ``chars`` characters
    (``start``: a k already known to qualify, so streaming does O(1) decodes per step)."""
    k = start
    while k < len(tokens) and len(tokenizer.decode(tokens[: k + 1])) <= chars:
        k += 1
    return k


# -- the decoding loop ---------------------------------------------------------------------------

class _Run:
    """Shared set-up of generate/stream: validated prompts, sampler, cache, RNG."""

    def __init__(self, model, input_ids, *, max_new_tokens, temperature, top_k, top_p, min_p,
                 repetition_penalty, frequency_penalty, presence_penalty, do_sample, num_beams,
                 length_penalty, no_repeat_ngram_size, eos_token_id, stop, tokenizer, seed, pad_token_id,
                 use_cache, truncate, model_kwargs, generator):
        if stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer: pass tokenizer=...")
        if isinstance(stop, str):
            stop = [stop]
        self.stop = [s for s in (stop or []) if s]
        self.model = model
        self.device = _model_device(model)
        self.prompts = _check_lengths(_as_prompts(input_ids), max_new_tokens, model, truncate)
        self.max_new_tokens = max_new_tokens
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if num_beams > 1 and do_sample:
            raise ValueError("beam search is deterministic: do_sample=True cannot be combined with num_beams > 1")
        if do_sample is None:
            do_sample = num_beams == 1 and temperature > 0  # OpenAI convention: temperature 0 = greedy
        self.processor = LogitsProcessor(SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, do_sample=bool(do_sample)))
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.no_repeat = no_repeat_ngram_size
        self.eos = _eos_ids(eos_token_id, tokenizer, model)
        self.tokenizer = tokenizer
        self.pad = pad_token_id
        self.use_cache = use_cache
        self.model_kwargs = dict(model_kwargs or {})
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator

    def forward(self, ids, mask, cache) -> torch.Tensor:
        """Logits of the last position, (B, V)."""
        return self.model(ids, attention_mask=mask, cache=cache, last_only=True, **self.model_kwargs)[:, -1]

    # -- greedy / sampling: yields the (B,) tokens of each step -----------------------------------
    def steps(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (tokens (B,), finished-before-this-step (B,) bool) per step."""
        b = len(self.prompts)
        ids, mask = _left_pad(self.prompts, self.pad, self.device)
        proc, n_new = self.processor, self.max_new_tokens
        if n_new == 0:
            return
        vocab_state = None
        eos_t = torch.tensor(self.eos, device=self.device) if self.eos else None
        finished = torch.zeros(b, dtype=torch.bool, device=self.device)
        seqs = [list(p) for p in self.prompts] if self.no_repeat else None
        if self.use_cache:
            cache = self.model.new_cache(b, ids.shape[1] + n_new)
            logits = self.forward(ids, mask, cache)
        else:
            full_ids, full_mask = ids, (mask if mask is not None else torch.ones_like(ids))
            logits = self.forward(full_ids, mask, None)
        for step in range(n_new):
            if vocab_state is None:
                vocab_state = proc.new_state(self.prompts, logits.shape[-1], self.device)
            if seqs is not None:
                logits = _no_repeat_ngram_ban(logits.float(), seqs, self.no_repeat)
            tok = proc.next_token(logits, vocab_state, self.generator)
            if eos_t is not None:
                tok = tok.masked_fill(finished, self.pad)
            yield tok, finished
            proc.observe(vocab_state, tok)
            if seqs is not None:
                for s, t in zip(seqs, tok.tolist()):
                    s.append(t)
            if eos_t is not None:
                finished = finished | torch.isin(tok, eos_t)
                if bool(finished.all()):
                    return
            if step == n_new - 1:
                return
            if self.use_cache:
                logits = self.forward(tok[:, None], None, cache)
            else:
                full_ids = torch.cat([full_ids, tok[:, None]], 1)
                full_mask = torch.cat([full_mask, torch.ones_like(tok[:, None])], 1)
                logits = self.forward(full_ids, full_mask if mask is not None else None, None)

    def run(self) -> tuple[list[list[int]], list[bool]]:
        """Greedy/sampled tokens per row (EOS excluded), untrimmed by stop strings
        except that a row stops once its text contains one; plus whether it did."""
        b = len(self.prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        stopped = [False] * b
        ended = [False] * b  # EOS or stop string seen
        chunks: list[torch.Tensor] = []
        for tok, _ in self.steps():
            if not self.stop:
                chunks.append(tok)  # stay on device; one transfer at the end
                continue
            for i, t in enumerate(tok.tolist()):
                if ended[i]:
                    continue
                if t in self.eos:
                    ended[i] = True
                    continue
                out[i].append(t)
                if _find_stop(self.tokenizer.decode(out[i]), self.stop) >= 0:
                    stopped[i] = ended[i] = True
            if all(ended):
                break
        if not self.stop and chunks:
            rows = torch.stack(chunks, 1).tolist()
            for i, row in enumerate(rows):
                for t in row:
                    if t in self.eos:
                        break
                    out[i].append(t)
        return out, stopped

    # -- beam search -----------------------------------------------------------------------------
    def _beam_prefill(self, ids, mask, expand, b: int, nb: int, n_new: int):
        """Logits of the prompts' last positions, one row per beam, and the cache (or the
        expanded inputs to recompute from when ``use_cache`` is off)."""
        if not self.use_cache:
            full_ids = ids.index_select(0, expand)
            full_mask = mask.index_select(0, expand) if mask is not None else None
            return self.forward(full_ids, full_mask, None), None, full_ids, full_mask
        # Prefill each prompt once, then copy its cache rows to its beams.
        cache = self.model.new_cache(b, ids.shape[1] + n_new)
        kw, self.model_kwargs = self.model_kwargs, {
            k: (v[::nb] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b * nb else v)
            for k, v in self.model_kwargs.items()}
        logits = self.forward(ids, mask, cache)
        self.model_kwargs = kw
        cache.reorder(expand)
        return logits.index_select(0, expand), cache, None, None

    @staticmethod
    def _add_hyp(hyps: list, nb: int, score: float, tokens: list[int]) -> None:
        hyps.append((score, tokens))
        hyps.sort(key=lambda h: -h[0])
        del hyps[nb:]

    def _select_beams(self, i: int, scores: list[float], idxs: list[int], v: int, gen: list[list[int]],
                      finished: list, n_gen: int, eos: set[int]) -> tuple[list[int], list[int], list[float], bool]:
        """The nb live beams of prompt ``i`` from its top candidates (EOS candidates in the top nb
        become finished hypotheses), and whether the prompt is done."""
        nb, n_new, lp = self.num_beams, self.max_new_tokens, self.length_penalty
        src, tok, sc = [], [], []
        for rank, (s, idx) in enumerate(zip(scores, idxs)):
            if s == NEG_INF or len(src) == nb:
                break
            b_src, t = i * nb + idx // v, idx % v
            if t in eos:
                if rank < nb:  # an EOS outside the top nb would not have been a beam
                    self._add_hyp(finished, nb, s / n_gen ** lp, gen[b_src])
                continue
            src.append(b_src)
            tok.append(t)
            sc.append(s)
        while len(src) < nb:  # fewer live candidates than beams (tiny vocab / bans)
            src.append(i * nb)
            tok.append(self.pad)
            sc.append(NEG_INF)
        # Done when nb hypotheses are finished and no live beam can still beat the worst:
        # a continuation only lowers the sum s (< 0); its best score is s / n**lp with
        # n = the longest length (lp > 0) or the next length (lp <= 0).
        best_live = max(sc)
        if best_live == NEG_INF:
            return src, tok, sc, True
        if len(finished) == nb:
            n_bound = n_new if lp > 0 else n_gen + 1
            return src, tok, sc, finished[-1][0] >= best_live / n_bound ** lp
        return src, tok, sc, False

    def beam(self) -> list[list[int]]:
        nb, n_new = self.num_beams, self.max_new_tokens
        b = len(self.prompts)
        if self.stop:
            raise ValueError("stop strings are not supported with beam search (num_beams > 1)")
        if n_new == 0:
            return [[] for _ in range(b)]
        proc, dev = self.processor, self.device
        ids, mask = _left_pad(self.prompts, self.pad, dev)
        expand = torch.arange(b, device=dev).repeat_interleave(nb)
        # Per-row tensors in model_kwargs (e.g. encoder memory) follow their beams.
        self.model_kwargs = {k: (v.index_select(0, expand) if isinstance(v, torch.Tensor) and v.dim() > 0
                                 and v.shape[0] == b else v) for k, v in self.model_kwargs.items()}
        logits, cache, full_ids, full_mask = self._beam_prefill(ids, mask, expand, b, nb, n_new)
        seqs = [list(self.prompts[i // nb]) for i in range(b * nb)]  # prompt + generated, per beam
        gen: list[list[int]] = [[] for _ in range(b * nb)]
        state = proc.new_state(seqs, logits.shape[-1], dev)
        # Only beam 0 of each prompt is live at the start (the others are copies).
        beam_scores = torch.zeros(b, nb, device=dev)
        beam_scores[:, 1:] = NEG_INF
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b
        eos = set(self.eos)
        for step in range(n_new):
            logp = _no_repeat_ngram_ban(proc.penalize(logits, state), seqs, self.no_repeat).log_softmax(-1)
            v = logp.shape[-1]
            cand = (beam_scores.view(-1, 1) + logp).view(b, nb * v)
            # 2*nb candidates: enough to refill nb beams even if nb of them end in EOS
            top_scores, top_idx = (t.tolist() for t in cand.topk(min(2 * nb, nb * v), dim=-1))
            new_src, new_tok, new_scores = [], [], []
            for i in range(b):
                if done[i]:  # keep shapes: feed padding to a finished prompt's beams
                    src, tok, sc = [i * nb] * nb, [self.pad] * nb, [NEG_INF] * nb
                else:
                    src, tok, sc, done[i] = self._select_beams(i, top_scores[i], top_idx[i], v, gen, finished[i],
                                                               step + 1, eos)
                new_src += src
                new_tok += tok
                new_scores += sc
            src_t = torch.tensor(new_src, device=dev)
            tok_t = torch.tensor(new_tok, device=dev)
            beam_scores = torch.tensor(new_scores, device=dev).view(b, nb)
            seqs = [seqs[s] + [t] for s, t in zip(new_src, new_tok)]
            gen = [gen[s] + [t] for s, t in zip(new_src, new_tok)]
            proc.reorder_state(state, src_t)
            proc.observe(state, tok_t)
            if all(done) or step == n_new - 1:
                break
            if cache is not None:
                cache.reorder(src_t)
                logits = self.forward(tok_t[:, None], None, cache)
            else:
                full_ids = torch.cat([full_ids.index_select(0, src_t), tok_t[:, None]], 1)
                if full_mask is not None:
                    full_mask = torch.cat([full_mask.index_select(0, src_t), torch.ones_like(tok_t[:, None])], 1)
                logits = self.forward(full_ids, full_mask, None)
        # Prompts that ran out of max_new_tokens: their live beams are hypotheses too.
        scores = beam_scores.tolist()
        for i in range(b):
            for j in range(nb) if not done[i] else ():
                if scores[i][j] != NEG_INF:
                    self._add_hyp(finished[i], nb, scores[i][j] / max(len(gen[i * nb + j]), 1) ** self.length_penalty,
                                  gen[i * nb + j])
        return [finished[i][0][1] if finished[i] else [] for i in range(b)]


# -- public API ----------------------------------------------------------------------------------

_DOC_PARAMS = """
    Args:
        model: a model with ``new_cache(batch, max_len)`` and
            ``forward(ids, attention_mask=, cache=, last_only=True)`` (e.g. ``polymodal.GPT``).
        input_ids: one prompt (list of ints / 1-D tensor) or a batch: a list of lists of any
            lengths (left-padded here), or a (B, T) tensor whose every position is a real token.
        max_new_tokens: the most tokens generated per prompt.
        temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty,
            presence_penalty: see ``polymodal.generate.sampler`` (applied in its documented order).
        do_sample: None = sample iff temperature > 0 and num_beams == 1; False = greedy
            (argmax after penalties).
        num_beams, length_penalty: beam search (num_beams > 1), see the module docstring.
        no_repeat_ngram_size: forbid repeating any n-gram of the prompt + output (0 = off).
        eos_token_id: int or list; None = the tokenizer's EOS, else ``model.config.eos_token_id``;
            [] = never stop at EOS. The EOS token is not part of the output.
        stop: strings that end generation (needs ``tokenizer``); tokens that (partly) produce
            a stop string are dropped from the token output (``generate_text`` cuts the text exactly).
        seed / generator: make sampling reproducible.
        pad_token_id: the id used for left padding and for finished rows (never returned).
        use_cache: False recomputes the whole sequence each step (slow; for testing).
        truncate: when prompt + max_new_tokens exceed ``model.config.block_size``, keep the
            last tokens of the prompt instead of raising ValueError.
        model_kwargs: extra keyword arguments passed to every model call (e.g. an encoder's
            memory). For beam search, tensors whose first dim is the batch size are treated as
            per-prompt and repeated for each beam.
"""


def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    do_sample: bool | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | list[int] | None = None,
    stop: list[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    truncate: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generates continuations; returns the new tokens of each prompt (a list per prompt)."""
    r = _Run(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
             presence_penalty=presence_penalty, do_sample=do_sample, num_beams=num_beams,
             length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id,
             stop=stop, tokenizer=tokenizer, seed=seed, pad_token_id=pad_token_id, use_cache=use_cache,
             truncate=truncate, model_kwargs=model_kwargs, generator=generator)
    with _eval_mode(model), torch.inference_mode():
        if r.num_beams > 1:
            return r.beam()
        out, stopped = r.run()
    for i, row in enumerate(out):
        if stopped[i]:
            text = tokenizer.decode(row)
            out[i] = row[: _tokens_before(row, _find_stop(text, r.stop), tokenizer)]
    return out


generate.__doc__ += _DOC_PARAMS


def stream(model, input_ids, *, max_new_tokens: int, **kw) -> Iterator[int]:
    """Yields the token ids of ONE prompt as they are produced (same tokens as ``generate``).

    With ``stop`` strings, tokens whose text could still become a stop string are held back
    until it is clear they do not; tokens that produce a stop string are never yielded.
    Closing the generator early stops the model.
    """
    if kw.get("num_beams", 1) != 1:
        raise ValueError("stream() does not support beam search: the best beam is only known at the end")
    r = _Run(model, input_ids, max_new_tokens=max_new_tokens, **_run_defaults(kw))
    if len(r.prompts) != 1:
        raise ValueError(f"stream() takes one prompt, got {len(r.prompts)}; use generate() for a batch")
    tok = r.tokenizer
    out: list[int] = []
    sent = 0
    with _eval_mode(model):
        gen = r.steps()
        try:
            while True:
                with torch.inference_mode():
                    item = next(gen, None)
                if item is None:
                    break
                t = int(item[0][0])
                if t in r.eos:
                    break
                if not r.stop:
                    yield t
                    continue
                out.append(t)
                text = tok.decode(out)
                s = _find_stop(text, r.stop)
                if s >= 0:
                    out = out[: _tokens_before(out, s, tok, sent)]
                    yield from out[sent:]
                    return
                safe = _tokens_before(out, len(text) - _stop_overlap(text, r.stop), tok, sent)
                if safe > sent:
                    yield from out[sent:safe]
                    sent = safe
            yield from out[sent:]
        finally:
            gen.close()


def _run_defaults(kw: dict) -> dict:
    allowed = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
                   presence_penalty=0.0, do_sample=None, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
                   eos_token_id=None, stop=None, tokenizer=None, seed=None, pad_token_id=0, use_cache=True,
                   truncate=False, model_kwargs=None, generator=None)
    unknown = set(kw) - set(allowed)
    if unknown:
        raise TypeError(f"unknown generation argument(s): {sorted(unknown)}")
    allowed.update(kw)
    return allowed


class _eval_mode:
    """Generation runs without dropout; the model's train/eval mode is restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = getattr(self.model, "training", False)
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not ids and getattr(tokenizer, "bos_id", None) is not None:
        ids = [tokenizer.bos_id]
    return ids


def generate_text(model, tokenizer, prompt: str, **kw) -> str:
    """Encodes ``prompt``, generates, and returns the new text (cut exactly at a stop string)."""
    if kw.get("num_beams", 1) > 1:
        return tokenizer.decode(generate(model, _encode_prompt(tokenizer, prompt), tokenizer=tokenizer, **kw)[0])
    kw = dict(kw)
    if "max_new_tokens" not in kw:
        raise TypeError("generate_text() needs max_new_tokens=")
    max_new = kw.pop("max_new_tokens")
    r = _Run(model, [_encode_prompt(tokenizer, prompt)], max_new_tokens=max_new,
             **_run_defaults({**kw, "tokenizer": tokenizer}))
    with _eval_mode(model), torch.inference_mode():
        out, stopped = r.run()
    text = tokenizer.decode(out[0])
    if stopped[0]:
        text = text[: _find_stop(text, r.stop)]
    return text


def stream_text(model, tokenizer, prompt: str, **kw) -> Iterator[str]:
    """Yields pieces of new text for ``prompt`` as they are produced (complete UTF-8 only);
    with ``stop`` strings, text is held back while it could still be a stop string's start,
    and the output ends exactly before the stop string."""
    stop = kw.pop("stop", None) or []
    if isinstance(stop, str):
        stop = [stop]
    decoder = _stream_decoder(tokenizer)
    text, sent = "", 0
    for t in stream(model, _encode_prompt(tokenizer, prompt), tokenizer=tokenizer, **kw):
        text += decoder.push(t)
        if not stop:
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            continue
        s = _find_stop(text, stop)
        if s >= 0:
            if s > sent:
                yield text[sent:s]
            return
        safe = len(text) - _stop_overlap(text, stop)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text += decoder.flush() if hasattr(decoder, "flush") else ""
    s = _find_stop(text, stop) if stop else -1
    end = s if s >= 0 else len(text)
    if end > sent:
        yield text[sent:end]


def _stream_decoder(tokenizer):
    from ..tokenizers import StreamDecoder  # lazily: the tokenizer package is only needed for text

    return StreamDecoder(tokenizer)
