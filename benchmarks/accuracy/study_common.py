"""What the two PyTorch studies (decode and prefill selection) share: their command line, the
model and samples they load, and the header of their result JSON."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import tasks as T


def add_common_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", help="a tokenizer path; 'char': tasks.CharTokenizer (tests)")
    p.add_argument("--haystack", default="essays", choices=("essays", "builtin"))
    p.add_argument("--tasks", nargs="+", default=["niah_multikey", "qa"])
    p.add_argument("--lengths", nargs="+", type=int, default=[32768])
    p.add_argument("--depths", nargs="+", type=float, default=list(T.DEFAULT_DEPTHS),
                   help="needle depths the samples cycle through (0: start of the haystack)")
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sample-cache")
    p.add_argument("--deadline-s", type=float, default=0.0)
    p.add_argument("--out")


def load_model_and_samples(args, attn_name: str):
    """(tokenizer, model on the GPU if there is one -- bf16 there, fp32 on the CPU -- with the
    attention function registered as ``attn_name``, device, {(task, length): [Sample]})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from run_accuracy import prepare_groups

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = (T.CharTokenizer() if args.tokenizer == "char"
           else AutoTokenizer.from_pretrained(args.tokenizer or args.model))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                 attn_implementation=attn_name).to(device).eval()
    groups = prepare_groups(tok, args.tasks, args.lengths, args.samples, depths=args.depths,
                            seed=args.seed,
                            opts=T.TaskOptions(haystack=args.haystack), workers=args.workers,
                            cache_dir=Path(args.sample_cache) if args.sample_cache else None)
    return tok, model, device, groups


def result_header(args, device: str, **extra) -> dict:
    import transformers

    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), **extra, "cells": {}, "partial": False,
    }
