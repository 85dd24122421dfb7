"""One line per (context, batch) of a bench_decode_engine.py JSON: us per layer of FA3, the
plans and their variants (names containing any of the given filters; default: fa3, dense,
topk_auto and every variant).   python3 benchmarks/device/print_decode_engine.py FILE [FILTER...]
"""
import json
import sys


def main(path: str, filters: list[str]) -> None:
    for r in json.load(open(path))["rows"]:
        us = r["us_per_layer"]
        keys = [k for k in us if (any(f in k for f in filters) if filters else
                                  k in ("fa3", "dense", "topk_auto") or "+" in k)]
        print(f"{r['context']:>6} b{r['batch']:<3}",
              " ".join(f"{k}={us[k]:.1f}" for k in keys), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
