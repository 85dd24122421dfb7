"""Which decode page selection keeps a real model's answers? A study in plain PyTorch.

Runs a Hugging Face model on the harness's tasks (tasks.py) with dense prefill, then greedy
decode in which every attention call of a decode step reads only the pages a selection
scheme keeps (selection_schemes.py). All variants of one sample decode together as rows of
one batch that share the prefill's KV cache, so a sample costs one prefill and one decode
loop however many variants are compared. Per variant it reports the task accuracy, the exact
token match with the dense row, and the recall of every layer: the share of the true
attention probability (softmax over every key) that falls on the kept tokens, averaged over
decode steps and query heads, and its minimum over a step's heads.

This is the reference side of a design choice: the kernels implement one scheme ("sum",
Quest summed over a GQA group); run this to see what another scheme, a budget or dense
first layers would buy before building it into a kernel, or to pick a budget for a model.

    python benchmarks/accuracy/decode_selection_study.py --model /path/to/hf_model \
        --tasks niah_multikey qa --lengths 32768 --samples 50 \
        --variants dense sum:4096 max:4096 norm_max:4096 oracle:4096 sum:4096@dl2 sum:8192 \
        --out study.json

Variants: ``dense``, or ``SCHEME:BUDGET[@dlN][@sN]``: a scheme of
``selection_schemes.SCHEMES``, a token budget (a multiple of the page size), optionally the
first N layers decoding dense (``@dl2``: Quest leaves layers 0 and 1 dense) and a sink of N
tokens for this variant (``@s128``; default ``--sink-tokens``). Local tokens, the page size and
the dense threshold (rows of at most ``dense_factor * budget`` tokens read everything, as
``decode_min_seq_len=0`` does in the engines) follow the kernels' defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_schemes as S  # noqa: E402
import study_common as C  # noqa: E402

ATTN_NAME = "sparse_serve_study"


@dataclass(frozen=True)
class Variant:
    name: str
    scheme: str | None  # None: dense
    budget: int = 0
    dense_layers: int = 0
    sink_tokens: int | None = None  # None: --sink-tokens


def parse_variant(spec: str, page: int) -> Variant:
    if spec == "dense":
        return Variant("dense", None)
    head, *opts = spec.split("@")
    scheme, _, budget = head.partition(":")
    extra = {}
    for o in opts:
        m = re.fullmatch(r"(dl|s)(\d+)", o)
        if m is None:
            extra = None
            break
        extra["dense_layers" if m.group(1) == "dl" else "sink_tokens"] = int(m.group(2))
    if scheme not in S.SCHEMES or not budget.isdigit() or extra is None:
        raise SystemExit(f"bad variant {spec!r}: 'dense' or SCHEME:BUDGET[@dlN][@sN], "
                         f"SCHEME in {S.SCHEMES}")
    if int(budget) % page or int(budget) < page:
        raise SystemExit(f"variant {spec!r}: budget must be a positive multiple of the page "
                         f"size {page}")
    return Variant(spec, scheme, int(budget), **extra)


class StudyState:
    """What the attention function needs for the decode steps of one batch of variants."""

    def __init__(self, variants, page, sink_tokens, local_tokens, dense_factor, num_layers,
                 device):
        self.variants = variants
        self.page = page
        self.sink_pages = torch.tensor(
            [-(-(sink_tokens if x.sink_tokens is None else x.sink_tokens) // page)
             for x in variants], device=device)
        self.local_pages = -(-local_tokens // page)
        self.active = False
        v = len(variants)
        big = 1 << 40
        self.budget_pages = torch.tensor([x.budget // page if x.scheme else big for x in variants],
                                         device=device)
        self.dense_tokens = torch.tensor(
            [dense_factor * x.budget if x.scheme else big for x in variants], device=device)
        self.dense_layers = torch.tensor([x.dense_layers if x.scheme else big for x in variants],
                                         device=device)
        self.rows_of = {}
        for i, x in enumerate(variants):
            if x.scheme:
                self.rows_of.setdefault(x.scheme, []).append(i)
        self.rows_of = {k: torch.tensor(r, device=device) for k, r in self.rows_of.items()}
        self.alive = torch.ones(v, device=device)
        # per (variant, layer): sums of mean recall, min recall, fraction read; and the count
        self.sums = torch.zeros((v, num_layers, 3), dtype=torch.float64, device=device)
        self.count = torch.zeros((v, num_layers), dtype=torch.float64, device=device)


STATE: StudyState | None = None


def study_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """HF attention interface: dense sdpa for prefill, the variants' selections at decode."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = STATE
    if st is None or not st.active or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    b, hq, _, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    q = query[:, :, 0].reshape(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhld->bhgl", q.float(), key.float()) * scale
    probs = torch.softmax(logits, dim=-1)
    lo, hi = S.page_bounds(key, st.page)
    pages = torch.ones((b, hkv, lo.shape[2]), dtype=torch.bool, device=query.device)
    for scheme, rows in st.rows_of.items():
        sc = S.scheme_scores(scheme, q[rows], lo[rows], hi[rows], probs[rows], st.page, scale)
        pages[rows] = S.select_page_mask(sc, n, st.page, st.budget_pages[rows],
                                         st.sink_pages[rows], st.local_pages,
                                         st.dense_tokens[rows])
    pages |= (st.dense_layers > module.layer_idx)[:, None, None]
    keep = S.token_mask(pages, n, st.page)  # [B, Hkv, L]
    recall = (probs * keep[:, :, None]).sum(-1).reshape(b, hq)  # [B, Hq]
    frac = keep.float().mean(dim=(1, 2))
    li = module.layer_idx
    st.sums[:, li, 0] += recall.mean(1).double() * st.alive
    st.sums[:, li, 1] += recall.amin(1).double() * st.alive
    st.sums[:, li, 2] += frac.double() * st.alive
    st.count[:, li] += st.alive
    logits = logits.masked_fill(~keep[:, :, None], float("-inf"))
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(logits, dim=-1), value.float())
    return out.reshape(b, hq, d)[:, None].to(query.dtype), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, study_attention)


