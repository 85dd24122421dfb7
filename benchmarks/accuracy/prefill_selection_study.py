"""Where do the prefill estimators lose attention? A per-layer study on a real model.

Runs a Hugging Face model on the harness's tasks (tasks.py) with ordinary dense attention and,
inside every attention call of the prefill, hands that layer's queries and keys (after RoPE)
to the engines' own estimators (``sparse_kernels.pipeline.estimate_prefill_blocks``: the same
Triton kernels, block lists and rules the backends run, chunk by chunk as chunked prefill
feeds them, ``min_seq_len`` and the ``prefill_dense_above`` fallback included). Each list is
scored against the layer's true attention: per (query block, query head), the share of the
softmax probability that falls on the key blocks the list keeps (recall). Per variant and
layer it reports the mean recall, the worst head's, the recall of the prompt's last query
block (the question, whose hidden states start the answer), the block density, and, for tasks
with a planted value, whether the last query block's list keeps the value's key block.

The model's own outputs are not changed (dense throughout), so every layer sees the dense
model's queries and keys: this measures each estimator's choice, not the drift that sparse
layers cause in later ones (the accuracy harness measures the end result). Use it to find the
layers and heads where a method misses mass before choosing per-layer settings
(``SPARSE_HEAD_CONFIG``).

    python benchmarks/accuracy/prefill_selection_study.py --model /path/to/hf_model \
        --tasks niah_multikey qa --lengths 32768 --samples 20 --chunk 16384 \
        --variants xattention "xattention:xattn_threshold=0.95" \
            "vertical_slash:vs_vertical=512,vs_slash=1024" flexprefill --out study.json

Per (layer, KV head) it also reports recall and density (``per_kv_head`` in each cell), and
``--head-config-out PATH --dense-heads 0.1`` writes a ``SPARSE_HEAD_CONFIG`` file that prefills
dense the 10% of (layer, KV head) pairs whose lists keep the least attention over all cells
(DuoAttention-style: the heads that need the whole context get it), for the first variant
(``--head-config-variant``); serve it with that variant's method and settings, e.g.
``SPARSE_PREFILL_METHOD=xattention SPARSE_HEAD_CONFIG=PATH``.

Variants: ``METHOD[:FIELD=VALUE,...]``: a prefill method and SparseConfig fields over the
defaults (validated by SparseConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_common as C  # noqa: E402
import tasks as T  # noqa: E402

from sparse_kernels.config import SparseConfig, SparseConfigError  # noqa: E402

ATTN_NAME = "sparse_serve_prefill_study"
# per (variant, layer): recall mean, worst head's mean recall, last block recall, density,
# needle kept (last block, any KV head), needle samples
_NSUM = 6


@dataclass(frozen=True)
class Variant:
    name: str
    cfg: SparseConfig


def parse_variant(spec: str) -> Variant:
    """``METHOD[:FIELD=VALUE,...]`` -> a Variant with a validated SparseConfig."""
    method, _, opts = spec.partition(":")
    fields = {f.name for f in dataclasses.fields(SparseConfig)}
    kw = {"prefill_method": method}
    for item in filter(None, opts.split(",")):
        key, eq, val = item.partition("=")
        if not eq or key not in fields:
            raise SystemExit(f"bad variant {spec!r}: METHOD[:FIELD=VALUE,...] with SparseConfig "
                             f"fields ({key!r} is not FIELD=VALUE of one)")
        for conv in (int, float):
            try:
                val = conv(val)
                break
            except ValueError:
                pass
        kw[key] = val
    if method == "dense":
        raise SystemExit("variant 'dense' keeps every block: nothing to study")
    try:
        cfg = SparseConfig(**kw)
        cfg.validate()
    except (SparseConfigError, TypeError) as e:
        raise SystemExit(f"bad variant {spec!r}: {e}") from None
    return Variant(spec, cfg)


def paged_keys(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k [Hkv, n, D]`` -> (cache ``[pages, page, Hkv, D]`` with the tokens in order, block
    table ``[1, pages]``)."""
    hkv, n, d = k.shape
    pages = -(-n // page)
    cache = torch.zeros(pages * page, hkv, d, dtype=k.dtype, device=k.device)
    cache[:n] = k.transpose(0, 1)
    table = torch.arange(pages, dtype=torch.int32, device=k.device)[None]
    return cache.view(pages, page, hkv, d), table


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block: int, start: int,
               sub: int = 512) -> torch.Tensor:
    """True attention of the query rows ``q [Hq, m, D]`` at positions ``start ..`` over the
    keys ``k [Hkv, >= start + m, D]`` (causal): fp32 ``[Hq, cdiv(m, block), cdiv(start + m,
    block)]``, the mean over each query block's rows of the softmax probability per key block.
    ``start`` and ``sub`` are multiples of ``block``."""
    hq, m, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    end_all = start + m
    nkb = -(-end_all // block)
    out = torch.zeros(hq, -(-m // block), nkb, dtype=torch.float32, device=q.device)
    kk = k[:, :end_all].float().repeat_interleave(g, 0)  # [Hq, L, D]
    for s0 in range(0, m, sub):
        s1 = min(m, s0 + sub)
        end = start + s1
        logits = torch.einsum("hsd,hld->hsl", q[:, s0:s1].float(), kk[:, :end]) * scale
        pos = torch.arange(start + s0, end, device=q.device)
        logits.masked_fill_(torch.arange(end, device=q.device)[None, :] > pos[:, None],
                            float("-inf"))
        p = torch.softmax(logits, dim=-1)
        kb = -(-end // block)
        p = torch.nn.functional.pad(p, (0, kb * block - end)).view(hq, s1 - s0, kb, block).sum(-1)
        rows = s1 - s0
        qb = -(-rows // block)
        p = torch.nn.functional.pad(p, (0, 0, 0, qb * block - rows)).view(hq, qb, block, kb)
        counts = torch.clamp(rows - torch.arange(qb, device=q.device) * block, max=block)
        out[:, s0 // block: s0 // block + qb, :kb] = p.sum(2) / counts[None, :, None]
    return out


def kept_blocks(lists, meta, hkv: int, nkb: int) -> torch.Tensor:
    """bool ``[num_q_blocks, Hkv, nkb]`` from block lists (rows of padding query blocks empty)."""
    idx, cnt = lists.block_idx, lists.block_count
    listed = torch.arange(idx.shape[2], device=idx.device)[None, None, :] < cnt[:, :, None]
    keep = torch.zeros(idx.shape[0], hkv, nkb + 1, dtype=torch.bool, device=idx.device)
    keep.scatter_(2, torch.where(listed, idx.long(), nkb).clamp(0, nkb), True)
    keep = keep[..., :nkb]
    return keep & (meta.q_block_seq >= 0)[:, None, None]


class StudyState:
    def __init__(self, variants, num_layers: int, chunk: int, page: int, needle_pos):
        self.variants, self.chunk, self.page = variants, chunk, page
        self.needle_pos = needle_pos  # token positions of the queried value (may be empty)
        self.sums = torch.zeros(len(variants), num_layers, _NSUM, dtype=torch.float64)
        self.num_layers = num_layers
        # per (variant, layer, KV head): [recall (mean over rows and the group's query heads),
        # density]; sized on the first layer (the KV head count comes with it)
        self.kv_sums: torch.Tensor | None = None


STATE: StudyState | None = None


@torch.no_grad()
def evaluate_layer(st: StudyState, layer: int, q: torch.Tensor, k: torch.Tensor,
                   scale: float) -> None:
    """Score every variant's lists for one layer's prefill (``q [Hq, n, D]``, ``k [Hkv, n, D]``)
    into ``st.sums[:, layer]``."""
    from sparse_kernels.block_sparse_prefill import prefill_block_metadata
    from sparse_kernels.pipeline import estimate_prefill_blocks

    hq, n, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    k_cache, table = paged_keys(k, st.page)
    qt = q.transpose(0, 1).contiguous()  # [n, Hq, D]
    dev = q.device
    block = st.variants[0].cfg.block_size  # run() checks the variants share it
    needle_blocks = sorted({p // block for p in st.needle_pos})
    nv = len(st.variants)
    if st.kv_sums is None:
        st.kv_sums = torch.zeros(nv, st.num_layers, hkv, 2, dtype=torch.float64)
    kv_kept = torch.zeros(nv, hkv, dtype=torch.float64)  # kept causal blocks, per KV head
    head_sums = torch.zeros(nv, hq, dtype=torch.float64)  # over rows, per head
    causal_total = 0
    rows = 0
    for c0 in range(0, n, st.chunk):
        c1 = min(n, c0 + st.chunk)
        mass = block_mass(q[:, c0:c1], k, scale, block, c0)  # [Hq, nqb, nkb]
        nkb = mass.shape[2]
        qsl = torch.tensor([0, c1 - c0], dtype=torch.int32, device=dev)
        sl = torch.tensor([c1], dtype=torch.int32, device=dev)
        meta = prefill_block_metadata(qsl, sl, block, num_tokens=c1 - c0, max_seq_len=c1)
        qb_abs = (meta.q_block_idx.long() - c0 // block).clamp(min=0)  # row -> chunk q block
        valid = meta.q_block_seq >= 0
        causal = (torch.arange(nkb, device=dev)[None, :]
                  <= (meta.q_block_idx.long()[:, None]))  # [rows, nkb]
        last_row = int(torch.nonzero(valid).max()) if c1 == n else None
        rows += int(valid.sum())
        causal_total += int((causal & valid[:, None]).sum())
        m_rows = mass[:, qb_abs].permute(1, 0, 2)  # [rows, Hq, nkb]
        for vi, v in enumerate(st.variants):
            lists = estimate_prefill_blocks(v.cfg.prefill_method, v.cfg, qt[c0:c1], k_cache,
                                            table, meta, scale)
            dense = c1 <= v.cfg.min_seq_len or (
                v.cfg.prefill_dense_above < 1.0
                and float(lists.density) > v.cfg.prefill_dense_above)
            if dense:
                keep = causal[:, None, :].expand(-1, hkv, -1) & valid[:, None, None]
            else:
                keep = kept_blocks(lists, meta, hkv, nkb)
            recall = (m_rows * keep.repeat_interleave(g, 1)).sum(-1)  # [rows, Hq]
            recall = torch.where(valid[:, None], recall, 0.0)
            head_sums[vi] += recall.sum(0).double().cpu()
            kv_kept[vi] += (keep & causal[:, None, :]).sum((0, 2)).double().cpu()
            if last_row is not None:
                st.sums[vi, layer, 2] += float(recall[last_row].mean())
                if needle_blocks:
                    hit = keep[last_row][:, needle_blocks].any(-1).float().mean()
                    st.sums[vi, layer, 4] += float(hit)
                    st.sums[vi, layer, 5] += 1.0
    kv_recall = head_sums.view(nv, hkv, g).mean(-1) / rows  # per KV head: its query heads' mean
    st.sums[:, layer, 0] += kv_recall.mean(1)
    st.sums[:, layer, 1] += head_sums.min(1).values / rows  # the worst head's mean recall
    st.sums[:, layer, 3] += kv_kept.mean(1) / causal_total
    st.kv_sums[:, layer, :, 0] += kv_recall
    st.kv_sums[:, layer, :, 1] += kv_kept / causal_total


def study_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """HF attention interface: dense sdpa, and on prefill calls the variants' evaluation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = STATE
    if st is not None and query.shape[2] > 1:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        for b in range(query.shape[0]):
            evaluate_layer(st, module.layer_idx, query[b], key[b], scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, study_attention)


def needle_positions(tok, sample) -> list[int]:
    """Token positions of the first answer's first occurrence in the prompt (empty when it is
    not found as a token run: an answer may tokenize differently inside the text). Meaningful
    where that answer is planted once (the niah tasks, qa); common-word and variable-tracking
    answers recur, so their "needle" is just the first occurrence."""
    ids = list(sample.prompt_token_ids)
    if not sample.answers:
        return []
    for text in (sample.answers[0], " " + sample.answers[0]):
        pat = T._encode(tok, text)
        if not pat:
            continue
        for i in range(len(ids) - len(pat) + 1):
            if ids[i:i + len(pat)] == pat:
                return list(range(i, i + len(pat)))
    return []


@torch.no_grad()
def study_sample(model, tok, sample, variants, chunk: int, page: int, num_layers: int):
    global STATE
    dev = next(model.parameters()).device
    STATE = StudyState(variants, num_layers, chunk, page, needle_positions(tok, sample))
    try:
        model(input_ids=torch.tensor([sample.prompt_token_ids], device=dev), use_cache=False,
              logits_to_keep=1)
        return STATE
    finally:
        STATE = None


def summarize(sums: torch.Tensor, n: int, variants) -> dict:
    """Per variant: per-layer means over the samples, and their means over layers."""
    out = {}
    for vi, v in enumerate(variants):
        s = sums[vi] / max(n, 1)  # [layers, 6]
        needle_n = sums[vi, :, 5]
        needle = [float(sums[vi, li, 4] / needle_n[li]) if needle_n[li] else None
                  for li in range(s.shape[0])]
        per = {"recall": s[:, 0].tolist(), "recall_worst_head": s[:, 1].tolist(),
               "recall_last_block": s[:, 2].tolist(), "density": s[:, 3].tolist(),
               "needle_kept_last_block": needle}
        kept = [x for x in needle if x is not None]
        out[v.name] = {
            "config": {f.name: getattr(v.cfg, f.name) for f in dataclasses.fields(v.cfg)
                       if f.name != "head_overrides"},
            "samples": n,
            "recall": float(s[:, 0].mean()), "recall_worst_head": float(s[:, 1].mean()),
            "recall_last_block": float(s[:, 2].mean()), "density": float(s[:, 3].mean()),
            "needle_kept_last_block": sum(kept) / len(kept) if kept else None,
            "per_layer": per,
        }
    return out


def print_cell(task, length, cell) -> None:
    print(f"== {task} @ {length}")
    print(f"  {'variant':44s} {'n':>3s} {'density':>7s} {'recall':>7s} {'worst':>6s} "
          f"{'last':>6s} {'needle':>6s}  lowest-recall layers")
    fmt = (lambda x: f"{x:.3f}" if x is not None else "  n/a")
    for name, c in cell.items():
        per = sorted((r, i) for i, r in enumerate(c["per_layer"]["recall"]))
        worst = ", ".join(f"L{i} {r:.2f}" for r, i in per[:3])
        print(f"  {name[:44]:44s} {c['samples']:3d} {c['density']:7.3f} {c['recall']:7.3f} "
              f"{c['recall_worst_head']:6.3f} {c['recall_last_block']:6.3f} "
              f"{fmt(c['needle_kept_last_block']):>6s}  {worst}")


def run(args) -> dict:
    variants = [parse_variant(s) for s in args.variants]
    blocks = {v.cfg.block_size for v in variants}
    if len(blocks) != 1:
        raise SystemExit("all variants must share block_size (one true-attention pass)")
    block = blocks.pop()
    names = [v.name for v in variants]
    if args.head_config_variant and args.head_config_variant not in names:
        raise SystemExit(f"--head-config-variant {args.head_config_variant!r} is not one of "
                         f"--variants {names}")
    if args.head_config_out and len(args.dense_heads) > 1 and "{frac}" not in args.head_config_out:
        raise SystemExit("several --dense-heads fractions need '{frac}' in --head-config-out "
                         "(one file per fraction)")
    if args.chunk % block:
        raise SystemExit(f"--chunk must be a multiple of the block size {block}")
    register_attention()
    tok, model, device, groups = C.load_model_and_samples(args, ATTN_NAME)
    num_layers = model.config.num_hidden_layers
    t_start = time.monotonic()
    result = C.result_header(args, device, chunk=args.chunk, page_size=args.page,
                             variants=[v.name for v in variants])
    kv_all, n_all = None, 0  # per (variant, layer, KV head) sums over every cell's samples
    for (task, length), samples in groups.items():
        sums = torch.zeros(len(variants), num_layers, _NSUM, dtype=torch.float64)
        kv = None
        n = 0
        t0 = time.monotonic()
        by_depth: dict = {}
        for s in samples:
            if args.deadline_s and time.monotonic() - t_start > args.deadline_s:
                result["partial"] = True
                break
            st = study_sample(model, tok, s, variants, args.chunk, args.page, num_layers)
            sums += st.sums
            kv = st.kv_sums.clone() if kv is None else kv + st.kv_sums
            n += 1
            key = "any" if s.depth is None else f"{s.depth:g}"
            d_sums, d_n = by_depth.get(key, (torch.zeros_like(sums), 0))
            by_depth[key] = (d_sums + st.sums, d_n + 1)
        cell = summarize(sums, n, variants)
        result["cells"][f"{task}@{length}"] = {
            "task": task, "length": length, "seconds": time.monotonic() - t0, "variants": cell,
            "by_depth": {k: {name: {m: c[m] for m in ("recall", "recall_last_block", "density",
                                                      "needle_kept_last_block")}
                             for name, c in summarize(ds, dn, variants).items()}
                         for k, (ds, dn) in sorted(by_depth.items())},
        }
        if kv is not None:
            result["cells"][f"{task}@{length}"]["per_kv_head"] = {
                v.name: {"recall": (kv[vi, :, :, 0] / n).tolist(),
                         "density": (kv[vi, :, :, 1] / n).tolist()}
                for vi, v in enumerate(variants)}
            kv_all = kv if kv_all is None else kv_all + kv
            n_all += n
        print_cell(task, length, cell)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if result["partial"]:
            print(f"deadline ({args.deadline_s} s) reached; later samples and cells skipped")
            break
    if args.head_config_out and kv_all is not None:
        vi = names.index(args.head_config_variant or names[0])
        result["head_configs"] = []
        for frac in args.dense_heads:
            doc, info = dense_head_config(kv_all[vi, :, :, 0] / n_all,
                                          kv_all[vi, :, :, 1] / n_all, frac)
            path = args.head_config_out.format(frac=frac)
            Path(path).write_text(json.dumps(doc, indent=1) + "\n")
            result["head_configs"].append(dict(info, variant=variants[vi].name, path=path,
                                               dense_heads=frac))
            print(f"head_config {path}: {info['dense_pairs']} (layer, KV head) pairs dense; "
                  f"{variants[vi].name}: density {info['density_before']:.3f} -> "
                  f"{info['density_after']:.3f}, recall {info['recall_before']:.3f} -> "
                  f"{info['recall_after']:.3f} (means over layers and KV heads)")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def dense_head_config(recall: torch.Tensor, density: torch.Tensor, fraction: float):
    """A head_config (``SPARSE_HEAD_CONFIG``) that prefills dense the ``fraction`` of (layer,
    KV head) pairs whose estimated lists keep the least attention (``recall [layers, Hkv]``),
    the other pairs keeping the studied method; with what that does to the means over pairs
    of density and recall (as measured here: every dense pair computes and keeps all)."""
    layers, hkv = recall.shape
    k = min(layers * hkv, max(0, round(fraction * layers * hkv)))
    order = torch.argsort(recall.flatten())[:k].tolist()
    dense = sorted((i // hkv, i % hkv) for i in order)
    by_layer: dict[int, list[int]] = {}
    for layer, head in dense:
        by_layer.setdefault(layer, []).append(head)
    doc = {"overrides": [{"layers": [layer], "heads": heads, "prefill_method": "dense"}
                         for layer, heads in sorted(by_layer.items())]}
    mask = torch.zeros(layers * hkv, dtype=torch.bool)
    mask[order] = True
    mask = mask.view(layers, hkv)
    info = {"dense_pairs": len(dense), "pairs": layers * hkv, "dense": [list(p) for p in dense],
            "density_before": float(density.mean()),
            "density_after": float(torch.where(mask, 1.0, density).mean()),
            "recall_before": float(recall.mean()),
            "recall_after": float(torch.where(mask, 1.0, recall).mean())}
    return doc, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p, samples=20)
    p.add_argument("--variants", nargs="+",
                   default=["xattention", "xattention:xattn_threshold=0.95",
                            "vertical_slash:vs_vertical=512,vs_slash=1024", "flexprefill"])
    p.add_argument("--chunk", type=int, default=16384,
                   help="prefill chunk (vLLM's max_num_batched_tokens of the accuracy runs)")
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--head-config-out", metavar="PATH",
                   help="write a head_config JSON that prefills dense the (layer, KV head) "
                        "pairs with the lowest recall of --head-config-variant over all cells")
    p.add_argument("--head-config-variant", help="default: the first variant")
    p.add_argument("--dense-heads", type=float, nargs="+", default=[0.1], metavar="FRACTION",
                   help="fraction(s) of (layer, KV head) pairs made dense (default 0.1); with "
                        "several, --head-config-out names one file per fraction with {frac}")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
