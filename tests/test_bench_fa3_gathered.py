"""CPU test of the gathered page tables of benchmarks/bench_fa3_gathered.py: the tokens a
(sequence, KV head) row reads through its table over the per-head cache view are the tokens of
the pages its selection names (or of every page), in order, and no others."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_fa3_gathered as B  # noqa: E402
from sparse_kernels.page_select import DENSE_ROW  # noqa: E402


def _tokens_via_table(kph, table, lens, page, r):
    n = int(lens[r])
    idx = torch.arange(n)
    return kph[table[r, idx // page].long(), idx % page, 0]


def _tokens_via_selection(kh, bt, seq_lens, selected, page, b, h):
    n = int(seq_lens[b])
    npages = -(-n // page)
    row = selected[b, h]
    pages = list(range(npages)) if int(row[0]) == DENSE_ROW else [int(p) for p in row if p >= 0]
    out = []
    for p in pages:
        hi = min(page, n - p * page)
        out.append(kh[int(bt[b, p]), :hi, h])
    return torch.cat(out)


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_gathered_tables_read_the_selected_tokens(page, hkv):
    g = torch.Generator().manual_seed(page * 10 + hkv)
    d, batch, width = 8, 5, 40
    seq_lens = torch.tensor([1, page * 7 + 3, page * 12, page * 3 + 1, page * 20 - 2][:batch],
                            dtype=torch.int32).clamp(max=width * page)
    nb = batch * width + 1
    kv_h = torch.randn((nb, hkv, page, 2 * d), generator=g)
    kh = kv_h.permute(0, 2, 1, 3)[..., :d]
    kph, _ = B.per_head_views(kv_h, d)
    perm = torch.randperm(nb - 1, generator=g).to(torch.int32) + 1
    bt = perm[:batch * width].view(batch, width).clone()
    k = 6
    selected = torch.full((batch, hkv, k), -1, dtype=torch.int32)
    for b in range(batch):
        npages = -(-int(seq_lens[b]) // page)
        for h in range(hkv):
            if b % 2 == 0 or npages <= k:  # rows that read every page
                selected[b, h, 0] = DENSE_ROW
                continue
            # a selection: some middle pages (ascending, fewer than k on some heads) + the last
            mid = torch.randperm(npages - 1, generator=g)[:k - 1 - (h % 2)].sort().values
            pages = torch.cat([mid, torch.tensor([npages - 1])])
            selected[b, h, :len(pages)] = pages.to(torch.int32)
    table, lens = B.gathered_tables(selected, bt, seq_lens, page, width)
    assert table.shape == (batch * hkv, width) and lens.shape == (batch * hkv,)
    for b in range(batch):
        for h in range(hkv):
            want = _tokens_via_selection(kh, bt, seq_lens, selected, page, b, h)
            got = _tokens_via_table(kph, table, lens, page, b * hkv + h)
            assert torch.equal(got, want), (b, h)
