"""The one-launch decode read counters vs the tensor-op reference (tokens_read)."""

import os

import pytest
import torch

from sparse_kernels.decode_stats import accumulate_decode_reads
from sparse_kernels.page_select import DENSE_ROW, tokens_read

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


@pytest.mark.parametrize("page,hkv,k", [(16, 8, 12), (1, 2, 40), (64, 1, 3)])
def test_matches_tokens_read(page, hkv, k):
    g = torch.Generator().manual_seed(page + hkv)
    seq_lens = torch.tensor([0, 1, page * 3 + 1, page * k, page * k * 4 + 5, 7 * page],
                            dtype=torch.int32)
    batch = len(seq_lens)
    # selection rows: pages of the sequence in any order, -1 padding, a dense row, a row with
    # the last (partial) page, and more rows in the buffer than the batch (not counted)
    sel = torch.full((batch + 2, hkv, k), -1, dtype=torch.int32)
    for b, s in enumerate(seq_lens.tolist()):
        n_pages = -(-s // page)
        for h in range(hkv):
            pick = torch.randperm(max(n_pages, 1), generator=g)[:min(k, n_pages)]
            sel[b, h, :len(pick)] = pick.to(torch.int32)
    sel[4, 0, 0], sel[4, 0, 1:] = DENSE_ROW, -1
    sel[batch:] = 5  # beyond the batch
    want_read = tokens_read(sel[:batch], seq_lens, page).double().sum().item()
    want_held = seq_lens.double().sum().item() * hkv
    sums = torch.tensor([10.0, 20.0, 3.0, 4.0], dtype=torch.float64, device=DEVICE)
    sl = seq_lens.to(DEVICE)
    accumulate_decode_reads(sel.to(DEVICE), sl, page, hkv, sums)
    assert sums.tolist() == [10.0 + want_read, 20.0 + want_held, 3.0, 4.0]
    accumulate_decode_reads(None, sl, page, hkv, sums)  # dense: read == held
    assert sums.tolist() == [10.0 + want_read + want_held, 20.0 + 2 * want_held, 3.0, 4.0]


def test_empty_batch_is_a_no_op():
    sums = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    accumulate_decode_reads(None, torch.zeros(0, dtype=torch.int32, device=DEVICE), 16, 8,
                            sums)
    assert sums.tolist() == [0.0, 0.0]