def eos_ids(tok, model) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None),
                getattr(tok, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids


@torch.no_grad()
def decode_variants(model, prompt_ids: list[int], state: StudyState, max_tokens: int,
                    eos: set[int]) -> list[list[int]]:
    """Dense prefill once, then greedy decode of every variant as one batch row each."""
    from transformers import DynamicCache

    global STATE
    STATE = state
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=dev)
    cache = DynamicCache()
    state.active = False
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    v = len(state.variants)
    cache.batch_repeat_interleave(v)
    tok = out.logits[:, -1].argmax(-1).expand(v).contiguous()
    gen = [tok]
    done = torch.zeros(v, dtype=torch.bool, device=dev)
    eos_t = torch.tensor(sorted(eos) or [-1], device=dev)
    state.active = True
    try:
        for _ in range(max_tokens - 1):
            done |= torch.isin(tok, eos_t)
            state.alive = (~done).double()
            if bool(done.all()):
                break
            out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)
            gen.append(tok)
    finally:
        state.active = False
    rows = torch.stack(gen, 1).tolist()
    result = []
    for r in rows:
        cut = next((i for i, t in enumerate(r) if t in eos), len(r))
        result.append(r[:cut])
    return result


def summarize(per_variant: dict, variants, num_layers: int) -> dict:
    out = {}
    for i, x in enumerate(variants):
        rec = per_variant[x.name]
        n = max(1, rec["n"])
        cnt = rec["count"]
        layer_mean = [rec["sums"][li][0] / cnt[li] if cnt[li] else None for li in range(num_layers)]
        layer_min = [rec["sums"][li][1] / cnt[li] if cnt[li] else None for li in range(num_layers)]
        frac = [rec["sums"][li][2] / cnt[li] if cnt[li] else None for li in range(num_layers)]
        valid = [m for m in layer_mean if m is not None]
        out[x.name] = {
            "scheme": x.scheme, "budget": x.budget, "dense_layers": x.dense_layers,
            "sink_tokens": x.sink_tokens,
            "samples": rec["n"], "accuracy": rec["score"] / n,
            "exact_match_vs_dense": rec["exact"] / n, "first8_match_vs_dense": rec["first8"] / n,
            "recall_mean": sum(valid) / len(valid) if valid else None,
            "recall_min_head_mean": (sum(m for m in layer_min if m is not None) / len(valid)
                                     if valid else None),
            "kv_fraction_read": (sum(f for f in frac if f is not None) / len(valid)
                                 if valid else None),
            "recall_per_layer": layer_mean, "recall_min_head_per_layer": layer_min,
        }
    return out


