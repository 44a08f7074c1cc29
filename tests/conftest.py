"""Shared pytest setup: import the top-level files, deterministic CPU runs, project DeprecationWarnings are errors."""
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))

# STYLE.md 14: a DeprecationWarning raised from a project file is a bug (the MAE np.float lesson).
for module in ("hivit", "itpn", "fast_itpn", "mim", "train", "finetune", "detect_seg", "bench"):
    warnings.filterwarnings("error", category=DeprecationWarning, module=module)


# ---- helpers the test files import (`from conftest import ...`): one copy of each ----

import json

import pytest
from torch.utils.flop_counter import FlopCounterMode

# Listings of the released checkpoints' state_dicts (keys, shapes, dtypes, parameter counts), one JSON per file.
KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_keys")


def official_layout(name: str) -> dict:
    """An official state_dict listing (tests/official_keys/<name>.json): keys, shapes, dtypes, parameter counts."""
    path = os.path.join(KEYS_DIR, f"{name}.json")
    if not os.path.exists(path):
        pytest.fail(f"official key listing {path} not found: tests/official_keys/ is part of the repository")
    with open(path) as f:
        return json.load(f)


def gmacs(model, side: int = 224) -> float:
    """Forward GMACs of a (meta-device) model on one side x side image: torch's flop counter / 2."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops() / 2e9
