"""Kernel tests run on the CPU through Triton's interpreter unless a GPU run sets TRITON_INTERPRET=0."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