def run(args) -> dict:
    variants = [parse_variant(s, args.page) for s in args.variants]
    if not variants or variants[0].name != "dense":
        variants.insert(0, Variant("dense", None))  # the reference row for token matches
    register_attention()
    tok, model, device, groups = C.load_model_and_samples(args, ATTN_NAME)
    num_layers = model.config.num_hidden_layers
    eos = eos_ids(tok, model)
    t_start = time.monotonic()
    result = C.result_header(args, device, page_size=args.page, sink_tokens=args.sink_tokens,
                             local_tokens=args.local_tokens, dense_factor=args.dense_factor,
                             variants=[v.name for v in variants])
    for (task, length), samples in groups.items():
        per = {v.name: {"n": 0, "score": 0.0, "exact": 0, "first8": 0,
                        "sums": [[0.0, 0.0, 0.0] for _ in range(num_layers)],
                        "count": [0.0] * num_layers} for v in variants}
        t0 = time.monotonic()
        for s in samples:
            if args.deadline_s and time.monotonic() - t_start > args.deadline_s:
                result["partial"] = True
                break
            st = StudyState(variants, args.page, args.sink_tokens, args.local_tokens,
                            args.dense_factor, num_layers, device)
            rows = decode_variants(model, s.prompt_token_ids, st, s.max_tokens, eos)
            sums, count = st.sums.tolist(), st.count.tolist()
            for i, v in enumerate(variants):
                r = per[v.name]
                text = tok.decode(rows[i], skip_special_tokens=True)
                r["n"] += 1
                r["score"] += s.score(text)
                r["exact"] += int(rows[i] == rows[0])
                r["first8"] += int(rows[i][:8] == rows[0][:8])
                for li in range(num_layers):
                    for j in range(3):
                        r["sums"][li][j] += sums[i][li][j]
                    r["count"][li] += count[i][li]
        cell = summarize(per, variants, num_layers)
        result["cells"][f"{task}@{length}"] = {"task": task, "length": length,
                                               "seconds": time.monotonic() - t0,
                                               "variants": cell}
        print_cell(task, length, cell)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if result["partial"]:
            print(f"deadline ({args.deadline_s} s) reached; later samples and cells skipped")
            break
    return result


def print_cell(task, length, cell) -> None:
    print(f"== {task} @ {length}")
    print(f"  {'variant':22s} {'n':>3s} {'acc':>6s} {'exact':>6s} {'recall':>7s} "
          f"{'min-head':>8s} {'KV read':>7s}  worst layers (recall)")
    for name, c in cell.items():
        per = [(r, i) for i, r in enumerate(c["recall_per_layer"]) if r is not None]
        worst = ", ".join(f"L{i} {r:.2f}" for r, i in sorted(per)[:3])
        fmt = (lambda x: f"{x:.3f}" if x is not None else "  n/a")
        print(f"  {name:22s} {c['samples']:3d} {c['accuracy']:6.3f} "
              f"{c['exact_match_vs_dense']:6.3f} {fmt(c['recall_mean']):>7s} "
              f"{fmt(c['recall_min_head_mean']):>8s} {fmt(c['kv_fraction_read']):>7s}  {worst}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_common_args(p, samples=50)
    p.add_argument("--variants", nargs="+",
                   default=["dense", "sum:4096", "max:4096", "norm_max:4096", "softmax_sum:4096",
                            "mean_q:4096", "oracle:4096", "sum:4096@dl2", "sum:8192"])
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--local-tokens", type=int, default=512)
    p.add_argument("--dense-factor", type=int, default=2)
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
