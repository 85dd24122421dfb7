"""The KV write with decode-token page summaries (kv_write.py) against its reference, and the
summaries it leaves against a from-scratch build."""

import os

import pytest
import torch

from sparse_kernels.kv_write import write_kv_and_summaries
from sparse_kernels.page_summary import build_page_summaries, update_page_summaries
from sparse_kernels.reference import random_paged_kv
from sparse_kernels.reference_decode import ref_page_summaries, ref_write_kv_and_summaries

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"
POISON = 1e4  # a cache slot not written yet


def _step(old, q_lens, page, layout, dtype, head_dim, heads=2, seed=0, pad=3):
    """A cache holding ``old`` tokens per sequence (the rest poisoned), the step's new keys and
    values of ``q_lens`` tokens per sequence (strided, as a view into a fused QKV tensor), their
    slot mapping with ``pad`` padding slots at the end, and the block table."""
    g = torch.Generator().manual_seed(seed)
    new = [o + q for o, q in zip(old, q_lens)]
    k, v, bt = random_paged_kv(new, heads, head_dim, page, dtype, layout, generator=g)
    true_k, true_v = k.clone(), v.clone()
    slots = []
    for b, (o, n) in enumerate(zip(old, new)):
        for pos in range(o, n):
            phys = int(bt[b, pos // page])
            k[phys, pos % page] = POISON
            v[phys, pos % page] = POISON
            slots.append(phys * page + pos % page)
    n_tok = len(slots)
    qkv = torch.randn(n_tok + pad, heads, 3 * head_dim, generator=g).to(dtype)
    key, value = qkv[..., head_dim:2 * head_dim], qkv[..., 2 * head_dim:]
    i = 0
    for b, (o, n) in enumerate(zip(old, new)):
        for pos in range(o, n):
            phys = int(bt[b, pos // page])
            key[i], value[i] = true_k[phys, pos % page], true_v[phys, pos % page]
            i += 1
    slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64)
    return k, v, bt, key, value, slot_mapping, new


def _nan_summaries(k):
    n, _, h, d = k.shape
    return torch.full((n, 2, h, d), float("nan"), dtype=k.dtype)


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


def _exact(got, want):
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "page,layout,dtype,head_dim",
    [
        (16, "NHD", torch.float32, 64),
        (16, "interleaved", torch.bfloat16, 128),
        (1, "HND", torch.bfloat16, 64),
        (64, "HND", torch.float32, 128),
    ],
)
def test_write_matches_reference(page, layout, dtype, head_dim):
    """A mixed step: decode tokens at a page's first, middle and last slot, a prefill chunk
    over several pages whose first token is alone in its page and whose last token opens a
    page, a first prefill chunk, an unscheduled sequence, and padding slots."""
    p = page
    old = [p + p // 2, 2 * p, 3 * p - 1, p - 1 if p > 1 else 4, 0, p]
    q_lens = [1, 1, 1, 2 * p + 2, p + 3, 0]
    k, v, bt, key, value, slots, new = _step(old, q_lens, page, layout, dtype, head_dim)
    summ = _nan_summaries(k)
    want_k, want_v, want_s = ref_write_kv_and_summaries(key, value, k, v, slots, summ)
    k, v, key, value, slots, summ = _dev(k, v, key, value, slots, summ)
    write_kv_and_summaries(key, value, k, v, slots, summ)
    _exact(k, want_k)
    _exact(v, want_v)
    _exact(summ, want_s)
    # the reference itself: no slot still poisoned, and each decode token's page summarized
    # exactly as a from-scratch build over the sequence would
    live = torch.zeros_like(want_k, dtype=torch.bool)
    for b, n in enumerate(new):
        for pos in range(n):
            live[int(bt[b, pos // page]), pos % page] = True
    assert (want_k[live] != POISON).all() and (want_v[live] != POISON).all()
    full = ref_page_summaries(want_k, bt, torch.tensor(new))
    for b in range(3):  # the decode rows
        last = int(bt[b, (new[b] - 1) // page])
        _exact(want_s[last], full[last])
    assert not torch.isnan(want_s).all()  # something was summarized
    if page > 1:  # pages written by several tokens are left to update_page_summaries
        chunk_page = int(bt[3, (old[3] + 1) // page + 1])
        assert torch.isnan(want_s[chunk_page]).all()


def test_write_only_without_summaries():
    k, v, bt, key, value, slots, _ = _step([5, 17], [1, 9], 16, "interleaved", torch.bfloat16, 64)
    want_k, want_v, _ = ref_write_kv_and_summaries(key, value, k, v, slots, _nan_summaries(k))
    k, v, key, value, slots = _dev(k, v, key, value, slots)
    write_kv_and_summaries(key, value, k, v, slots)
    _exact(k, want_k)
    _exact(v, want_v)


@pytest.mark.parametrize("page", [4, 16])
def test_decode_steps_keep_every_summary_exact(page):
    """A prefill step (KV write, then update_page_summaries for the chunk's pages, as the
    adapter runs it), then decode steps across page boundaries with only the KV write: the
    whole buffer equals a from-scratch build after each step."""
    steps = 2 * page + 1
    first = [page + 3, 2 * page - 1, 1]
    final = [f + steps for f in first]
    g = torch.Generator().manual_seed(5)
    k, v, bt = random_paged_kv(final, 2, 64, page, torch.float32, "NHD", generator=g)
    true_k, true_v = k.clone(), v.clone()
    k.fill_(POISON)
    v.fill_(POISON)
    summ = torch.full((k.shape[0], 2, 2, 64), float("nan"))
    k, v, bt, summ = _dev(k, v, bt, summ)

    def step(lens_before, q_lens):
        slots, rows = [], []
        for b, (o, q) in enumerate(zip(lens_before, q_lens)):
            for pos in range(o, o + q):
                phys = int(bt[b, pos // page])
                slots.append(phys * page + pos % page)
                rows.append((phys, pos % page))
        key = torch.stack([true_k[p, o] for p, o in rows]).to(DEVICE)
        value = torch.stack([true_v[p, o] for p, o in rows]).to(DEVICE)
        sm = torch.tensor(slots + [-1, -1], dtype=torch.int64, device=DEVICE)
        key = torch.cat([key, key[:2]])  # padding rows
        value = torch.cat([value, value[:2]])
        write_kv_and_summaries(key, value, k, v, sm, summ)
        return [o + q for o, q in zip(lens_before, q_lens)]

    lens = step([0, 0, 0], first)
    qsl = torch.tensor([0] + torch.tensor(first).cumsum(0).tolist(), dtype=torch.int32,
                       device=DEVICE)
    update_page_summaries(k, summ, bt, qsl, torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                          num_tokens=sum(first))
    _exact(summ, ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(lens)))
    for _ in range(steps):
        lens = step(lens, [1, 1, 1])
        want = ref_page_summaries(k.cpu(), bt.cpu(), torch.tensor(lens))
        _exact(summ, want)
    # and the same as a build over the final cache
    rebuilt = torch.full_like(summ, float("nan"))
    build_page_summaries(k, rebuilt, bt, torch.tensor(lens, dtype=torch.int32, device=DEVICE))
    _exact(summ, rebuilt)
