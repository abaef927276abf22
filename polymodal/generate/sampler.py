"""The one logits processor shared by every generative model.

A step of generation turns the model's next-token logits z (B, V) into a token.
Every transformation below is applied in this FIXED order (the order matters:
e.g. a temperature applied before top-p changes which tokens form the nucleus):

1. Penalties on tokens already seen (they change the model's preferences, so
   they act on the raw logits, before any reshaping of the distribution):
   * repetition penalty (CTRL, Keskar et al., 2019, sec. 4.1): for every token
     present in the prompt or the generated text, z <- z / r if z > 0 else z * r
     (the Hugging Face convention, which keeps r > 1 a penalty for negative logits);
   * frequency and presence penalties (OpenAI API): for the tokens generated so far,
     z <- z - frequency_penalty * count - presence_penalty * [count > 0].
2. Greedy decoding stops here: token = argmax z.
3. Temperature: z <- z / T  (p = softmax(z / T); T -> 0 is greedy, T > 1 flattens).
4. Top-k (Fan et al., 2018): keep the k largest logits. Tokens tied with the
   k-th largest logit are kept too, so the result never depends on sort order.
5. Top-p / nucleus (Holtzman et al., 2019, eq. 3): with p = softmax(z) of the
   tokens left after top-k, keep the smallest set V(p) of most probable tokens
   whose cumulative probability is >= top_p. The most probable token is always
   kept, and tokens tied with the least probable member of V(p) are kept too.
6. Min-p (Nguyen et al., 2024): keep tokens with p >= min_p * max p, where p is
   the softmax of the logits left after top-p (renormalised).

Removed tokens get logit -inf; the token is then drawn from softmax of what is
left. Sampling uses the exponential-race trick (argmax p / q, q ~ Exp(1), which
draws index i with probability p_i) so a draw needs no host-device sync, and a
``torch.Generator`` makes it reproducible.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SamplingParams:
    """The knobs of :class:`LogitsProcessor`; the defaults change nothing."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    do_sample: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.temperature == 0:  # T -> 0 is the argmax: the OpenAI convention
            self.do_sample = False

    @property
    def uses_repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_counts(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# -- the individual processors (each one formula, each tested on hand-made logits) ----------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL: z/r for positive, z*r for negative logits of the ``seen`` (B, V) bool tokens."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI: z - frequency * count - presence * [count > 0]; ``counts`` (B, V)."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    c = counts.to(logits.dtype)
    return logits - frequency * c - presence * (c > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps logits >= the k-th largest (ties at the boundary kept); k = 0 or k >= V is off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: the smallest most-probable set with cumulative probability >= p.

    A sorted token is in the nucleus when the probability mass strictly before it
    is < p (so the first token is always in). Its probability threshold is the
    smallest kept probability; every token at or above it is kept (ties included).
    """
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_p = probs.sort(dim=-1, descending=True).values
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more probable tokens
    n_keep = (before < p).sum(-1, keepdim=True).clamp(min=1)
    threshold = sorted_p.gather(-1, n_keep - 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keeps tokens with p >= min_p * p_max (the top token always survives)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    p_max = probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < min_p * p_max, float("-inf"))


class LogitsProcessor:
    """Applies the documented order to (B, V) logits and picks tokens.

    ``seen`` (B, V) bool marks prompt + generated tokens (repetition penalty);
    ``counts`` (B, V) counts generated tokens only (frequency/presence penalties,
    as the OpenAI API counts the completion's tokens). Both are kept by
    :meth:`new_state` / :meth:`observe` and only allocated when a penalty is on.
    """

    def __init__(self, params: SamplingParams | None = None, **kw):
        self.params = params if params is not None else SamplingParams(**kw)

    # -- per-row token statistics -------------------------------------------------------
    def new_state(self, prompts: list[list[int]], vocab_size: int, device) -> dict[str, torch.Tensor | None]:
        p = self.params
        seen = counts = None
        if p.uses_repetition:
            seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for i, row in enumerate(prompts):
                if row:
                    seen[i, torch.tensor(row, dtype=torch.long, device=device)] = True
        if p.uses_counts:
            counts = torch.zeros(len(prompts), vocab_size, dtype=torch.int32, device=device)
        return {"seen": seen, "counts": counts}

    def observe(self, state: dict, tokens: torch.Tensor) -> None:
        """Records the (B,) tokens just produced."""
        idx = tokens.view(-1, 1)
        if state["seen"] is not None:
            state["seen"].scatter_(1, idx, True)
        if state["counts"] is not None:
            state["counts"].scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))

    @staticmethod
    def reorder_state(state: dict, index: torch.Tensor) -> None:
        for k in ("seen", "counts"):
            if state.get(k) is not None:
                state[k] = state[k].index_select(0, index)

    # -- the pipeline ----------------------------------------------------------------------
    def penalize(self, logits: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """Step 1 (penalties) on fp32 logits."""
        p = self.params
        logits = logits.float()
        if state is not None:
            if state.get("seen") is not None:
                logits = apply_repetition_penalty(logits, state["seen"], p.repetition_penalty)
            if state.get("counts") is not None:
                logits = apply_frequency_presence(logits, state["counts"], p.frequency_penalty, p.presence_penalty)
        return logits

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Steps 3-6 (temperature, top-k, top-p, min-p): filtered logits, -inf where removed."""
        p = self.params
        logits = apply_temperature(logits, p.temperature)
        logits = apply_top_k(logits, p.top_k)
        logits = apply_top_p(logits, p.top_p)
        return apply_min_p(logits, p.min_p)

    def __call__(self, logits: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """The full processed logits (penalties, then the warpers when sampling)."""
        logits = self.penalize(logits, state)
        return self.warp(logits) if self.params.do_sample else logits

    def next_token(self, logits: torch.Tensor, state: dict | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, V) logits -> (B,) int64 tokens: argmax after penalties, or a draw."""
        logits = self.penalize(logits, state)
        if not self.params.do_sample:
            return logits.argmax(-1)
        return sample_from_logits(self.warp(logits), generator)


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws one token per row from softmax(logits) (-inf = excluded).

    argmax_i p_i / q_i with q_i ~ Exp(1) i.i.d. picks i with probability p_i
    (the race of exponential clocks), and needs no sync with the host."""
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / q).argmax(-1)
