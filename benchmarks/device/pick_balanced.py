"""The fastest balanced-kernel variant of a bench_decode_engine.py JSON for one plan, as the
SPARSE_SERVE_BALANCED_DECODE value that sets its launch constants in an engine (empty for
the plain "balanced" variant: the code's own constants):
    python3 benchmarks/device/pick_balanced.py FILE [PLAN]   ->  "VARIANT VALUE"
"""
import json
import re
import sys


def env_value(variant: str) -> str:
    m = re.fullmatch(r"balanced(?:_p(\d+))?(?:_bn(\d+))?(?:_stages(\d+))?(?:_warps(\d+))?",
                     variant)
    if m is None:
        raise SystemExit(f"not a launch-constant variant: {variant}")
    names = ("PROGRAMS_PER_SM", "BLOCK_N", "NUM_STAGES_16BIT", "NUM_WARPS")
    return ",".join(f"{n}={v}" for n, v in zip(names, m.groups()) if v)


def main(path: str, plan: str = "topk_auto") -> None:
    row = json.load(open(path))["rows"][0]
    cands = {k.split("+", 1)[1]: v for k, v in row["us_per_layer"].items()
             if k.startswith(plan + "+balanced") and "bf16" not in k}
    best = min(cands, key=cands.get)
    print(best, env_value(best))


if __name__ == "__main__":
    main(*sys.argv[1:])
