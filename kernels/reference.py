"""PyTorch references shared by every kernel: paged-KV gathering and dense attention.

Slow and obvious on purpose. Kernel-specific references live beside their kernels
(``reference_decode.py``, ``reference_prefill.py``) and build on these.
"""

from __future__ import annotations

import math

import torch


def gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    b: int,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[seq_len, num_kv_heads, head_dim]`` K and V of sequence ``b``."""
    page = k_cache.shape[1]
    n_pages = -(-seq_len // page)
    pages = block_table[b, :n_pages].long()
    k = k_cache[pages].reshape(n_pages * page, *k_cache.shape[2:])[:seq_len]
    v = v_cache[pages].reshape(n_pages * page, *v_cache.shape[2:])[:seq_len]
    return k, v


def attention_with_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention in fp32.

    q ``[Lq, Hq, D]``, k/v ``[Lk, Hkv, D]``, mask bool broadcastable to ``[Hq, Lq, Lk]``
    (True = attend). Rows with nothing to attend produce zeros.
    """
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.matmul(p, vf).transpose(0, 1)  # [Lq, Hq, D]


def causal_mask(q_len: int, seq_len: int, device=None) -> torch.Tensor:
    """``[q_len, seq_len]``: query i sits at position ``seq_len - q_len + i``."""
    qpos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    kpos = torch.arange(seq_len, device=device)[None, :]
    return kpos <= qpos


def dense_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense causal attention of a ragged batch over a paged cache (the ground truth).

    q ``[num_tokens, Hq, D]``; returns fp32 ``[num_tokens, Hq, D]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        k, v = gather_kv(k_cache, v_cache, block_table, b, seq_len)
        mask = causal_mask(q1 - q0, seq_len, q.device)[None]
        out[q0:q1] = attention_with_mask(q[q0:q1], k, v, mask, scale)
    return out


def random_paged_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    layout: str = "NHD",
    extra_pages: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and a shuffled block table for tests.

    ``layout``:
      - ``"NHD"``: separate ``[pages, page, H, D]`` tensors;
      - ``"HND"``: stored ``[pages, H, page, D]``, returned as permuted views;
      - ``"interleaved"``: vLLM 0.26 Triton layout, one ``[pages, H, page, 2*D]`` tensor,
        returned as the two views ``transpose(1, 2).split(D, -1)``.
    Unused pages are filled with large garbage so reading them shows up in results.
    """
    max_pages = max(-(-s // page_size) for s in seq_lens)
    num_pages = sum(-(-s // page_size) for s in seq_lens) + extra_pages
    g = generator
    if layout == "NHD":
        k = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=g).to(dtype)
    elif layout == "HND":
        k = torch.randn(num_pages, num_kv_heads, page_size, head_dim, generator=g).to(dtype)
        v = torch.randn(num_pages, num_kv_heads, page_size, head_dim, generator=g).to(dtype)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    elif layout == "interleaved":
        kv = torch.randn(num_pages, num_kv_heads, page_size, 2 * head_dim, generator=g).to(dtype)
        k, v = kv.transpose(1, 2).split(head_dim, dim=-1)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    perm = torch.randperm(num_pages, generator=g)
    block_table = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    used = torch.zeros(num_pages, dtype=torch.bool)
    i = 0
    for b, s in enumerate(seq_lens):
        n = -(-s // page_size)
        block_table[b, :n] = perm[i : i + n].to(torch.int32)
        used[perm[i : i + n]] = True
        i += n
    # Poison pages nobody owns, so a kernel that reads outside the table is caught.
    with torch.no_grad():
        k[~used] = 1e4
        v[~used] = 1e4
        for b, s in enumerate(seq_lens):
            tail = s % page_size
            if tail:
                last = block_table[b, s // page_size].long()
                k[last, tail:] = 1e4
                v[last, tail:] = 1e4
    # Unused table slots point at page 0 with a -1 sentinel replaced: kernels must not read them.
    block_table[block_table < 0] = 0
    return k, v, block_table


def paged_to_device(k: torch.Tensor, v: torch.Tensor, layout: str, device) -> tuple:
    """Move caches made by :func:`random_paged_kv` to ``device`` keeping their layout (strides)."""
    if torch.device(device).type == "cpu":
        return k, v
    if layout == "NHD":
        return k.to(device), v.to(device)
    if layout == "HND":
        return (k.transpose(1, 2).contiguous().to(device).transpose(1, 2),
                v.transpose(1, 2).contiguous().to(device).transpose(1, 2))
    kv = torch.cat([k.transpose(1, 2), v.transpose(1, 2)], -1).contiguous().to(device)
    return kv.transpose(1, 2).split(k.shape[-1], dim=-1)
