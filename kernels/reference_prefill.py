"""PyTorch references for the prefill-side kernels: block-sparse attention and the estimators.

Slow and obvious on purpose: Python loops over sequences, query blocks and heads, dense fp32
matrices. The query-block slots are recomputed here independently of
``prefill_block_metadata`` (sequence by sequence, ascending absolute block index; padding slots
after the last real one), so the tests also check the metadata helper.
"""

from __future__ import annotations

import math

import torch

from sparse_kernels.reference import attention_with_mask, causal_mask, gather_kv

__all__ = [
    "ref_q_blocks",
    "lists_to_mask",
    "ref_block_sparse_attention",
    "ref_streaming_mask",
    "ref_xattention_scores",
    "ref_select_by_mass",
    "ref_last_q_scores",
    "ref_vs_mask_from_indices",
    "ref_flexprefill_parts",
    "ref_flexprefill_mask",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ref_q_blocks(query_start_loc, seq_lens, block_size: int) -> list[tuple[int, int, int, int]]:
    """Slots in order: ``(seq, absolute block index, first query row, queries in block)``."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    out = []
    for b, L in enumerate(int(x) for x in seq_lens.tolist()):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        start = L - q_len
        for i in range(start // block_size, _cdiv(L, block_size)):
            p0, p1 = max(i * block_size, start), min((i + 1) * block_size, L)
            out.append((b, i, qsl[b] + p0 - start, p1 - p0))
    return out


def lists_to_mask(block_idx, block_count, num_kv_blocks: int) -> torch.Tensor:
    """bool ``[slots, Hkv, num_kv_blocks]`` from padded lists (checks for duplicates)."""
    nqb, hkv = block_count.shape
    mask = torch.zeros(nqb, hkv, num_kv_blocks, dtype=torch.bool)
    idx, cnt = block_idx.cpu(), block_count.cpu()
    for s in range(nqb):
        for h in range(hkv):
            c = int(cnt[s, h])
            sel = idx[s, h, :c].long()
            assert sel.unique().numel() == c, f"duplicate blocks in slot {s} head {h}: {sel}"
            mask[s, h, sel] = True
    return mask


def ref_block_sparse_attention(
    q, k_cache, v_cache, block_table, query_start_loc, seq_lens, block_size: int,
    block_idx, block_count, scale: float | None = None,
) -> torch.Tensor:
    """Dense attention masked to exactly the listed key blocks AND causal; fp32 ``[T, Hq, D]``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    hq, hkv = q.shape[1], k_cache.shape[2]
    g = hq // hkv
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    slots = ref_q_blocks(query_start_loc, seq_lens, block_size)
    seq_lens_l = [int(x) for x in seq_lens.tolist()]
    qsl = [int(x) for x in query_start_loc.tolist()]
    nkb = block_idx.shape[2]
    mask_kv = lists_to_mask(block_idx, block_count, max(nkb, 1))
    for s, (b, i, t0, n) in enumerate(slots):
        L = seq_lens_l[b]
        k, v = gather_kv(k_cache, v_cache, block_table, b, L)
        q_len = qsl[b + 1] - qsl[b]
        row0 = t0 - qsl[b]  # query index within the chunk
        caus = causal_mask(q_len, L, q.device)[row0 : row0 + n]  # [n, L]
        kb_of = torch.arange(L, device=q.device) // block_size
        allowed = mask_kv[s].to(q.device)[:, kb_of]  # [Hkv, L]
        allowed = allowed.repeat_interleave(g, dim=0)  # [Hq, L]
        mask = caus[None] & allowed[:, None, :]
        out[t0 : t0 + n] = attention_with_mask(q[t0 : t0 + n], k, v, mask, scale)
    return out


def ref_streaming_mask(query_start_loc, seq_lens, num_kv_heads: int, block_size: int,
                       sink_tokens: int, local_tokens: int, num_slots: int,
                       num_kv_blocks: int) -> torch.Tensor:
    """bool ``[num_slots, Hkv, num_kv_blocks]`` of the A-shape rule, from Python sets."""
    mask = torch.zeros(num_slots, num_kv_heads, num_kv_blocks, dtype=torch.bool)
    n_sink, n_local = _cdiv(sink_tokens, block_size), _cdiv(local_tokens, block_size)
    for s, (_b, i, _t0, _n) in enumerate(ref_q_blocks(query_start_loc, seq_lens, block_size)):
        keep = {j for j in range(i + 1) if j < n_sink or j >= i - n_local} | {0, i}
        mask[s, :, sorted(keep)] = True
    return mask


def ref_xattention_scores(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                          block_size: int, stride: int, num_slots: int, num_kv_blocks: int,
                          scale: float | None = None) -> torch.Tensor:
    """XAttention block scores fp32 ``[num_slots, Hq, num_kv_blocks]`` (rows sum to 1).

    Strided rows/cols are aligned to absolute positions: strided row ``r`` = queries at
    positions ``r*S + S-1, ..., r*S`` (reversed, zeros where the chunk has no query), strided col
    ``c`` = keys ``c*S .. c*S+S-1`` (zeros past ``seq_len``). Their dot product is the sum over
    one antidiagonal of the S x S tile. Softmax over cols ``c <= r`` with scale
    ``scale / S``, then per (query block, key block) the mean over the query block's rows (rows
    holding at least one query) of the summed probabilities.
    """
    S = stride
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    hq, hkv = q.shape[1], k_cache.shape[2]
    g = hq // hkv
    R = block_size // S
    out = torch.zeros(num_slots, hq, num_kv_blocks, dtype=torch.float32)
    qsl = [int(x) for x in query_start_loc.tolist()]
    slots = ref_q_blocks(query_start_loc, seq_lens, block_size)
    for b, L in enumerate(int(x) for x in seq_lens.tolist()):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        start = L - q_len
        k, _ = gather_kv(k_cache, v_cache, block_table, b, L)
        nc = _cdiv(L, S)
        kp = torch.zeros(nc * S, hkv, d)
        kp[:L] = k.float().cpu()
        ks = kp.view(nc, S, hkv, d).permute(2, 0, 1, 3).reshape(hkv, nc, S * d)
        qp = torch.zeros(nc * S, hq, d)
        qp[start:L] = q[qsl[b] : qsl[b + 1]].float().cpu()
        qs = qp.view(nc, S, hq, d).flip(1).permute(2, 0, 1, 3).reshape(hq, nc, S * d)
        logits = torch.einsum("hrx,hcx->hrc", qs, ks.repeat_interleave(g, 0)) * (scale / S)
        rr = torch.arange(nc)
        logits = logits.masked_fill(rr[None, None, :] > rr[None, :, None], float("-inf"))
        p = torch.softmax(logits, -1)  # [Hq, nc, nc]
        row_has_q = (rr * S + S - 1 >= start) & (rr * S < L)
        for s, (sb, i, _t0, _n) in enumerate(slots):
            if sb != b:
                continue
            rows = [r for r in range(i * R, min((i + 1) * R, nc)) if row_has_q[r]]
            pr = p[:, rows].sum(1)  # [Hq, nc]
            for j in range(i + 1):
                out[s, :, j] = pr[:, j * R : (j + 1) * R].sum(-1) / len(rows)
    return out


def ref_select_by_mass(scores, query_start_loc, seq_lens, block_size: int, num_kv_heads: int,
                       threshold: float, rows_on=None) -> torch.Tensor:
    """XAttention/FlexPrefill selection: bool ``[slots, Hkv, nkb]``, union over the GQA group.

    Per row: blocks 0 and i always; then the other blocks in descending score order while the
    kept mass is below ``threshold`` x row mass (threshold >= 1: all causal blocks).
    """
    nqb, hq, nkb = scores.shape
    g = hq // num_kv_heads
    mask = torch.zeros(nqb, num_kv_heads, nkb, dtype=torch.bool)
    for s, (b, i, _t0, _n) in enumerate(ref_q_blocks(query_start_loc, seq_lens, block_size)):
        mask[s, :, 0] = True
        mask[s, :, i] = True
        for h in range(hq):
            if rows_on is not None and not bool(rows_on[b, h]):
                continue
            p = scores[s, h, : i + 1].double().cpu()
            keep = {0, i}
            if threshold >= 1.0:
                keep = set(range(i + 1))
            else:
                target = threshold * float(p.sum())
                mass = float(p[0]) + (float(p[i]) if i > 0 else 0.0)
                for j in torch.argsort(p, descending=True).tolist():
                    if j in keep:
                        continue
                    if mass >= target:
                        break
                    keep.add(j)
                    mass += float(p[j])
            mask[s, h // g, sorted(keep)] = True
    return mask


def ref_last_q_scores(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, last_q: int,
                      width: int, scale: float | None = None):
    """MInference statistics of the last ``min(last_q, q_len)`` queries of each chunk.

    Returns fp32 ``vertical [B, Hq, width]`` (mean over those queries of their softmax
    probability of key ``k``) and ``slash [B, Hq, width]`` (mean over the queries of the
    probability of key ``qpos - d``, for diagonal offset ``d``); zeros past ``seq_len``.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    hq, hkv = q.shape[1], k_cache.shape[2]
    g = hq // hkv
    B = seq_lens.numel()
    vert = torch.zeros(B, hq, width)
    slash = torch.zeros(B, hq, width)
    qsl = [int(x) for x in query_start_loc.tolist()]
    for b, L in enumerate(int(x) for x in seq_lens.tolist()):
        q_len = qsl[b + 1] - qsl[b]
        n = min(last_q, q_len)
        if n == 0:
            continue
        k, _ = gather_kv(k_cache, v_cache, block_table, b, L)
        qq = q[qsl[b + 1] - n : qsl[b + 1]].float().cpu()  # [n, Hq, D]
        kk = k.float().cpu().repeat_interleave(g, 1)  # [L, Hq, D]
        logits = torch.einsum("rhd,khd->hrk", qq, kk) * scale
        qpos = torch.arange(L - n, L)
        kpos = torch.arange(L)
        logits = logits.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
        p = torch.softmax(logits, -1)  # [Hq, n, L]
        vert[b, :, :L] = p.mean(1)
        for r in range(n):
            dd = qpos[r] - kpos[: qpos[r] + 1]  # offsets of keys 0..qpos
            slash[b, :, dd] += p[:, r, : qpos[r] + 1] / n
    return vert, slash


def ref_vs_mask_from_indices(query_start_loc, seq_lens, block_size: int, num_kv_heads: int,
                             v_idx, s_idx, num_slots: int, num_kv_blocks: int,
                             rows_on=None) -> torch.Tensor:
    """Block mask of kept vertical columns ``v_idx`` / slash offsets ``s_idx`` (``[B, Hq, k]``,
    entries < 0 or >= seq_len ignored): key block j of query block i is kept when it holds a
    kept column, or a kept diagonal crosses the full block square (i, j); plus blocks 0 and i.
    """
    hq = v_idx.shape[1]
    g = hq // num_kv_heads
    seq_lens_l = [int(x) for x in seq_lens.tolist()]
    mask = torch.zeros(num_slots, num_kv_heads, num_kv_blocks, dtype=torch.bool)
    bs = block_size
    for s, (b, i, _t0, _n) in enumerate(ref_q_blocks(query_start_loc, seq_lens, block_size)):
        L = seq_lens_l[b]
        mask[s, :, 0] = True
        mask[s, :, i] = True
        for h in range(hq):
            if rows_on is not None and not bool(rows_on[b, h]):
                continue
            for col in v_idx[b, h].tolist():
                if 0 <= col < L and col // bs <= i:
                    mask[s, h // g, col // bs] = True
            for dd in s_idx[b, h].tolist():
                if not 0 <= dd < L:
                    continue
                for j in range(i + 1):
                    # some p in [i*bs, (i+1)*bs) with p - dd in [j*bs, (j+1)*bs)
                    if (i - j) * bs - (bs - 1) <= dd <= (i - j) * bs + (bs - 1):
                        mask[s, h // g, j] = True
    return mask


def ref_flexprefill_parts(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                          block_size: int, gamma: float, scale: float | None = None):
    """FlexPrefill per-head pieces: ``(a_true, a_hat, js, v_blocks, s_bands, qa_scores)``.

    a_true ``[B, Hq, nkb]``: block-pooled attention of the last ``min(B, q_len)`` queries;
    a_hat: softmax of (their mean query) . (block-mean keys); js: sqrt Jensen-Shannon divergence;
    v_blocks / s_bands ``[B, Hq, nkb]`` bool: the vertical blocks and slash block-offsets kept by
    the gamma budgets (FlexPrefill: tokens covering gamma, // block + 1 blocks, top by pooled
    score); qa_scores ``[slots, Hq, nkb]``: per query block softmax over causal key blocks of
    (mean query of the block) . (block-mean keys).
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    hq, hkv = q.shape[1], k_cache.shape[2]
    g = hq // hkv
    B = seq_lens.numel()
    bs = block_size
    seq_lens_l = [int(x) for x in seq_lens.tolist()]
    nkb = _cdiv(max(seq_lens_l), bs)
    width = nkb * bs
    vert, slash = ref_last_q_scores(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                                    bs, width, scale)
    a_true = vert.view(B, hq, nkb, bs).sum(-1)
    s_pool = slash.view(B, hq, nkb, bs).sum(-1)
    a_hat = torch.zeros(B, hq, nkb)
    js = torch.zeros(B, hq)
    v_blocks = torch.zeros(B, hq, nkb, dtype=torch.bool)
    s_bands = torch.zeros(B, hq, nkb, dtype=torch.bool)
    slots = ref_q_blocks(query_start_loc, seq_lens, bs)
    qa = torch.zeros(len(slots), hq, nkb)
    qsl = [int(x) for x in query_start_loc.tolist()]
    for b, L in enumerate(seq_lens_l):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        n = min(bs, q_len)
        nb = _cdiv(L, bs)
        k, _ = gather_kv(k_cache, v_cache, block_table, b, L)
        kp = torch.zeros(nb * bs, hkv, d)
        kp[:L] = k.float().cpu()
        cnt = torch.full((nb,), float(bs))
        cnt[-1] = L - (nb - 1) * bs
        kbar = kp.view(nb, bs, hkv, d).sum(1) / cnt[:, None, None]  # [nb, Hkv, D]
        kbar = kbar.repeat_interleave(g, 1)  # [nb, Hq, D]
        qbar = q[qsl[b + 1] - n : qsl[b + 1]].float().cpu().mean(0)  # [Hq, D]
        a_hat[b, :, :nb] = torch.softmax(torch.einsum("hd,jhd->hj", qbar, kbar) * scale, -1)
        m = 0.5 * (a_hat[b] + a_true[b])
        kl1 = torch.xlogy(a_hat[b], a_hat[b]).sum(-1) - torch.xlogy(a_hat[b], m).sum(-1)
        kl2 = torch.xlogy(a_true[b], a_true[b]).sum(-1) - torch.xlogy(a_true[b], m).sum(-1)
        js[b] = torch.sqrt((0.5 * kl1 + 0.5 * kl2).clamp(min=0))
        for h in range(hq):
            for src, pooled, dst in ((vert[b, h, :L], a_true[b, h, :nb], v_blocks),
                                     (slash[b, h, :L], s_pool[b, h, :nb], s_bands)):
                if gamma >= 1.0:
                    nsel = nb
                else:
                    cum = torch.cumsum(torch.sort(src, descending=True).values, 0)
                    ntok = int((cum <= gamma).sum()) + 1
                    nsel = min(max(ntok // bs + 1, 1), nb)
                top = torch.argsort(pooled, descending=True, stable=True)[:nsel]
                dst[b, h, top] = True
        for s, (sb, i, t0, nq) in enumerate(slots):
            if sb != b:
                continue
            qb = q[t0 : t0 + nq].float().cpu().mean(0)  # [Hq, D]
            lg = torch.einsum("hd,jhd->hj", qb, kbar[: i + 1]) * scale
            qa[s, :, : i + 1] = torch.softmax(lg, -1)
    return a_true, a_hat, js, v_blocks, s_bands, qa


def ref_flexprefill_mask(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                         block_size: int, gamma: float, tau: float, num_slots: int,
                         scale: float | None = None) -> torch.Tensor:
    """FlexPrefill block mask bool ``[slots, Hkv, nkb]`` built from :func:`ref_flexprefill_parts`:
    heads with ``js < tau`` select by mass on the pooled query-aware scores, the others keep key
    block ``j`` of query block ``i`` when ``v_blocks[j]`` or ``s_bands[i - j]``; plus 0 and i."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    g = hq // hkv
    _a, _ah, js, v_blocks, s_bands, qa_scores = ref_flexprefill_parts(
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens, block_size, gamma, scale)
    qa = js < tau
    padded = torch.zeros(num_slots, *qa_scores.shape[1:])
    padded[: qa_scores.shape[0]] = qa_scores
    mask = ref_select_by_mass(padded, query_start_loc, seq_lens, block_size, hkv, gamma,
                              rows_on=qa)
    for s, (b, i, _t0, _n) in enumerate(ref_q_blocks(query_start_loc, seq_lens, block_size)):
        for h in range(hq):
            if bool(qa[b, h]):
                continue
            for j in range(i + 1):
                if bool(v_blocks[b, h, j]) or bool(s_bands[b, h, i - j]):
                    mask[s, h // g, j] = True
    return mask
