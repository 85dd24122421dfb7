"""Decode page-selection schemes in plain PyTorch, batched, for studies on a real model.

The kernels (``sparse_kernels.page_select``) implement one scheme, Quest's upper bound summed
over the query heads of a GQA group ("sum"). This module scores the same pages several ways
so that ``decode_selection_study.py`` can compare them on a real model before a scheme is
built into a kernel. Shapes follow a Hugging Face attention call at decode time:

    q  [B, Hkv, G, D]   one query token per row, grouped by KV head (G query heads each)
    k  [B, Hkv, L, D]   every key of the row, position 0 first (pages of ``page`` tokens
                        aligned to position 0, as in vLLM's and SGLang's paged caches)

Schemes (``SCHEMES``), each a score per (row, KV head, page); the top ones are kept:

* ``sum``          Quest, group-summed: sum_g sum_d max(q_gd * min_pd, q_gd * max_pd)
                   (what the kernels compute; checked against the kernel reference in tests)
* ``max``          the same bound, max over the group's heads instead of the sum
* ``norm_max``     each head's bound minus that head's largest bound over the row, then the
                   max over heads: every head votes for its own best pages
* ``softmax_sum``  each head's bounds through a softmax over the row's pages (the attention
                   the bound would give), summed over the heads
* ``mean_q``       the bound of the group's mean query
* ``oracle``       the true attention mass of each page (softmax of the exact logits),
                   summed over the heads: the best any scheme could keep with that budget

Selection as the kernels do it: the first ``sink_pages`` and last ``local_pages`` pages are
always kept, then the best-scoring others up to ``budget_pages``; a row of at most
``budget_pages`` pages, or of at most ``dense_tokens`` tokens, keeps everything.
"""

from __future__ import annotations

import torch

SCHEMES = ("sum", "max", "norm_max", "softmax_sum", "mean_q", "oracle")


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page elementwise min and max of the keys: fp32 ``[B, Hkv, P, D]`` each.

    The last page may be partial; only its valid keys count."""
    b, h, n, d = k.shape
    p = -(-n // page)
    pad = p * page - n
    kf = k.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf"))
    return (lo.view(b, h, p, page, d).amin(3), hi.view(b, h, p, page, d).amax(3))


def head_bounds(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest bound per query head and page: fp32 ``[B, Hkv, G, P]``."""
    qf = q.float()
    return (torch.einsum("bhgd,bhpd->bhgp", qf.clamp(min=0), hi)
            + torch.einsum("bhgd,bhpd->bhgp", qf.clamp(max=0), lo))


def page_mass(probs: torch.Tensor, page: int) -> torch.Tensor:
    """Attention mass per page: ``probs [B, Hkv, G, L]`` -> ``[B, Hkv, G, P]``."""
    b, h, g, n = probs.shape
    p = -(-n // page)
    return torch.nn.functional.pad(probs, (0, p * page - n)).view(b, h, g, p, page).sum(-1)


def scheme_scores(scheme: str, q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  probs: torch.Tensor | None, page: int, scale: float) -> torch.Tensor:
    """Score of every page under ``scheme``: fp32 ``[B, Hkv, P]`` (higher is kept first)."""
    if scheme == "oracle":
        if probs is None:
            raise ValueError("scheme 'oracle' needs the exact attention probabilities")
        return page_mass(probs, page).sum(2)
    if scheme == "mean_q":
        return head_bounds(q.float().mean(2, keepdim=True), lo, hi)[:, :, 0]
    s = head_bounds(q, lo, hi)
    if scheme == "sum":
        return s.sum(2)
    if scheme == "max":
        return s.amax(2)
    if scheme == "norm_max":
        return (s - s.amax(-1, keepdim=True)).amax(2)
    if scheme == "softmax_sum":
        return torch.softmax(s * scale, dim=-1).sum(2)
    raise ValueError(f"unknown selection scheme {scheme!r}; known: {SCHEMES}")


def select_page_mask(scores: torch.Tensor, seq_len: int, page: int, budget_pages: torch.Tensor,
                     sink_pages: int | torch.Tensor, local_pages: int,
                     dense_tokens: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, Hkv, P]``: the pages each (row, KV head) reads.

    ``budget_pages`` and ``dense_tokens`` are int64 ``[B]`` (a budget per row, so rows of one
    batch can compare budgets), ``sink_pages`` an int or int64 ``[B]``; every row holds
    ``seq_len`` tokens."""
    b, h, p = scores.shape
    idx = torch.arange(p, device=scores.device)
    sink = torch.as_tensor(sink_pages, device=scores.device).reshape(-1, 1, 1)
    forced = (idx[None, None, :] < sink) | (idx >= p - local_pages)[None, None, :]
    s = torch.where(forced, float("inf"), scores)
    kmax = int(min(p, int(budget_pages.max())))
    top = s.topk(kmax, dim=-1).indices  # [B, Hkv, kmax], best first
    keep_rank = torch.arange(kmax, device=s.device)[None, None, :] < budget_pages[:, None, None]
    mask = torch.zeros((b, h, p), dtype=torch.bool, device=s.device)
    mask.scatter_(-1, top, keep_rank.expand(b, h, kmax))
    everything = (p <= budget_pages) | (seq_len <= dense_tokens)  # [B]
    return mask | everything[:, None, None]


def token_mask(page_mask: torch.Tensor, seq_len: int, page: int) -> torch.Tensor:
    """``[B, Hkv, P]`` pages -> ``[B, Hkv, L]`` tokens."""
    return page_mask.repeat_interleave(page, dim=-1)[..., :seq_len]
