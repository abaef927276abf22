"""A linear-chain conditional random field (Lafferty, McCallum & Pereira 2001) over per-position
emission scores, the output layer of Lample et al. (2016, sec. 2.2) for NER.

For a sequence of n emission vectors E_t (scores of the K tags at position t) and tags y:

    s(y) = a_{y_1} + sum_{t=1..n} E_{t, y_t} + sum_{t=2..n} A_{y_{t-1}, y_t} + b_{y_n}

(a: start scores, A: transition scores, b: end scores), and p(y | E) = exp s(y) / Z with
log Z = logsumexp over all K^n tag sequences, computed by the forward recursion

    alpha_1 = a + E_1,   alpha_t(j) = logsumexp_i (alpha_{t-1}(i) + A_{ij}) + E_{t,j},
    log Z = logsumexp_j (alpha_n(j) + b_j).

The loss is the negative log-likelihood log Z - s(y); decoding is Viterbi (the same recursion
with max, and back-pointers). Sequences are left-aligned in a batch with a mask: a padded step
leaves alpha unchanged, so padding changes neither the loss nor the decode.
"""
from __future__ import annotations

import torch
from torch import nn


class CRF(nn.Module):
    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        # zero scores: the CRF starts as the per-position softmax's argmax (plus a shared log Z)
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]

    def no_weight_decay(self) -> list[str]:
        return ["start", "end", "transitions"]  # scores of tag pairs, not a weight matrix to shrink

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-log p(tags | emissions) per sequence (B,); ``emissions`` (B, n, K), ``tags`` (B, n),
        ``mask`` (B, n) bool with each row's real steps first. Rows without steps give 0."""
        return self.log_partition(emissions, mask) - self.score(emissions, tags, mask)

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s(y) of the given tags (B,)."""
        b, n, _ = emissions.shape
        m = mask.to(emissions.dtype)
        tags = tags.masked_fill(~mask, 0)
        emit = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # (B, n)
        s = self.start[tags[:, 0]] * m[:, 0] + (emit * m).sum(1)
        if n > 1:
            s = s + (self.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = (mask.sum(1) - 1).clamp(min=0)
        return s + self.end[tags[torch.arange(b, device=tags.device), last]] * m[:, 0]

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per sequence (B,) by the forward recursion."""
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions, dim=1) + emissions[:, t]
            alpha = torch.where(mask[:, t, None], step, alpha)
        return torch.logsumexp(alpha + self.end, dim=1) * mask[:, 0].to(emissions.dtype)

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best tag sequence of each row (Viterbi), as lists of its real steps' tags."""
        b, n, _ = emissions.shape
        score = self.start + emissions[:, 0]
        back = []
        for t in range(1, n):
            best, arg = (score.unsqueeze(2) + self.transitions).max(dim=1)
            back.append(arg)
            score = torch.where(mask[:, t, None], best + emissions[:, t], score)
        score = score + self.end
        lengths = mask.sum(1).tolist()
        out = []
        for r in range(b):
            if not lengths[r]:
                out.append([])
                continue
            tag = int(score[r].argmax())
            path = [tag]
            for t in range(lengths[r] - 1, 0, -1):
                tag = int(back[t - 1][r, tag])
                path.append(tag)
            out.append(path[::-1])
        return out
