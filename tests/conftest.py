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
