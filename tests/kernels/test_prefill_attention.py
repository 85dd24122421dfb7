"""Block-sparse prefill attention (kernels/block_sparse_prefill.py) against PyTorch references.

Runs under TRITON_INTERPRET=1 on the CPU at small sizes. Batches are ragged, chunks start at
positions that are not multiples of the block size, and every sequence has a prefix already in
the paged cache (chunked prefill); unused cache pages are poisoned with 1e4.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def paged_to_device(k, v, layout):
    return reference.paged_to_device(k, v, layout, DEVICE)


from sparse_kernels import reference  # noqa: E402

from sparse_kernels.block_sparse_prefill import (  # noqa: E402
    all_causal_block_lists,
    block_density,
    block_sparse_prefill_attention,
    prefill_block_metadata,
)
from sparse_kernels.reference import dense_attention, random_paged_kv  # noqa: E402
from sparse_kernels.reference_prefill import (  # noqa: E402
    ref_block_sparse_attention,
    ref_q_blocks,
)

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (seq_lens, q_lens): prefixes of 55, 0, 44 / 3, 29 / ... tokens; chunk starts unaligned.
BATCHES = {
    "ragged3": ([100, 37, 64], [45, 37, 20]),
    "prefix_long": ([150, 21], [33, 18]),
    "single": ([90], [61]),
}


def make_batch(seq_lens, q_lens, hkv, group, head_dim, page, layout="NHD", dtype=torch.float32,
               seed=0, q_view=False):
    g = torch.Generator().manual_seed(seed)
    k, v, bt = random_paged_kv(seq_lens, hkv, head_dim, page, dtype=dtype, layout=layout,
                               generator=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    t = int(qsl[-1])
    if q_view:  # q as a strided view of a fused qkv buffer
        qkv = torch.randn(t, hkv * group + 2 * hkv, head_dim, generator=g).to(dtype).to(DEVICE)
        q = qkv[:, : hkv * group]
    else:
        q = torch.randn(t, hkv * group, head_dim, generator=g).to(dtype).to(DEVICE)
    k, v = paged_to_device(k, v, layout)
    return q, k, v, bt.to(DEVICE), qsl.to(DEVICE), sl.to(DEVICE)


def test_metadata_matches_reference():
    qsl = torch.tensor([0, 45, 45, 82, 102, 103], dtype=torch.int32, device=DEVICE)  # one empty
    sl = torch.tensor([100, 7, 37, 64, 129], dtype=torch.int32, device=DEVICE)
    for bs in (16, 32, 64):
        meta = prefill_block_metadata(qsl, sl, bs)
        ref = ref_q_blocks(qsl, sl, bs)
        n = len(ref)
        assert meta.num_q_blocks >= n
        got = list(zip(meta.q_block_seq.tolist(), meta.q_block_idx.tolist(),
                       meta.q_block_tok_start.tolist(), meta.q_block_tok_len.tolist()))
        assert got[:n] == ref
        assert all(s == -1 and ln == 0 for s, _i, _t, ln in got[n:])
        assert sum(x[3] for x in ref) == int(qsl[-1])
        assert meta.max_kv_blocks == -(-129 // bs)


def _check_dense(batch, hkv, group, head_dim, page, layout, dtype, block_size, q_view=False):
    seq_lens, q_lens = BATCHES[batch]
    q, k, v, bt, qsl, sl = make_batch(seq_lens, q_lens, hkv, group, head_dim, page, layout,
                                      dtype, q_view=q_view)
    meta = prefill_block_metadata(qsl, sl, block_size)
    lists = all_causal_block_lists(meta, hkv)
    assert float(lists.density) == pytest.approx(1.0)
    out = block_sparse_prefill_attention(q, k, v, bt, meta, lists.block_idx, lists.block_count)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = dense_attention(q, k, v, bt, qsl, sl)
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize(
    "batch,hkv,group,head_dim,page,layout,dtype,block_size",
    [
        ("ragged3", 2, 1, 64, 1, "NHD", torch.float32, 16),
        ("ragged3", 1, 4, 128, 16, "HND", torch.float32, 32),
        ("prefix_long", 1, 7, 64, 64, "interleaved", torch.float32, 16),
        ("ragged3", 1, 8, 128, 16, "NHD", torch.bfloat16, 16),
        ("single", 2, 4, 64, 1, "interleaved", torch.bfloat16, 64),
        ("prefix_long", 2, 4, 64, 16, "HND", torch.float32, 64),
    ],
)
def test_all_blocks_equals_dense(batch, hkv, group, head_dim, page, layout, dtype, block_size):
    _check_dense(batch, hkv, group, head_dim, page, layout, dtype, block_size)


def test_all_blocks_equals_dense_strided_q():
    _check_dense("ragged3", 2, 4, 64, 16, "NHD", torch.float32, 16, q_view=True)


def _random_lists(meta, hkv, gen, extra_noncausal=False, empty_frac=0.0):
    """Random subsets of the causal blocks (shuffled order); optionally blocks above the diagonal
    (which the causal mask must ignore) and empty lists."""
    nqb, nkb = meta.num_q_blocks, meta.max_kv_blocks
    block_idx = torch.full((nqb, hkv, nkb), -7, dtype=torch.int32)
    block_count = torch.zeros(nqb, hkv, dtype=torch.int32)
    seqs, idxs = meta.q_block_seq.cpu(), meta.q_block_idx.cpu()
    for s in range(nqb):
        if int(seqs[s]) < 0:
            continue
        i = int(idxs[s])
        hi = nkb if extra_noncausal else i + 1
        for h in range(hkv):
            if torch.rand((), generator=gen).item() < empty_frac:
                continue
            keep = torch.nonzero(torch.rand(hi, generator=gen) < 0.5).flatten()
            keep = keep[torch.randperm(keep.numel(), generator=gen)]
            block_idx[s, h, : keep.numel()] = keep.to(torch.int32)
            block_count[s, h] = keep.numel()
    return block_idx.to(DEVICE), block_count.to(DEVICE)


@pytest.mark.parametrize(
    "batch,hkv,group,head_dim,page,layout,dtype,block_size,noncausal,empty",
    [
        ("ragged3", 2, 4, 64, 16, "NHD", torch.float32, 16, False, 0.0),
        ("ragged3", 1, 7, 128, 1, "HND", torch.float32, 16, True, 0.2),
        ("prefix_long", 1, 8, 64, 64, "interleaved", torch.bfloat16, 32, False, 0.1),
        ("single", 2, 1, 128, 16, "NHD", torch.float32, 32, True, 0.0),
    ],
)
def test_given_lists_match_masked_reference(batch, hkv, group, head_dim, page, layout, dtype,
                                            block_size, noncausal, empty):
    seq_lens, q_lens = BATCHES[batch]
    q, k, v, bt, qsl, sl = make_batch(seq_lens, q_lens, hkv, group, head_dim, page, layout, dtype,
                                      seed=1)
    meta = prefill_block_metadata(qsl, sl, block_size)
    gen = torch.Generator().manual_seed(2)
    block_idx, block_count = _random_lists(meta, hkv, gen, noncausal, empty)
    out = block_sparse_prefill_attention(q, k, v, bt, meta, block_idx, block_count)
    ref = ref_block_sparse_attention(q, k, v, bt, qsl, sl, block_size, block_idx, block_count)
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], err
    # The lists matter: the result is far from dense attention.
    dense = dense_attention(q, k, v, bt, qsl, sl)
    assert (out.float() - dense).abs().max().item() > 10 * TOL[dtype]


def test_dropping_a_block_changes_the_output():
    """Sanity: the comparison can fail -- one missing causal block is visible."""
    q, k, v, bt, qsl, sl = make_batch([100, 37], [45, 37], 1, 4, 64, 16)
    meta = prefill_block_metadata(qsl, sl, 16)
    lists = all_causal_block_lists(meta, 1)
    idx, cnt = lists.block_idx.clone(), lists.block_count.clone()
    s = 2  # a slot of sequence 0 with several blocks
    assert int(cnt[s, 0]) >= 3
    idx[s, 0, 1] = idx[s, 0, int(cnt[s, 0]) - 1]
    cnt[s, 0] -= 1
    out = block_sparse_prefill_attention(q, k, v, bt, meta, idx, cnt)
    dense = dense_attention(q, k, v, bt, qsl, sl)
    t0, n = int(meta.q_block_tok_start[s]), int(meta.q_block_tok_len[s])
    assert (out[t0 : t0 + n] - dense[t0 : t0 + n]).abs().max() > 1e-2
    other = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    other[t0 : t0 + n] = False
    assert (out[other] - dense[other]).abs().max() < 1e-4
    assert float(block_density(meta, cnt)) < 1.0
