"""The benchmarks' cached models, trained the same way on every x86 machine with AVX2.

Training a small model for thousands of steps amplifies the last bit of every matrix product, and which
kernels PyTorch, MKL and oneDNN run depends on the CPU's instruction sets and on the thread count: the
same seed and the same code gave different weights with 1 or 2 threads, and with AVX-512 or AVX2 code
paths (a digits VGG from one seed kept 23.9% or 68.3% accuracy after plain pruning at 30%), so the
benchmark's figures depended on the machine. So a benchmark trains a missing model in a child process
pinned to 2 threads and to AVX2 code paths (MKL's conditional numerical reproducibility, oneDNN's and
ATen's instruction-set caps), and prunes and measures it unpinned in its own process. Elsewhere (no AVX2,
another PyTorch build) the child still runs, its weights may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED_ENVIRONMENT = {
    "MKL_CBWR": "AVX2,STRICT",  # MKL: the same results on any CPU with AVX2, whatever the thread count
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # convolutions
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
    "OMP_NUM_THREADS": "2",  # reductions split the same way on 2 cores or 64
    "MKL_NUM_THREADS": "2",
}


def train_pinned(path: str, module: str, function: str, *args: Any) -> None:
    """Save at ``path`` the state dict of the model ``module.function(*args)`` trains (a module of this folder;
    arguments JSON-serialisable), run in a child process pinned as above."""
    code = (f"import json, os, sys, torch; sys.path.insert(0, {HERE!r}); import {module}; "
            f"model = {module}.{function}(*json.loads(sys.argv[1])); path = sys.argv[2]; "
            "os.makedirs(os.path.dirname(path), exist_ok=True); torch.save(model.state_dict(), path + '.part'); "
            "os.replace(path + '.part', path)")
    subprocess.run([sys.executable, "-c", code, json.dumps(args), path], env={**os.environ, **PINNED_ENVIRONMENT},
                   check=True)


def load_or_train(path: str, model: nn.Module, module: str, function: str, *args: Any) -> nn.Module:
    """``model`` (freshly built, as trained) with the weights cached at ``path``, trained by
    ``module.function(*args)`` in a pinned child process where they are missing; in eval mode."""
    if not os.path.exists(path):
        train_pinned(path, module, function, *args)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()
