"""Same-machine ratios of ``bench_vllm_e2e.py`` outputs: CUSTOM against FLASH_ATTN.

    python benchmarks/compare_e2e.py DIR [DIR ...]

Reads every ``e2e_<backend>_<tag>.json`` under the folders (as ``short_prompts_e2e.sh`` and
``e2e_vllm.sh`` name them), pairs each CUSTOM file with the FLASH_ATTN file of its engine and
round (the tag up to the setting: ``128k_default_r2`` pairs with ``128k_r2``; in each folder
separately, since only same-machine ratios compare), and prints per prompt length the batch-1
TPOT ratio (best and mean of the repeats) and the batch-16 step ratio, FLASH_ATTN time over
CUSTOM time (above 1: CUSTOM faster), then per (engine, setting) the median and range over
rounds, then per folder the ratio of the medians of every timed batch-16 pair pooled over the
rounds (``step_ms_in_run_all``, the in-run steps, where a file has them; else ``step_ms_all``).
Not a test; no GPU needed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

_NAME = re.compile(r"e2e_(?P<backend>FLASH_ATTN|CUSTOM)(?:_(?P<tag>.+))?\.json$")
_ROUND = re.compile(r"^(?P<base>.*?)(?:_r(?P<round>\d+))?$")


def _key(tag: str | None, backend: str) -> tuple[str, str, str]:
    """(engine, setting, round) of a tag: FLASH_ATTN tags are ``ENGINE[_rN]``, CUSTOM tags
    ``ENGINE_SETTING[_rN]`` (a tag without an engine part: engine "")."""
    m = _ROUND.match(tag or "")
    base, rnd = m.group("base"), m.group("round") or "1"
    if backend == "FLASH_ATTN":
        return base, "", rnd
    engine, _, setting = base.partition("_")
    return engine, setting or base, rnd


def _rows(path: Path) -> dict:
    d = json.loads(path.read_text())
    out = {}
    for r in d.get("rows", []):
        tp = r.get("tpot_all_ms") or [r["tpot_ms"]]
        out[r["input_len"]] = (min(tp), statistics.fmean(tp))
    b = d.get("decode_batch") or {}
    if b.get("cache_hits") is False:  # the batch did not fit in the KV cache: no decode step
        print(f"{path}: the batch missed the prefix cache; its step is left out")
        b = {}
    # the in-run steps where the file has them (session 19 on), else the wall-time differences
    steps = b.get("step_ms_in_run_all") or b.get("step_ms_all")
    return {"b1": out, "b16": b.get("step_ms"),
            "b16_all": steps or ([b["step_ms"]] if b.get("step_ms") else [])}


def compare(dirs: list[str]) -> list[dict]:
    """One record per CUSTOM file with a FLASH_ATTN partner in its folder."""
    records = []
    for folder in dirs:
        files = {}
        for p in sorted(Path(folder).glob("e2e_*.json")):
            m = _NAME.search(p.name)
            if m:
                files[(m.group("backend"),) + _key(m.group("tag"), m.group("backend"))] = p
        for (backend, engine, setting, rnd), path in files.items():
            if backend != "CUSTOM":
                continue
            dense = files.get(("FLASH_ATTN", engine, "", rnd))
            if dense is None:
                continue
            c, f = _rows(path), _rows(dense)
            rec = {"folder": folder, "engine": engine, "setting": setting, "round": rnd,
                   "b1": {}, "b16": None, "b16_all": c["b16_all"],
                   "dense_b16_all": f["b16_all"]}
            for n, (best, mean) in c["b1"].items():
                if n in f["b1"]:
                    rec["b1"][n] = (f["b1"][n][0] / best, f["b1"][n][1] / mean)
            if c["b16"] and f["b16"]:
                rec["b16"] = f["b16"] / c["b16"]
            records.append(rec)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args(argv)
    recs = compare(args.dirs)
    if not recs:
        print("no CUSTOM / FLASH_ATTN pairs found", file=sys.stderr)
        return 1
    groups: dict[tuple[str, str], list[float]] = {}
    pooled: dict[tuple[str, str, str], tuple[list[float], dict]] = {}
    for r in recs:
        mine, dense = pooled.setdefault((r["folder"], r["engine"], r["setting"]), ([], {}))
        mine.extend(r["b16_all"])
        dense[r["round"]] = r["dense_b16_all"]
        b1 = ", ".join(f"{n}: {best:.3f}x best / {mean:.3f}x mean"
                       for n, (best, mean) in sorted(r["b1"].items()))
        b16 = "" if r["b16"] is None else f"  b16 step {r['b16']:.3f}x"
        print(f"{r['folder']}  {r['engine'] or '-'} {r['setting']} r{r['round']}:  {b1}{b16}")
        if r["b16"] is not None:
            groups.setdefault((r["engine"], r["setting"]), []).append(r["b16"])
    for (engine, setting), vals in sorted(groups.items()):
        print(f"b16 {engine or '-'} {setting}: median {statistics.median(vals):.3f}x over "
              f"{len(vals)} (range {min(vals):.3f}-{max(vals):.3f})")
    # Every timed pair of every round of a folder pooled (bench_vllm_e2e.py --decode-repeats):
    # the median step of FLASH_ATTN's pairs over the median of CUSTOM's.
    for (folder, engine, setting), (mine, dense) in sorted(pooled.items()):
        ref = [x for vals in dense.values() for x in vals]
        if mine and ref:
            print(f"b16 pooled {folder} {engine or '-'} {setting}: "
                  f"{statistics.median(ref) / statistics.median(mine):.3f}x (FLASH_ATTN "
                  f"{statistics.median(ref):.2f} ms over {len(ref)} pairs, CUSTOM "
                  f"{statistics.median(mine):.2f} ms over {len(mine)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
