r"""train.py: masked image pre-training of HiViT / iTPN / Fast-iTPN / ViT, from a laptop CPU to 8 GPUs x N nodes.

Paper:
    Integrally Pre-Trained Transformer Pyramid Networks (iTPN; Tian et al., CVPR 2023, arXiv 2211.12735), whose
    recipe is MAE's (Masked Autoencoders Are Scalable Vision Learners; He et al., CVPR 2022, arXiv 2111.06377).
    The methods themselves live in mim.py (MAE, SimMIM, FastMIM, M3I), itpn.py and fast_itpn.py.

Implements:
    The pre-training driver, and the run machinery finetune.py and detect_seg.py import from it: settings as one
    dataclass per script (one flag per field), DDP set-up from torchrun's environment, the data readers, the
    checkpoint / log / resume records and `Trainer`, the loop skeleton every script runs its task through.
    `python train.py` is the classroom demo: tiny iTPN, paper method (MIM + MFM), built-in shapes, ~3 min on CPU.

Sections:
    1. Settings: RunConfig, PretrainConfig, flags   <-> MAE main_pretrain.py flags
    2. Setup: DDP from torchrun's environment       <-> MAE recipe (torchrun, DistributedSampler)
    3. Data: shapes, image files, seeded views      <-> MAE Sec. 4 / iTPN Tab. 7: RandomResizedCrop(0.2-1) + flip;
                                                    M3I Sec. 3.4: two independently augmented views
    4. Model: the --model and --method tables       <-> iTPN Sec. 3.3-3.4 (mim.py / itpn.py / fast_itpn.py)
    5. Optimizer and schedule                       <-> iTPN Tab. 7: AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x B / 256
    6. Run records: checkpoints, log, pictures      <-> MAE checkpoint-<epoch>.pth, log.txt, MAE Fig. 2 panels
    7. The loop: Trainer and the pre-training task  <-> MAE engine_pretrain (accumulation, AMP, clip)
    8. main

Shapes:
    B images per process per micro-step, V views per image (1, or 2 for M3I), H = W = --input_size, N = (H/16)^2
    units, P picture panels. mask: (B, N), 1 = removed (masked), 0 = kept (visible).

Differences from the paper / official code:
    - Defaults come from a recipe: "paper" (224 px, batch 64 per GPU, 400 epochs, 40 warm-up) for the paper-size
      models, "demo" (64 px, 400 built-in images, 30 epochs) for the tiny models. Any flag overrides.
      The paper's effective batch is 4096 = 64 GPUs x 64; on 8 GPUs add --accum_iter 8 to keep it.
    - Every random draw is seeded from its position in the run: augmentation from (seed, epoch, image index), masks
      and drop path from (seed, step, shard), shard = micro_step * world_size + rank (MAE seeds each process once).
      So a resumed run is bitwise the run that was never stopped (CPU) and checkpoints need no RNG state, and with
      --batch_size 1 a run on R ranks with --accum_iter A equals one process with --accum_iter R*A.
    - Unreadable images are skipped and counted (log key skipped_images); MAE crashes. Checkpoints hold plain types
      only (torch.load weights_only=True reads them) and are written to a .tmp file, fsynced, then renamed.
    - A fresh run refuses an --output_dir that holds checkpoints (--resume auto continues, --overwrite replaces
      the run's own files); a resume refuses other settings of what is trained (model, method, seed, input size,
      masking, targets, truncation), another effective batch or another dataset size; Ctrl-C (or SIGTERM) stops at
      a step boundary, saves and prints the resume command (a torchrun one under torchrun).
    - bf16 autocast (no GradScaler) on CUDA by default, fp32 on CPU (bf16 is much slower on CPUs without bf16 units);
      the official code used fp16 + GradScaler (--amp fp16).
    - One optimisation recipe (iTPN's = MAE's) for every --method; after each step train.py calls
      ema_update(progress=step/total) on pre-trainers with a momentum teacher.

Run:
    python train.py                                         # CPU demo: tiny iTPN, built-in shapes, ~3 min, output/
    python train.py --model itpn_b --data_path /imagenet --batch_size 8 --max_steps 20      # one-GPU/CPU smoke test
    torchrun --nproc_per_node 8 train.py --model itpn_b --data_path /imagenet --accum_iter 8  # paper: eff. batch 4096
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        train.py --model itpn_b --data_path /imagenet     # the same on each of 8 nodes (HOST: one of them): 64 GPUs
    python train.py --resume auto --output_dir output       # continue the run in output/ where it stopped
"""

import argparse
import errno
import glob
import io
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.utils import make_grid
from tqdm import tqdm

import fast_itpn
import hivit
import itpn
import mim

# The seam finetune.py and detect_seg.py build on (README "Seams"): settings, set-up, data, records, the loop.
__all__ = [
    "flag", "RunConfig", "PretrainConfig", "parse_config", "ConfigError",
    "Dist", "setup_distributed", "teardown_distributed", "print0", "seed_for", "resume_command",
    "SHAPE_CLASSES", "ShapesDataset", "IMAGE_EXTENSIONS", "to_rgb", "ImageFiles", "SeededViews", "PretrainViews",
    "epoch_loader", "DataError", "count_steps", "cosine_schedule", "IMAGENET_MEAN", "IMAGENET_STD",
    "MODELS", "METHOD_FILE", "build_pretrainer",
    "BETAS", "param_groups", "get_lr",
    "write_file", "save_image", "save_checkpoint", "find_checkpoint", "load_checkpoint", "prepare_output_dir",
    "clear_run", "write_run_config",
    "denormalize", "titled_grid", "Trainer", "one_line", "script_errors", "main",
]


# ---- 1. Settings: one dataclass per script, one flag per field ----------------------------------------------------

class ConfigError(ValueError):
    """A user's mistake in the flags or files: main prints its message (no traceback) and exits."""


def flag(default, help: str, **argparse_options):
    """A settings field: its default, its --help text, and optional argparse options (choices, metavar) and
    `valid=(test, words)`, the range check run at start-up (None, "the recipe's default", always passes)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class RunConfig:
    """Run settings every script shares (None = the recipe's default, shown in --help)."""
    batch_size: int | None = flag(None, "images per process per micro-step; effective batch = batch_size x "
                                        "accum_iter x processes", valid=(lambda v: v >= 1, ">= 1"))
    accum_iter: int = flag(1, "micro-steps accumulated per optimizer step (8 on 8 GPUs gives iTPN's 4096)",
                           valid=(lambda v: v >= 1, ">= 1"))
    epochs: int | None = flag(None, "training epochs", valid=(lambda v: v >= 1, ">= 1"))
    warmup_epochs: float | None = flag(None, "linear warm-up epochs from lr 0", valid=(lambda v: v >= 0, ">= 0"))
    blr: float | None = flag(None, "base learning rate: lr = blr x effective batch / 256",
                             valid=(lambda v: v > 0, "> 0"))
    lr: float | None = flag(None, "absolute learning rate; overrides --blr", valid=(lambda v: v > 0, "> 0"))
    min_lr: float | None = flag(None, "learning rate at the end of the schedule", valid=(lambda v: v >= 0, ">= 0"))
    weight_decay: float | None = flag(None, "AdamW weight decay on matrices", valid=(lambda v: v >= 0, ">= 0"))
    clip_grad: float | None = flag(None, "clip the global gradient norm to this value (default off; the norm is "
                                         "logged either way)", valid=(lambda v: v > 0, "> 0 (leave it out for no "
                                                                                       "clipping)"))
    amp: str = flag("auto", "mixed precision: auto = bf16 on CUDA, none on CPU; fp16 adds a GradScaler",
                    choices=["auto", "none", "bf16", "fp16"])
    device: str = flag("auto", "auto = CUDA when available (under torchrun: the GPU LOCAL_RANK)",
                       choices=["auto", "cpu", "cuda"])
    seed: int = flag(0, "seed of the model init, data order, augmentation and masks",
                     valid=(lambda v: 0 <= v < 2**32, "in [0, 2**32)"))   # numpy's seed range
    threads: int | None = flag(None, "CPU threads per process (torch.set_num_threads); tiny models are overhead-"
                                     "bound and run fastest on 1", valid=(lambda v: v >= 1, ">= 1"))
    num_workers: int | None = flag(None, "DataLoader worker processes per process",
                                   valid=(lambda v: v >= 0, ">= 0"))
    output_dir: str = flag("output", "checkpoints, log.txt (one JSON line per epoch), config.json and pictures")
    resume: str = flag("", "checkpoint to continue from; 'auto' = the latest one in --output_dir (fresh if none)",
                       metavar="PATH|auto")
    overwrite: bool = flag(False, "start a fresh run in an --output_dir that already holds a run, replacing its "
                                  "checkpoints, log, config and pictures (without it such a start is refused)")
    save_every: int | None = flag(None, "keep checkpoint-<epoch>.pth every N epochs (checkpoint-last.pth is "
                                        "rewritten every epoch)", valid=(lambda v: v >= 1, ">= 1 (epochs)"))
    max_steps: int | None = flag(None, "stop after this many optimizer steps in total (checkpoint saved); the "
                                       "schedule still follows --epochs", valid=(lambda v: v >= 1, ">= 1"))

    # Settings a resumed run must share with its checkpoint, besides the effective batch and the dataset size
    # (check_resumable). A subclass adds its own: the keys of every class in the hierarchy count. The seed fixes
    # the data order, so it decides which images a mid-epoch resume skips, and every later crop and mask.
    RESUME_KEYS = ("seed",)


@dataclass
class PretrainConfig(RunConfig):
    """Pre-training: model, method and data."""
    model: str = flag("itpn_tiny", "architecture and size (see --model's choices)", metavar="NAME")
    method: str | None = flag(None, "pre-training method; default: itpn (paper Eq. 4: MIM + multi-stage MFM with an "
                                    "EMA teacher) for iTPN models, mae for HiViT/ViT, fastmim for Fast-iTPN",
                              metavar="NAME")
    teacher: str | None = flag(None, "frozen teacher checkpoint for --method itpn_distill / fast_itpn_distill: a "
                                     "local OpenAI-CLIP visual state dict or a ViT checkpoint of this project",
                               metavar="PATH")
    mask_ratio: float | None = flag(None, "fraction of 16-px units masked (default: the method's, 0.75 for MAE and "
                                          "iTPN)", valid=(lambda v: 0 <= v < 1, "in [0, 1): the fraction of units "
                                                          "masked; 1 would leave nothing visible"))
    norm_pix_loss: bool | None = flag(None, "pixel targets normalised per unit (MAE); default: the method's (on). "
                                            "mim.py methods only")
    truncate: int = flag(0, "pre-train the encoder with its last K attention blocks removed (FastMIM Tab. 1c); "
                            "fine-tuning loads it into the full-depth model. mim.py methods only",
                         metavar="K", valid=(lambda v: v >= 0, ">= 0"))
    data_path: str | None = flag(None, "image folder: an ImageFolder tree (<path>/train/<class>/*.jpg) or any "
                                       "folder of images, labels ignored. Default: the built-in ShapesDataset")
    num_images: int | None = flag(None, "size of the built-in dataset when --data_path is not given",
                                  valid=(lambda v: v >= 1, ">= 1"))
    input_size: int | None = flag(None, "crop side in px, a multiple of the model's 16-px unit (default: the "
                                        "method's: 224, FastMIM's 128, FastMIM-P's 128->160->192, which an "
                                        "explicit value rescales)", valid=(lambda v: v >= 1, ">= 1 (a multiple "
                                                                           "of the model's unit)"))
    vis_every: int | None = flag(None, "write reconstruction pictures every N epochs and at the end",
                                 valid=(lambda v: v >= 1, ">= 1 (epochs)"))

    # What is trained: the architecture and its depth, the method, the crop side, the masking and the targets.
    # Not --data_path (a folder may move; its size is checked) nor --teacher (a file may move; the teacher's weights
    # are part of the pre-trainer's state and come back from the checkpoint).
    RESUME_KEYS = ("model", "method", "input_size", "mask_ratio", "norm_pix_loss", "truncate")


# Defaults that depend on the model size. "paper": iTPN Tab. 7 / MAE PRETRAIN.md (400 of the 400/1600 epochs,
# 64 images per GPU; 64 GPUs give the paper's 4096). "demo": the tiny presets on 2 CPU cores in a few minutes.
PAPER_INPUT_SIZE = 224   # iTPN Tab. 7; mim.py methods carry their own (FastMIM 128)
DEFAULTS = {
    "paper": dict(num_images=10000, batch_size=64, epochs=400, warmup_epochs=40, blr=1.5e-4, min_lr=0.0,
                  weight_decay=0.05, num_workers=10, save_every=20, vis_every=20),
    "demo": dict(input_size=64, num_images=400, batch_size=32, epochs=30, warmup_epochs=3, blr=1.5e-2, min_lr=0.0,
                 weight_decay=0.05, num_workers=0, save_every=10, vis_every=5, threads=1),
}


def field_type(f) -> type:
    """The scalar type of a settings field: int, float, str or bool (`int | None` -> int)."""
    args = getattr(f.type, "__args__", None)
    return next(a for a in args if a is not type(None)) if args else f.type


def build_parser(cls, *, description: str, defaults: dict[str, dict], epilog: str = "") -> argparse.ArgumentParser:
    """One flag per field of `cls`, in one group per class of its hierarchy (the script's own settings last).

    Booleans get --name / --no-name; a field the recipes fill shows each recipe's value in its help."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    classes = [k for k in cls.__mro__ if is_dataclass(k)]                # the script's own class first
    owner = {f.name: next(k for k in classes if f.name in k.__dict__.get("__annotations__", {})) for f in fields(cls)}
    for klass in reversed(classes):
        group = parser.add_argument_group(klass.__doc__.split("\n")[0])
        for f in fields(cls):
            if owner[f.name] is not klass:                                # a subclass may redefine a field
                continue
            help_text = f.metadata["help"]
            if any(f.name in d for d in defaults.values()):
                help_text += " (default " + ", ".join(f"{name} {d.get(f.name)}" for name, d in defaults.items()) + ")"
            elif f.default not in (None, MISSING, "") and field_type(f) is not bool:
                help_text += f" (default {f.default})"
            options = {k: v for k, v in f.metadata.items() if k in ("choices", "metavar")}
            if field_type(f) is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                   help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=field_type(f), default=f.default, help=help_text, **options)
    return parser


def range_errors(cfg) -> list[str]:
    """One message per setting outside its valid range (a 0 batch or accum_iter would divide by zero later)."""
    errors = []
    for f in fields(cfg):
        value, valid = getattr(cfg, f.name), f.metadata.get("valid")
        if valid is not None and value is not None and not valid[0](value):
            errors.append(f"--{f.name} {value} is out of range: it must be {valid[1]}")
    return errors


def parse_config(cls, argv, *, description: str, defaults: dict[str, dict], recipe, epilog: str = ""):
    """argv -> (cfg, parser): parse, fill unset fields from defaults[recipe(cfg)], then range-check every field.

    A bad value stops here with argparse's usage error (exit code 2), before any model is built or file written."""
    parser = build_parser(cls, description=description, defaults=defaults, epilog=epilog)
    cfg = cls(**vars(parser.parse_args(argv)))
    for key, value in defaults[recipe(cfg)].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if range_errors(cfg):
        parser.error("; ".join(range_errors(cfg)))
    return cfg, parser


# ---- 2. Setup: DDP from torchrun's environment, seeds -------------------------------------------------------------

@dataclass
class Dist:
    """Where this process stands: its rank among world_size processes and its device."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return dist.is_initialized()


def setup_distributed(cfg: RunConfig) -> Dist:
    """Threads, device and process group from torchrun's RANK / LOCAL_RANK / WORLD_SIZE (one process when unset).

    torchrun (or `torchrun --nnodes ...` on every node) exports these variables; nothing else launches DDP here.
    NCCL on GPUs, gloo on CPU. A requested device that is not there is a ConfigError, not a driver traceback."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to PyTorch (check the driver, "
                          "CUDA_VISIBLE_DEVICES and the torch build) - or use --device cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: lower "
                              f"--nproc_per_node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (torchrun sets RANK; without it this is the only process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers, e.g. (seed, step, shard); the same on every machine and process."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def resume_command(script: str, argv: list[str], dist_: Dist) -> str:
    """The command that starts this run again, launched as it was: `python script ...` for one process,
    `torchrun --nproc_per_node N script ...` under torchrun (with --nnodes and a rendezvous endpoint HOST to fill
    in when the run spans nodes). --resume and --overwrite are left out; Trainer.fit adds --resume auto."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg not in ("--resume", "--overwrite", "--no-overwrite") and not arg.startswith("--resume="):
            kept.append(arg)
        skip = arg == "--resume"                                          # its value follows it
    if dist_.world_size == 1:
        launcher = "python"
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist_.world_size))   # torchrun exports it
        nodes = dist_.world_size // per_node
        launcher = (f"torchrun --nproc_per_node {per_node}" if nodes == 1 else
                    f"torchrun --nnodes {nodes} --nproc_per_node {per_node} --rdzv_backend c10d "
                    f"--rdzv_endpoint HOST:29500")
    return shlex.join([*launcher.split(), script, *kept])


# ---- 3. Data: the built-in ShapesDataset, image files, seeded views -----------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ellipse", "cross", "hexagon", "ring")  # labels 1..K
SPLITS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 4          # shapes are drawn at 4x resolution and box-filtered down (anti-aliasing)
MIN_VISIBLE = 0.3        # an instance less than 30% visible after occlusion is dropped from the targets


def shape_outline(name: str, rng: np.random.Generator):
    """Polygon(s) of a shape in unit coordinates (radius ~1, centred): (outline (k, 2), hole (k, 2) or None)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)                          # (48, 2)
    if name in ("circle", "ring"):
        return circle, (circle * rng.uniform(0.45, 0.65) if name == "ring" else None)
    if name == "ellipse":
        return circle * [1.0, rng.uniform(0.4, 0.6)], None               # aspect is the class cue here
    if name == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None          # (10, 2)
    if name == "cross":
        a = 0.35                                                          # half arm width
        return np.array([[a, 1], [a, a], [1, a], [1, -a], [a, -a], [a, -1], [-a, -1], [-a, -a], [-1, -a],
                         [-1, a], [-a, a], [-a, 1]], dtype=float), None
    sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False) + np.pi / sides
    return np.stack([np.cos(t), np.sin(t)], 1), None                      # (sides, 2)


class ShapesDataset(Dataset):
    """Procedural scenes of coloured shapes on textured backgrounds: no files, no network, no licence.

    Sample i is drawn from np.random.default_rng([seed, split, i]), so it is the same in every DataLoader worker,
    every DDP rank and every rerun. One generator serves every task (finetune.py and detect_seg.py reuse it):
        task="pretrain" -> (PIL image, 0)               label ignored, like ImageFolder for MIM
        task="cls"      -> (PIL image, label in 0..K-1) one centred object; only its shape tells the class
        task="det"/"seg"-> (PIL image, {"labels" (n,) 1..K, "boxes" (n, 4) xyxy px, "masks" (n, H, W) bool,
                                        "semantic" (H, W) uint8: 0 background, k class, 255 ignore})
    Colour, size, rotation, aspect, position, texture and background vary independently of the class.
    """

    def __init__(self, num_images: int, *, image_size: int = 64, seed: int = 0, split: str = "train",
                 task: str = "pretrain", num_objects: tuple[int, int] = (1, 4),
                 scale: tuple[float, float] = (0.15, 0.4)):
        if task not in ("pretrain", "cls", "det", "seg"):
            raise ValueError(f"task must be pretrain, cls, det or seg, got {task!r}")
        self.num_images, self.image_size, self.seed, self.split = num_images, image_size, seed, SPLITS[split]
        self.task, self.num_objects, self.scale = task, num_objects, scale
        self.classes = list(SHAPE_CLASSES)

    def __len__(self):
        return self.num_images

    def background(self, rng) -> np.ndarray:
        """(S, S, 3) float in [0, 1]: a two-colour gradient or low-frequency noise, plus pixel noise."""
        s = self.image_size
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            ramp = np.linspace(0, 1, s)[:, None, None]                   # (S, 1, 1) vertical gradient
            img = c0 + (c1 - c0) * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))   # (S, S, 3)
        else:
            coarse = Image.fromarray((rng.uniform(0, 1, (4, 4)) * 255).astype(np.uint8))      # 4x4 noise
            low = np.asarray(coarse.resize((s, s), Image.BICUBIC), dtype=np.float64)[..., None] / 255  # (S, S, 1)
            img = c0 + (c1 - c0) * low                                    # (S, S, 3) "texture"
        return np.clip(img + rng.normal(0, 0.03, (s, s, 3)), 0, 1)

    def draw_object(self, img: np.ndarray, rng) -> tuple[np.ndarray, int, np.ndarray]:
        """Paint one random shape onto img: (new img (S, S, 3), label 1..K, its hard mask (S, S) bool)."""
        s, big = self.image_size, self.image_size * SUPERSAMPLE
        label = int(rng.integers(len(SHAPE_CLASSES)))
        outline, hole = shape_outline(SHAPE_CLASSES[label], rng)
        radius = rng.uniform(*self.scale) * s * (1.3 if self.task == "cls" else 1.0)
        centre = (rng.normal(s / 2, s / 16, 2) if self.task == "cls" else rng.uniform(radius, s - radius, 2))
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        aspect = np.array([1.0, rng.uniform(0.8, 1.0)])                    # nuisance: mild squash
        layer = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(layer)
        for poly, fill in ((outline, 255), (hole, 0)):
            if poly is not None:
                pts = (poly * aspect) @ rot.T * radius * SUPERSAMPLE + centre * SUPERSAMPLE   # (k, 2) px
                draw.polygon([tuple(p) for p in pts], fill=fill)
        alpha = np.asarray(layer.resize((s, s), Image.BOX), dtype=np.float64)[..., None] / 255   # (S, S, 1)
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:                                            # texture: stripes across the object
            stripes = 0.5 + 0.5 * np.sin(np.arange(s) * rng.uniform(0.5, 1.5))[:, None, None]   # (S, 1, 1)
            colour = colour * (0.7 + 0.3 * stripes)                       # (S, 1, 3)
        return img * (1 - alpha) + colour * alpha, label + 1, alpha[..., 0] >= 0.5

    def scene(self, index: int) -> dict:
        """Render scene `index`: image (H, W, 3) uint8 and all targets (see the class docstring)."""
        rng = np.random.default_rng([self.seed, self.split, index])
        s = self.image_size
        img = self.background(rng)
        n = 1 if self.task == "cls" else int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        labels, masks, drawn = [], [], []
        for _ in range(n):                                                # z-order: later objects on top
            img, label, hard = self.draw_object(img, rng)
            masks = [m & ~hard for m in masks]                            # occlusion removes hidden pixels
            labels.append(label)
            masks.append(hard)
            drawn.append(hard.sum())
        keep = [i for i, m in enumerate(masks) if m.sum() >= MIN_VISIBLE * max(drawn[i], 1) and m.any()]
        semantic = np.zeros((s, s), dtype=np.uint8)
        for i, m in enumerate(masks):                                     # dropped fragments -> 255 (ignore)
            semantic[m] = labels[i] if i in keep else 255
        masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, s, s), dtype=bool)   # (n, S, S)
        boxes = np.zeros((len(keep), 4), dtype=np.float32)
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)   # xyxy, tight around the visible part
        image = (np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1) * 255).astype(np.uint8)
        return {"image": image, "labels": np.array([labels[i] for i in keep], dtype=np.int64), "boxes": boxes,
                "masks": masks, "semantic": semantic}

    def __getitem__(self, index: int):
        scene = self.scene(index)
        image = Image.fromarray(scene["image"])
        if self.task == "pretrain":
            return image, 0
        if self.task == "cls":
            return image, int(scene["labels"][0]) - 1 if len(scene["labels"]) else 0
        return image, {k: scene[k] for k in ("labels", "boxes", "masks", "semantic")}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Full range of each high-bit-depth PIL mode: one scale per mode, so every image of a dataset gets the same one.
# 16-bit files are mapped 0..65535 -> 0..255 (12-bit data stored in them stays 16x darker, as the file says);
# float images are taken to be in [0, 1].
MODE_RANGE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: high-bit-depth modes scaled by their range, palette/grey/alpha converted.

    Animated files (GIF, WebP) give their first frame (PIL opens on it)."""
    if img.mode in MODE_RANGE:
        arr = np.asarray(img, dtype=np.float64) * (255.0 / MODE_RANGE[img.mode])
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")                                             # RGBA: alpha dropped; L/P/LA expanded


def list_images(root: str) -> list[str]:
    """Every image file under root, recursively, following links safely: each real file once, link loops cut.

    A folder that cannot be read is reported (warning) instead of silently dropped."""
    seen_dirs, seen_files, paths = set(), set(), []

    def unreadable(err):
        warnings.warn(f"skipping folder {err.filename}: {err.strerror}")

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen_dirs:                                             # a link back into the tree: do not recurse
            warnings.warn(f"skipping {folder}: a link to {real}, which is already read (a loop or a duplicate)")
            subfolders[:] = []
            continue
        seen_dirs.add(real)
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.realpath(path) not in seen_files:
                seen_files.add(os.path.realpath(path))
                paths.append(path)
    return paths


class DataError(ConfigError):
    """The data cannot be read (a wrong path, a folder of broken files): main prints the message and exits."""


class ImageFiles(Dataset):
    """Every image under `root` -> (PIL RGB image, label): an ImageFolder tree or any folder of images.

    label = index of the image's class folder (the first folder under root, sorted names, as torchvision's
    ImageFolder), or -1 for an image directly under root. __getitem__ raises on unreadable files; SeededViews
    skips them.
    """

    def __init__(self, root: str, *, what: str = "--data_path"):
        if not root:
            raise DataError(f"{what} is empty: give a folder of images (or leave {what} out for the built-in data)")
        if not os.path.isdir(root):
            raise DataError(f"{what} {root!r} is not a directory (leave it out for the built-in shapes dataset)")
        self.root = root
        self.paths = list_images(root)
        if not self.paths:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        tops = [os.path.relpath(p, root).split(os.sep) for p in self.paths]
        self.classes = sorted({t[0] for t in tops if len(t) > 1})
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[t[0]] if len(t) > 1 else -1 for t in tops]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as img:
            return to_rgb(img), self.labels[index]                        # convert() reads the whole file


IMAGENET_MEAN, IMAGENET_STD = itpn.IMAGENET_MEAN, itpn.IMAGENET_STD     # the student's input normalisation
MAX_BAD_IN_A_ROW = 50    # this many unreadable files in a row means the data path is wrong, not a few bad files


def name_of(dataset: Dataset, index: int) -> str:
    """A readable name of sample `index` for messages: its file path when the dataset has files."""
    return dataset.paths[index] if hasattr(dataset, "paths") else f"#{index}"


class SeededViews(Dataset):
    """dataset[i] -> (x, target, skipped): `transform(image, target)` with its randomness seeded by (seed, epoch, i).

    The seed does not depend on the worker, the rank or a resume. Unreadable images (any exception while decoding)
    are replaced by the next readable one, with a warning, and counted in `skipped`. Set `.epoch` before building
    each epoch's DataLoader (its workers get a fresh copy of this object).
    """

    def __init__(self, dataset: Dataset, transform, *, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def read(self, index: int):
        """(image, target, skipped): the first readable sample at index, index+1, ..."""
        tries = min(len(self.dataset), MAX_BAD_IN_A_ROW)
        for skipped in range(tries):
            j = (index + skipped) % len(self.dataset)
            try:
                return (*self.dataset[j], skipped)
            except Exception as err:                                      # PIL raises OSError, SyntaxError, ...
                warnings.warn(f"skipping unreadable image {name_of(self.dataset, j)}: {type(err).__name__}: {err}")
        verdict = ("no image in the dataset is readable" if tries == len(self.dataset) else
                   "check the data (a few broken files are skipped; this many in a row means a wrong folder)")
        raise DataError(f"{tries} images in a row could not be read (from {name_of(self.dataset, index)}); "
                        f"{verdict}")

    def __getitem__(self, index: int):
        image, target, skipped = self.read(index)
        with torch.random.fork_rng(devices=[]):                          # torchvision draws from torch's CPU RNG
            torch.manual_seed(seed_for(self.seed, self.epoch, index))
            x, target = self.transform(image, target)
        return x, target, skipped


class PretrainViews(SeededViews):
    """MAE / iTPN augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ImageNet mean/std.

    x is (3, H, W). A two-view method (M3I, num_views = 2) gets x = {"imgs": (2, 3, H, W), "geometry": (2, 5)}, the
    keyword arguments of its forward (mim.M3I): two independent crops + flips of the image. View 0, the target view,
    is made exactly as a one-view x; view 1, the input view, is also colour-augmented by `colour` (ColorJitter:
    brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, then RandomGrayscale p 0.2: MoCo v3's strengths, the
    jitter applied to every input view where MoCo v3 applies it with p 0.8, so no input view keeps its colours).
    geometry[k] = (top, left, height, width, flip) of view k: the integer pixel box that was cut, as fractions of
    the source image's height / width, and 1.0 if the crop was then mirrored. It is exact: PIL resizes the box with
    pixel centres at (i + 0.5) * box / side, the convention of mim.view_coords. `.input_size` may change between
    epochs (FastMIM-P).
    """

    def __init__(self, dataset: Dataset, *, input_size: int, num_views: int = 1, seed: int = 0):
        super().__init__(dataset, self.augment, seed=seed)
        self.input_size, self.num_views = input_size, num_views
        self.colour = T.Compose([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
                                 T.RandomGrayscale(p=0.2)])

    def view(self, image: Image.Image, *, colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view (3, H, W) and its geometry (5,); the draws of RandomResizedCrop + RandomHorizontalFlip."""
        top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
        x = T.functional.resized_crop(image, top, left, height, width, [self.input_size, self.input_size],
                                      interpolation=T.InterpolationMode.BICUBIC)
        flip = bool(torch.rand(1) < 0.5)
        x = T.functional.hflip(x) if flip else x
        x = self.colour(x) if colour else x
        x = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(x))      # (3, H, W)
        side_w, side_h = image.size
        return x, torch.tensor([top / side_h, left / side_w, height / side_h, width / side_w, float(flip)])

    def augment(self, image: Image.Image, target):
        if self.num_views == 1:
            return self.view(image, colour=False)[0], target
        (v, v_geometry), (u, u_geometry) = self.view(image, colour=False), self.view(image, colour=True)
        return {"imgs": torch.stack([v, u]), "geometry": torch.stack([v_geometry, u_geometry])}, target   # (2, ...)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_loader(views: SeededViews, *, epoch: int, skip_batches: int, batch_size: int, dist_: Dist,
                 num_workers: int, collate_fn=None) -> DataLoader:
    """This rank's batches of one epoch, starting after `skip_batches` (mid-epoch resume).

    DistributedSampler + set_epoch gives every rank a disjoint 1/world_size of one shuffled order (the same
    order for any world size: rank r reads positions r, r+R, r+2R, ...). Its index list, minus what was already
    consumed, is the sampler of a fresh DataLoader; no image is loaded only to be thrown away.
    """
    sampler = DistributedSampler(views, num_replicas=dist_.world_size, rank=dist_.rank, shuffle=True,
                                 seed=views.seed, drop_last=True)
    sampler.set_epoch(epoch)
    views.epoch = epoch
    order = list(sampler)[skip_batches * batch_size:]
    return DataLoader(views, batch_size=batch_size, sampler=order, num_workers=num_workers,
                      pin_memory=dist_.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      worker_init_fn=ignore_sigint if num_workers else None)


# ---- 4. Model: the --model and --method tables --------------------------------------------------------------------

# --model name -> (family, size preset). The names are the presets' own, the tiny CPU presets get a family prefix.
MODELS: dict[str, tuple[str, object]] = {
    **{("hivit_tiny" if k == "tiny" else k): ("hivit", cfg) for k, cfg in hivit.PRESETS.items()},
    **{k: ("vit", cfg) for k, cfg in hivit.VIT_PRESETS.items()},
    **{("itpn_tiny" if k == "tiny" else k): ("itpn", cfg) for k, cfg in itpn.PRESETS.items()},
    **{("fast_itpn_tiny" if k == "tiny" else k): ("fast_itpn", cfg) for k, cfg in fast_itpn.PRESETS.items()},
}
# --method name -> the file that defines it. itpn.py's and fast_itpn.py's methods build their own model from a size
# preset; mim.py's wrap any encoder with the seam forward_features(x, ids_keep=None)[-1] -> (B, N_vis, C).
METHOD_FILE: dict[str, str] = {**{name: "itpn" for name in itpn.METHODS},
                               **{name: "fast_itpn" for name in fast_itpn.METHODS},
                               **{name: "mim" for name in mim.METHODS}}
DEFAULT_METHOD = {"itpn": "itpn", "hivit": "mae", "vit": "mae", "fast_itpn": "fastmim"}   # iTPN: paper Eq. 4
TEACHER_METHODS = tuple(m for m, file in METHOD_FILE.items() if file != "mim"      # need --teacher PATH
                        and issubclass((itpn if file == "itpn" else fast_itpn).METHODS[m], itpn.PyramidDistillation))


def compatible_methods(family: str) -> list[str]:
    """Methods that run on a model family: every mim.py method, plus the family's own (which need its pyramid)."""
    return [m for m in METHOD_FILE if METHOD_FILE[m] in ("mim", family)]


def unit_size(family: str, preset) -> int:
    """Pixels per unit (the encoder's last-stage patch): 16 for the HiViT family, patch_size for a plain ViT."""
    return preset.patch_size if family == "vit" else 16


def build_encoder(family: str, preset) -> nn.Module:
    """The backbone alone, without a head, for mim.py's methods (they read its stage-3 tokens)."""
    if family == "vit":
        return hivit.VisionTransformer(replace(preset, num_classes=0))
    if family == "fast_itpn":                                             # mim.py reads stage 3 only: no pyramid
        return fast_itpn.FastiTPN(replace(preset, num_classes=0), pyramid=False)
    backbone = itpn.backbone_config(preset) if family == "itpn" else preset   # iTPN's backbone: HiViT or a ViT
    model = hivit.VisionTransformer if isinstance(backbone, hivit.ViTConfig) else hivit.HiViT
    return model(replace(backbone, num_classes=0))


def masked_loss(method: str) -> bool:
    """Whether the method's loss is computed on masked units only: MAE, SimMIM, FastMIM, M3I row d, iTPN's pixel
    and paper recipes (with nothing masked it is exactly 0, or 0 / 0 = NaN). Distillation supervises every unit."""
    if METHOD_FILE[method] == "mim":
        return mim.PRESETS[method].loss_on_masked
    return method not in TEACHER_METHODS


def unit_split(method: str, grid_hw: tuple[int, int], mask_ratio: float | None) -> dict[str, int]:
    """How the method's masking splits one image of Hp x Wp units, counted with its own masking function:
    {"masked": m, "visible": v}, for M3I's mixing {"from image i": .., "from image j": ..}, for a full-input M3I
    row {"units": N}. A method needs at least one unit in every part: no visible unit leaves the encoder nothing to
    read, no masked unit leaves a masked-unit loss at 0 or NaN and a masking recipe without masking.
    mask_ratio: the --mask_ratio flag (None = the method's own)."""
    n = grid_hw[0] * grid_hw[1]
    if METHOD_FILE[method] == "mim":
        cfg = mim.PRESETS[method]                                         # masking as in its forward (mim.py)
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        if cfg.mix_ratio > 0:                                             # M3I Sec. 3.4: units of two images
            mix = mim.random_masking(1, n, cfg.mix_ratio)[2]              # (1, N), 1 = from image j
            return {"from image i": n - int(mix.sum()), "from image j": int(mix.sum())}
        if ratio == 0 and not cfg.loss_on_masked:                         # M3I Tab. 2 rows with the full input
            return {"units": n}
        mask = mim.mask_units(1, grid_hw, mask_ratio=ratio, pattern=cfg.mask_pattern)[2]   # (1, N)
    elif method in TEACHER_METHODS:                                       # BEiT block masking, fixed ratio
        recipe = (itpn if METHOD_FILE[method] == "itpn" else fast_itpn).PRETRAIN_PRESETS[method]
        mask = itpn.distillation_mask(1, grid_hw, mask_ratio=recipe.distill_mask_ratio)   # (1, N)
    else:                                                                 # iTPN's pixel and paper recipes
        ratio = itpn.PRETRAIN_PRESETS[method].mask_ratio if mask_ratio is None else mask_ratio
        mask = mim.random_masking(1, n, ratio)[2]                         # (1, N)
    return {"masked": int(mask.sum()), "visible": n - int(mask.sum())}


def build_pretrainer(model: str, method: str, *, mask_ratio: float | None, norm_pix_loss: bool | None,
                     teacher: str | None, truncate: int = 0) -> nn.Module:
    """The nn.Module train.py drives (PRETRAINER CONTRACT, README "Seams"). None = the method's own default."""
    family, preset = MODELS[model]
    tiny = model.endswith("_tiny")
    if (method in TEACHER_METHODS) != (teacher is not None):
        raise ConfigError(f"--teacher PATH goes with --method {' or '.join(TEACHER_METHODS)}, and only with them")
    if METHOD_FILE[method] != "mim":                                      # itpn.py / fast_itpn.py recipes
        if norm_pix_loss is not None or truncate:
            raise ConfigError(f"--norm_pix_loss and --truncate are fixed by the {method} recipe; they apply to "
                              f"mim.py's methods")
        if mask_ratio is not None and method in TEACHER_METHODS:
            raise ConfigError(f"--mask_ratio is fixed by the {method} recipe (block masking)")
        module = itpn if METHOD_FILE[method] == "itpn" else fast_itpn
        recipe = itpn.tiny_decoder(module.PRETRAIN_PRESETS[method]) if tiny else module.PRETRAIN_PRESETS[method]
        recipe = replace(recipe, mask_ratio=mask_ratio) if mask_ratio is not None else recipe
        extra = {"teacher_path": teacher} if method in TEACHER_METHODS else {}
        return module.METHODS[method](preset, cfg=recipe, **extra)
    encoder = build_encoder(family, mim.truncate_encoder_config(preset, truncate))   # FastMIM Tab. 1c (0 = full)
    hierarchical_mae = method == "mae" and not isinstance(encoder, hivit.VisionTransformer)   # HiViT App. A
    cfg = mim.MAE_HIVIT if hierarchical_mae else mim.PRESETS[method]     # 6-block decoder, or the method's own
    cfg = mim.tiny_decoder(cfg) if tiny else cfg
    cfg = replace(cfg, **{k: v for k, v in (("mask_ratio", mask_ratio), ("norm_pix_loss", norm_pix_loss))
                          if v is not None})
    return mim.METHODS[method](encoder, cfg=cfg)


# ---- 5. Optimizer and schedule ------------------------------------------------------------------------------------

BETAS = (0.9, 0.95)      # iTPN Tab. 7 / MAE: beta2 = 0.95 (not 0.999) for stable large-batch MIM


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's add_weight_decay: decay every matrix, not biases or 1-D tensors (norms, layer scales); frozen EMA
    or teacher parameters (requires_grad=False) are left out of the optimizer altogether."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to lr, then half-cycle cosine to min_lr (iTPN Tab. 7, MAE per-iteration schedule).

    No scheduler object: resuming only needs the step. MAE computes the same curve from a fractional epoch.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def count_steps(num_samples: int, cfg: RunConfig, dist_: Dist) -> int:
    """Optimizer steps per epoch: whole steps of batch_size x accum_iter x world size images (drop_last, as MAE)."""
    return num_samples // dist_.world_size // (cfg.batch_size * cfg.accum_iter)


def cosine_schedule(cfg: RunConfig, *, lr: float, steps_per_epoch: int):
    """step -> lr for a run of cfg.epochs: get_lr with warm-up and length counted in steps."""
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    return lambda step: get_lr(step, lr=lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)


# ---- 6. Run records: checkpoints, the output folder, config.json, the log, pictures ------------------------------

def write_error(path: str, err: OSError, *, kept: str) -> ConfigError:
    """The one message of a failed write: the file, the reason, the fix, and what is still on disk (`kept`)."""
    fix = ("the disk is full: free space or choose another --output_dir" if err.errno == errno.ENOSPC else
           "check that the folder is writable and has space, or choose another --output_dir")
    return ConfigError(f"could not write {path}: {err.strerror or err} ({fix}); {kept}")


def write_file(path: str, data: str | bytes, *, append: bool = False) -> None:
    """Write a run record (config.json, a picture), or append to one (log.txt), all or nothing: a new file goes
    to path + '.tmp' and is renamed into place; an append that fails is cut back to the file's old end, so the log
    keeps whole lines. A failed write (full disk, ...) ends in one ConfigError naming the file and the fix."""
    data = data.encode() if isinstance(data, str) else data
    target = path if append else path + ".tmp"
    end = os.path.getsize(path) if append and os.path.exists(path) else 0
    try:
        with open(target, "ab" if append else "wb") as f:
            f.write(data)
    except OSError as err:
        try:
            os.truncate(path, end) if append and os.path.exists(path) else os.remove(target)
        except OSError:
            pass                                                          # nothing was created, or it stays as is
        raise write_error(path, err, kept="the files already written, checkpoints included, are untouched") from err
    if not append:
        os.replace(target, path)


def save_checkpoint(path: str, state: dict) -> None:
    """Write to path + '.tmp', fsync it, then rename: a crash mid-write leaves the previous checkpoint intact.

    os.replace is atomic on POSIX and Windows: a reader sees either the old file or the complete new one. The
    fsync before it puts the bytes on disk first, so after a power loss the name cannot point at a file whose
    data never left the page cache; the fsync of the folder after it makes the rename itself durable (POSIX).
    A failed write (full disk, ...) removes its .tmp file and ends in one ConfigError; the previous file stays.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()                                                     # Python's buffer -> the OS
            os.fsync(f.fileno())                                          # the OS's cache -> the disk
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(path, err, kept="the previous checkpoint, if any, is untouched") from err
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):                                        # POSIX; Windows cannot open a folder
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def find_checkpoint(output_dir: str) -> str | None:
    """--resume auto: checkpoint-last.pth, else the numbered checkpoint of the highest epoch, else None."""
    last = os.path.join(output_dir, "checkpoint-last.pth")
    if os.path.isfile(last):
        return last
    numbered = glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))
    numbered = [p for p in numbered if os.path.basename(p)[11:-4].isdigit()]
    return max(numbered, key=lambda p: int(os.path.basename(p)[11:-4]), default=None)


def load_checkpoint(path: str, *, what: str = "--resume", required: tuple[str, ...] = ()) -> dict:
    """hivit.read_checkpoint, the one reader of checkpoint-like files (torch.load(weights_only=True), no pickled
    code is run, one message per kind of bad file), raising ConfigError; then the keys a script's checkpoint holds.

    `what` names the flag in messages; `required` lists keys the file must hold (a resume needs train.py's)."""
    try:
        ckpt = hivit.read_checkpoint(path, what=what)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ConfigError(f"{what} {path!r} is not a checkpoint written by this project's scripts (no "
                          f"{', '.join(repr(k) for k in missing)}); to start from weights, see finetune.py "
                          f"--finetune")
    return ckpt


def prepare_output_dir(cfg: RunConfig, *, resuming: bool) -> None:
    """Refuse an --output_dir that cannot be written, and a fresh run over an earlier one (nothing is destroyed
    unless --overwrite says so). Called before any model is built."""
    out = os.path.abspath(cfg.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} is a file: choose a folder")
    parent = out
    while not os.path.exists(parent):                                     # the first part that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} lies under the file {parent!r}: choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {cfg.output_dir!r}: {parent!r} is not writable: choose another folder")
    earlier = find_checkpoint(cfg.output_dir) if os.path.isdir(out) else None
    if earlier and not resuming and not cfg.overwrite:
        raise ConfigError(f"--output_dir {cfg.output_dir!r} holds a run ({os.path.basename(earlier)}): continue it "
                          f"with --resume auto, start over with --overwrite, or choose another --output_dir")


PICTURE_NAME = re.compile(r"^[a-z]+-epoch\d{3,}\.png$")   # reconstruction-epoch009.png, seg-epoch1599.png, ...


def clear_run(output_dir: str) -> None:
    """--overwrite: remove an earlier run's own files, nothing else (rank 0, after every check passed): its
    checkpoints, log.txt, config.json and the pictures the scripts write (<kind>-epochNNN.png)."""
    for pattern in ("checkpoint-*.pth", "checkpoint-*.pth.tmp", "log.txt", "config.json", "*.png"):
        for path in glob.glob(os.path.join(output_dir, pattern)):
            if not path.endswith(".png") or PICTURE_NAME.match(os.path.basename(path)):
                os.remove(path)


def run_record(source_dir: str) -> dict:
    """Where the code came from: the git commit (and whether the tree was dirty), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source_dir, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None}
    return {"git_commit": head.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip())}


def write_run_config(output_dir: str, run_config: dict, script: str) -> dict:
    """config.json (settings, sizes, device, code version); without git, a copy of the script (as airbench).
    Returns run_config with the code version added."""
    run_config = {**run_config, "torch": torch.__version__, **run_record(os.path.dirname(os.path.abspath(script)))}
    os.makedirs(output_dir, exist_ok=True)
    for tmp in glob.glob(os.path.join(output_dir, "*.tmp")):              # an interrupted checkpoint write
        os.remove(tmp)
    write_file(os.path.join(output_dir, "config.json"), json.dumps(run_config, indent=2, default=str))
    if run_config["git_commit"] is None:
        with open(os.path.abspath(script), "rb") as f:
            write_file(os.path.join(output_dir, os.path.basename(script) + ".source"), f.read())
    return run_config


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)     # (1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)       # (1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def save_image(path: str, image: Image.Image) -> None:
    """A picture of the run, written through write_file (all or nothing; a full disk is one message)."""
    encoded = io.BytesIO()
    image.save(encoded, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))
    write_file(path, encoded.getvalue())


def titled_grid(path: str, panels: dict[str, torch.Tensor]) -> None:
    """Save panels (name -> (B, 3, H, W) in [0, 1]) as a grid, one row per image, with a title line per column."""
    grid = make_grid(torch.stack(list(panels.values()), 1).flatten(0, 1).cpu(),   # (B * P, 3, H, W)
                     nrow=len(panels), padding=2, pad_value=1.0)         # (3, rows, cols)
    body = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))   # (rows, cols, 3)
    header = 12 * len(panels)                                             # one text line per panel title
    canvas = Image.new("RGB", (body.width, body.height + header), "white")
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(panels):
        draw.text((2, 12 * i), f"column {i + 1}: {name}", fill="black")
    save_image(path, canvas)


@torch.no_grad()
def save_pictures(path: str, pretrainer: nn.Module, imgs, *, seed: int, norm_pix_loss: bool) -> None:
    """MAE Fig. 2 panels per image: original | masked | prediction | prediction + visible, plus the method's own
    panels (e.g. HOG target / HOG prediction). Fixed images and a fixed mask seed, so epochs compare.
    imgs: a batch as PretrainTask.loss takes it, (B, 3, H, W) or the two-view dict (the panels show view 0)."""
    was_training = pretrainer.training
    pretrainer.eval()
    torch.manual_seed(seed)                                               # the next step reseeds: nothing leaks
    out = pretrainer(**imgs) if isinstance(imgs, dict) else pretrainer(imgs)   # two views: keyword arguments
    pretrainer.train(was_training)
    views = imgs["imgs"] if isinstance(imgs, dict) else imgs
    first = views[:, 0] if views.ndim == 5 else views                     # (B, 3, H, W): the (target) view
    size = first.shape[-2:]
    original = denormalize(first.float())
    unit = round(math.sqrt(size[0] * size[1] / out["mask"].shape[1]))   # units are square: N x unit^2 = H x W
    m = mim.mask_to_map(out["mask"].to(original.dtype), (size[0] // unit, size[1] // unit), unit)   # (B, H, W)
    m = m.unsqueeze(1)                                                    # (B, 1, H, W), 1 = masked
    panels = {"original": original, "masked": hivit.mask_blend(original, m, torch.tensor(0.5))}   # masked: grey
    if "recon" in out:
        pred = denormalize(out["recon"].float())
        panels["prediction" + (" (unit mean/std of original)" if norm_pix_loss else "")] = pred
        panels["prediction + visible"] = hivit.mask_blend(original, m, pred)
    for name, pic in out.get("pictures", {}).items():                    # already in [0, 1], maybe another size
        panels[name] = nn.functional.interpolate(pic.float(), size=size, mode="nearest").clamp(0, 1)
    titled_grid(path, panels)


# ---- 7. The loop: Trainer (shared by the three scripts) and the pre-training task --------------------------------

def resume_keys(cfg: RunConfig) -> list[str]:
    """The RESUME_KEYS of cfg's class and of every settings class above it, in that order, each once."""
    keys = [k for klass in reversed(type(cfg).__mro__) for k in vars(klass).get("RESUME_KEYS", ())]
    return list(dict.fromkeys(keys))


def as_flag(name: str, value) -> str:
    """A setting as the user types it: --seed 0, --norm_pix_loss / --no-norm_pix_loss, --mask_ratio unset."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {'unset' if value is None else value}"


def check_resumable(ckpt: dict, path: str, cfg: RunConfig, *, world_size: int, steps_per_epoch: int,
                    num_samples: int) -> None:
    """A resumed run must be the same run: the same RESUME_KEYS settings (what is trained), the same effective
    batch (batch_size x accum_iter x world size) and the same dataset size, because the lr schedule, the step ->
    epoch mapping and the images a mid-epoch resume skips are all counted in them. Another split of the same
    effective batch (2x the GPUs, half the --accum_iter) is allowed (masks then differ). A setting the checkpoint
    does not record (a file from before the setting existed) was at its default when the file was written."""
    default = {f.name: f.default for f in fields(cfg)}
    was = {k: ckpt["args"].get(k, default[k]) for k in resume_keys(cfg)}
    now = {k: getattr(cfg, k) for k in resume_keys(cfg)}
    differ = [k for k in was if was[k] != now[k]]
    if differ:
        raise ConfigError(f"{path} was written by {' '.join(as_flag(k, was[k]) for k in differ)}; this run has "
                          f"{' '.join(as_flag(k, now[k]) for k in differ)}: resume with the settings it was written "
                          f"with (its config.json lists them), or start a fresh run in another --output_dir")
    was = {"batch_size": ckpt["args"]["batch_size"], "accum_iter": ckpt["args"]["accum_iter"],
           "world size": ckpt["world_size"]}
    now = {"batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter, "world size": world_size}
    if math.prod(was.values()) != math.prod(now.values()):
        differ = ", ".join(f"{'' if k == 'world size' else '--'}{k} {was[k]} -> {now[k]}" for k in was
                           if was[k] != now[k])
        raise ConfigError(f"{path} was written with an effective batch of {math.prod(was.values())} = --batch_size "
                          f"{was['batch_size']} x --accum_iter {was['accum_iter']} x {was['world size']} process(es); "
                          f"this run has {math.prod(now.values())} ({differ}). The lr schedule, the step -> epoch "
                          f"mapping and the images already seen depend on it: resume with --batch_size "
                          f"{was['batch_size']} --accum_iter {was['accum_iter']} on {was['world size']} process(es) "
                          f"(or any split with the same product), or start a fresh run in another --output_dir")
    if ckpt.get("num_samples", num_samples) != num_samples:           # a file without it: steps per epoch below
        raise ConfigError(f"{path} was written on a dataset of {ckpt['num_samples']} images, this run has "
                          f"{num_samples}: the dataset changed size (--num_images, or files added to or removed from "
                          f"--data_path). Resume on the same data, or start a fresh run in another --output_dir")
    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(f"{path} was written with {ckpt['steps_per_epoch']} steps per epoch, this run has "
                          f"{steps_per_epoch}: the dataset changed size (--num_images, or files added to or removed "
                          f"from --data_path). Resume on the same data, or start a fresh run in another --output_dir")


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """The loop every script runs: optimizer steps, accumulation, AMP, clipping, DDP, checkpoints, log, resume.

    A script hands over a *task*, an object with:
        model                              the nn.Module to train (moved to the device; DDP-wrapped under torchrun)
        num_samples                        images per epoch (all ranks together)
        batches(epoch, skip) -> iterator   this rank's micro-batches (inputs, targets, skipped (B,)) of the epoch,
                                           after `skip` micro-batches (mid-epoch resume)
        loss(model, inputs, targets) -> {"loss": scalar, "logs": {name: scalar}} for one micro-batch
        after_step(progress)               after every optimizer step (momentum teachers, weight EMA)
        end_of_epoch(epoch, finished, last) -> dict   evaluation and pictures, added to the epoch's record
        state() -> dict, load_state(ckpt)  what the task adds to a checkpoint (EMA weights, ...)
    and the Trainer does the rest. The learning rate is `lr_at(step)`, a pure function, times each optimizer
    group's "lr_scale" (layer-wise decay); `best` names a record key whose maximum is kept as checkpoint-best.pth.
    """

    def __init__(self, task, *, cfg: RunConfig, dist_: Dist, optimizer: torch.optim.Optimizer, lr_at,
                 run_config: dict, best: str | None = None):
        self.task, self.cfg, self.dist, self.optimizer, self.lr_at = task, cfg, dist_, optimizer, lr_at
        self.run_config, self.best_key, self.best = run_config, best, -math.inf
        self.steps_per_epoch = count_steps(task.num_samples, cfg, dist_)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.stop_step = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        self.images_per_step = cfg.batch_size * cfg.accum_iter * dist_.world_size
        self.amp = ("bf16" if dist_.device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
        self.scaler = torch.amp.GradScaler(dist_.device.type, enabled=self.amp == "fp16")   # only fp16 scales
        self.raw = task.model
        self.model = (DDP(self.raw, device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None)
                      if dist_.ddp else self.raw)
        self.step, self.last_good, self.stop_requested = 0, None, False

    # -- checkpoints --

    def state(self) -> dict:
        """Everything the next step depends on, as plain types (weights_only=True loads it)."""
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.step // self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "num_samples": self.task.num_samples,
                "world_size": self.dist.world_size, "best": self.best,
                "args": asdict(self.cfg), "config": self.run_config.get("config"), **self.task.state()}

    def resume(self, ckpt: dict, path: str) -> None:
        """Restore a checkpoint after checking that it belongs to this run (settings, batch, dataset size) and that
        its weights fit the model, key for key and shape for shape (one message, not load_state_dict's traceback)."""
        check_resumable(ckpt, path, self.cfg, world_size=self.dist.world_size, steps_per_epoch=self.steps_per_epoch,
                        num_samples=self.task.num_samples)
        self.load_weights(ckpt, path, hint="resume with the settings it was written with, which its config.json "
                                           "lists, or start a fresh run in another --output_dir")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as err:                                         # e.g. another set of trained tensors
            raise ConfigError(f"{path}: its optimizer state does not fit this run's trained parameters ({err}); it "
                              f"was written with other settings or by another version: start a fresh run from its "
                              f"weights with --finetune, or in another --output_dir") from None
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best, self.last_good = ckpt["step"], ckpt.get("best", -math.inf), path
        print0(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch})")

    def load_weights(self, ckpt: dict, path: str, *, hint: str) -> None:
        """The model (and the task's own state, e.g. EMA weights) of a checkpoint, after checking key for key and
        shape for shape that it fits (one message naming the difference, not load_state_dict's traceback).
        --eval uses it alone: evaluation trains nothing, so batch split, seed or world size may differ."""
        try:
            hivit.check_state_dict(ckpt["model"], {k: v.shape for k, v in self.raw.state_dict().items()},
                                   what=f"{path} does not fit this run's model", hint=hint)
        except (KeyError, ValueError) as err:
            raise ConfigError(err.args[0]) from None
        self.raw.load_state_dict(ckpt["model"])
        self.task.load_state(ckpt)

    def save(self, epoch: int, record: dict) -> None:
        """Rank 0: checkpoint-last, the numbered checkpoint every save_every epochs and at the end, the best one."""
        state = self.state()
        finished = self.step == (epoch + 1) * self.steps_per_epoch
        self.last_good = os.path.join(self.cfg.output_dir, "checkpoint-last.pth")
        save_checkpoint(self.last_good, state)
        if finished and ((epoch + 1) % self.cfg.save_every == 0 or epoch + 1 == self.cfg.epochs):
            save_checkpoint(os.path.join(self.cfg.output_dir, f"checkpoint-{epoch}.pth"), state)   # MAE's name
        if self.best_key in record and record[self.best_key] >= self.best:
            save_checkpoint(os.path.join(self.cfg.output_dir, "checkpoint-best.pth"), state)

    # -- one optimizer step --

    def set_lr(self) -> float:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)                 # layer-wise lr decay (finetune.py)
        return lr

    def micro_steps(self, batches) -> tuple[dict, int]:
        """accum_iter forward/backward passes; returns the step's mean metrics and the images skipped."""
        metrics, skipped, accum = {}, 0, self.cfg.accum_iter
        for micro in range(accum):
            inputs, targets, bad = next(batches)
            skipped += int(bad.sum())
            # masks, drop path, mixing: a function of (seed, step, shard), so resumes and world sizes agree
            torch.manual_seed(seed_for(self.cfg.seed, self.step, micro * self.dist.world_size + self.dist.rank))
            final = micro == accum - 1                                    # DDP all-reduces on the final micro-step
            with self.model.no_sync() if self.dist.ddp and not final else nullcontext():
                with torch.autocast(self.dist.device.type, dtype=AMP_DTYPES[self.amp], enabled=self.amp != "none"):
                    out = self.task.loss(self.model, inputs, targets)
                self.scaler.scale(out["loss"] / accum).backward()
            for k, v in {"loss": out["loss"], **out.get("logs", {})}.items():
                metrics[k] = metrics.get(k, 0.0) + torch.as_tensor(v).detach().float() / accum
        return metrics, skipped

    def reduce(self, metrics: dict, grad_norm: torch.Tensor) -> dict:
        """Average the step's metrics over ranks (and agree on a stop request): one all-reduce."""
        names = sorted(metrics)
        values = torch.stack([metrics[k].to(self.dist.device) for k in names]
                             + [grad_norm.float(), torch.tensor(float(self.stop_requested), device=self.dist.device)])
        if self.dist.ddp:
            dist.all_reduce(values)                                       # SUM: gloo has no AVG
            values /= self.dist.world_size
        *values, stop = values.tolist()
        self.stop_requested = stop > 0                                    # any rank asked: every rank stops
        return dict(zip(names + ["grad_norm"], values))

    def train_step(self, batches) -> tuple[dict, int]:
        lr = self.set_lr()
        metrics, skipped = self.micro_steps(batches)
        self.scaler.unscale_(self.optimizer)                              # true gradients for the norm / clip
        grad_norm = nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.clip_grad or math.inf)
        metrics = self.reduce(metrics, grad_norm)
        if not math.isfinite(metrics["loss"]):                            # every rank sees the same reduced value
            raise SystemExit(
                f"non-finite loss ({metrics['loss']}) at step {self.step} (epoch {self.step // self.steps_per_epoch});"
                f" stopped before the update. Last good checkpoint: {self.last_good or 'none yet'}. Resume it with "
                f"--resume {self.last_good or 'PATH'} and a lower --blr, --clip_grad 1.0 or --amp none."
                if self.dist.master else 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_step(progress=self.step / max(1, self.total_steps - 1))
        self.step += 1
        return {**metrics, "lr": lr}, skipped

    # -- one epoch, the whole run --

    def run_epoch(self, epoch: int) -> dict:
        """Train until the epoch ends (or the run stops); returns the epoch's record (means of the step metrics)."""
        start, end = epoch * self.steps_per_epoch, min((epoch + 1) * self.steps_per_epoch, self.stop_step)
        batches = iter(self.task.batches(epoch, (self.step - start) * self.cfg.accum_iter))
        bar = tqdm(total=end - start, initial=self.step - start, desc=f"epoch {epoch}", dynamic_ncols=True,
                   disable=not self.dist.master or os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
        sums, skipped, n_steps, t_epoch = {}, 0, 0, time.perf_counter()
        while self.step < end and not self.stop_requested:
            t0 = time.perf_counter()
            metrics, bad = self.train_step(batches)
            skipped, n_steps = skipped + bad, n_steps + 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            img_s=f"{self.images_per_step / (time.perf_counter() - t0):.1f}")
        bar.close()
        skipped_all = torch.tensor(skipped, device=self.dist.device)      # NCCL reduces CUDA tensors only
        if self.dist.ddp:
            dist.all_reduce(skipped_all)
        record = {"epoch": epoch, "step": self.step, **{f"train_{k}": v / max(1, n_steps) for k, v in sums.items()},
                  "skipped_images": int(skipped_all),
                  "images_per_sec": n_steps * self.images_per_step / (time.perf_counter() - t_epoch)}
        if self.dist.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**20
        return record

    def request_stop(self, signum, frame) -> None:
        """SIGINT / SIGTERM: finish the current step, save, stop. A second Ctrl-C stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print0(f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl-C again: stop now)")

    def launch(self, *, script: str, argv: list[str], resuming: bool) -> list[dict]:
        """A script's run once every check has passed: rank 0 clears an earlier run (--overwrite, fresh runs only)
        and writes config.json, then fit() with the command that continues this run (resume_command)."""
        if self.dist.master:
            if not resuming and self.cfg.overwrite:
                clear_run(self.cfg.output_dir)
            self.run_config = write_run_config(self.cfg.output_dir, self.run_config, script)
        return self.fit(resume_command=resume_command(os.path.basename(script), argv, self.dist))

    def fit(self, resume_command: str) -> list[dict]:
        """Run every remaining epoch; rank 0 writes checkpoints and log.txt. Returns the epochs' records.

        resume_command: the command that starts this run again (train.resume_command); a stop by Ctrl-C or SIGTERM
        prints it with --resume auto added."""
        self.optimizer.zero_grad(set_to_none=True)
        print0(f"{self.steps_per_epoch} steps/epoch x {self.cfg.epochs} epochs, {self.images_per_step} images/step, "
               f"{sum(p.numel() for p in self.raw.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters")
        if self.step >= self.stop_step:
            print0(f"nothing to do: the checkpoint is at step {self.step} and the run stops at step {self.stop_step}")
        handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            records = []
            for epoch in range(self.step // self.steps_per_epoch, self.cfg.epochs):
                if self.step >= self.stop_step or self.stop_requested:
                    break
                record = self.run_epoch(epoch)
                finished = self.step == (epoch + 1) * self.steps_per_epoch
                record.update(self.task.end_of_epoch(epoch, finished=finished, last=self.step >= self.stop_step))
                self.best = max(self.best, record.get(self.best_key, -math.inf)) if self.best_key else self.best
                records.append(record)
                if self.dist.master:
                    self.save(epoch, record)
                    write_file(os.path.join(self.cfg.output_dir, "log.txt"), json.dumps(record) + "\n", append=True)
                    print0(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in record.items()}))
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.stop_requested:
            raise SystemExit(f"stopped at step {self.step}; saved {self.last_good}. Continue with:\n"
                             f"  {resume_command} --resume auto" if self.dist.master else 130)
        return records


class PretrainTask:
    """The task Trainer drives for pre-training: a pre-trainer (PRETRAINER CONTRACT) on seeded augmented views."""

    def __init__(self, pretrainer: nn.Module, views: PretrainViews, *, cfg: PretrainConfig, dist_: Dist,
                 input_size_at, norm_pix_loss: bool):
        self.model, self.views, self.cfg, self.dist = pretrainer.to(dist_.device), views, cfg, dist_
        self.num_samples, self.input_size_at, self.norm_pix_loss = len(views), input_size_at, norm_pix_loss
        self.pictures = PretrainViews(views.dataset, input_size=views.input_size, num_views=views.num_views,
                                      seed=cfg.seed)                      # fixed images (epoch 0 crops)

    def batches(self, epoch: int, skip: int):
        self.views.input_size = self.input_size_at(epoch / self.cfg.epochs)   # FastMIM-P: grows with progress
        return epoch_loader(self.views, epoch=epoch, skip_batches=skip, batch_size=self.cfg.batch_size,
                            dist_=self.dist, num_workers=self.cfg.num_workers)

    def on_device(self, inputs):
        """A batch on this rank's device: imgs (B, 3, H, W), or PretrainViews' two-view dict of tensors."""
        if isinstance(inputs, dict):                                      # imgs (B, 2, 3, H, W), geometry (B, 2, 5)
            return {k: v.to(self.dist.device, non_blocking=True) for k, v in inputs.items()}
        return inputs.to(self.dist.device, non_blocking=True)

    def loss(self, model: nn.Module, inputs, targets) -> dict:
        inputs = self.on_device(inputs)
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)   # two views: keyword arguments

    def after_step(self, progress: float) -> None:
        if hasattr(self.model, "ema_update"):                             # momentum teacher follows the student
            self.model.ema_update(progress=progress)                       # M3I ramps m to 1; iTPN keeps it fixed

    def end_of_epoch(self, epoch: int, *, finished: bool, last: bool) -> dict:
        if self.dist.master and ((finished and (epoch + 1) % self.cfg.vis_every == 0) or last):
            self.pictures.input_size = self.views.input_size
            batch = torch.utils.data.default_collate([self.pictures[i][0] for i in range(min(4, len(self.pictures)))])
            save_pictures(os.path.join(self.cfg.output_dir, f"reconstruction-epoch{epoch:03d}.png"), self.model,
                          self.on_device(batch), seed=self.cfg.seed, norm_pix_loss=self.norm_pix_loss)
        return {"input_size": self.views.input_size}

    def state(self) -> dict:
        return {}

    def load_state(self, ckpt: dict) -> None:
        pass


# ---- 8. main ------------------------------------------------------------------------------------------------------

def input_schedule(method: str, input_size: int | None, unit: int):
    """progress -> crop side. mim.py methods carry their own side(s) (FastMIM 128, FastMIM-P 128/160/192);
    an explicit --input_size rescales them so the last side equals it, in whole units."""
    if METHOD_FILE[method] != "mim":
        side = input_size or PAPER_INPUT_SIZE
        return lambda progress: side
    cfg = mim.PRESETS[method]
    last = cfg.img_sizes[-1][1]
    scale = 1.0 if input_size is None else input_size / last
    return lambda progress: max(unit, round(mim.img_size_at(cfg, progress) * scale / unit) * unit)


MAX_SIDE = 4096          # px: the largest --input_size the minimum-size search tries


def training_sides(method: str, input_size: int | None, unit: int) -> list[int]:
    """Every crop side a run trains at: one, or FastMIM-P's schedule (rescaled by --input_size, input_schedule)."""
    starts = [start for start, _ in mim.PRESETS[method].img_sizes] if METHOD_FILE[method] == "mim" else [0.0]
    at = input_schedule(method, input_size, unit)
    return sorted({at(start) for start in starts})


def check_pretrain_flags(cfg: PretrainConfig, parser: argparse.ArgumentParser) -> None:
    """Flag combinations argparse cannot check, refused before any work: the method must fit the model, the size
    its unit, the mask ratio its loss, and every training size must leave a masked and a visible unit."""
    family, preset = MODELS[cfg.model]
    if cfg.method not in compatible_methods(family):
        parser.error(f"--method {cfg.method} does not run on --model {cfg.model}; valid methods for {family} "
                     f"models: {', '.join(compatible_methods(family))}")
    unit = unit_size(family, preset)
    if cfg.input_size is not None and cfg.input_size % unit:
        parser.error(f"--input_size {cfg.input_size} is not a multiple of {cfg.model}'s {unit}-px unit; "
                     f"try {max(unit, cfg.input_size // unit * unit)} or {(cfg.input_size // unit + 1) * unit}")
    mim_cfg = mim.PRESETS.get(cfg.method) if METHOD_FILE[cfg.method] == "mim" else None
    if cfg.mask_ratio == 0 and masked_loss(cfg.method):
        parser.error(f"--mask_ratio 0 masks no unit, but {cfg.method}'s loss is computed on masked units only "
                     f"(it would be 0, or NaN): use a ratio in (0, 1), e.g. the method's default")
    if cfg.mask_ratio is not None and mim_cfg is not None and mim_cfg.mix_ratio > 0:
        parser.error(f"--mask_ratio does not apply to --method {cfg.method}: it mixes the units of two images "
                     f"(mix_ratio {mim_cfg.mix_ratio}) instead of masking them")
    if mim_cfg is not None and cfg.truncate >= preset.depth:
        parser.error(f"--truncate {cfg.truncate} removes every attention block of {cfg.model} (depth "
                     f"{preset.depth}): use 0..{preset.depth - 1}")

    def problem(input_size):                                              # the first side that leaves a part empty
        for side in training_sides(cfg.method, input_size, unit):
            parts = unit_split(cfg.method, (side // unit, side // unit), cfg.mask_ratio)
            if min(parts.values()) < 1:
                return side, parts
        return None

    found = problem(cfg.input_size)
    if found is not None:
        side, parts = found
        sides = training_sides(cfg.method, cfg.input_size, unit)
        trains = f"trains at {'/'.join(map(str, sides))} px (its schedule, rescaled)" if len(sides) > 1 else \
            f"trains at {side} px"
        fits = next((s for s in range(unit, MAX_SIDE + 1, unit) if problem(s) is None), None)
        fix = f"use --input_size {fits} or more" if fits else f"no --input_size up to {MAX_SIDE} works"
        fixed = cfg.method in TEACHER_METHODS or (mim_cfg is not None and mim_cfg.mix_ratio > 0)   # no ratio flag
        ratio = "" if fixed else " (or another --mask_ratio)"
        split = ", ".join(f"{v} {k}" for k, v in parts.items())
        given = f"--input_size {cfg.input_size}" if cfg.input_size else "the method's input size"
        parser.error(f"{given}: --method {cfg.method} on --model {cfg.model} {trains}; "
                     f"a {side}-px image has {(side // unit) ** 2} unit(s) of {unit} px, which its masking splits "
                     f"into {split}, and it needs at least one of each: {fix}{ratio}")


DESCRIPTION = ("Masked image pre-training (iTPN, MAE, SimMIM, FastMIM, M3I). Flags left unset take the 'paper' "
               "recipe, or the 'demo' recipe for the *_tiny models.")
EPILOG = (f"models: {', '.join(MODELS)}\nmethods: {', '.join(METHOD_FILE)}\n\n" + __doc__[__doc__.index("Run:"):])


def get_parser() -> argparse.ArgumentParser:
    return build_parser(PretrainConfig, description=DESCRIPTION, defaults=DEFAULTS, epilog=EPILOG)


def pretrain_folder(path: str) -> str:
    """MAE reads <path>/train when it exists (ImageFolder layout); any other folder is read as it is."""
    return os.path.join(path, "train") if path and os.path.isdir(os.path.join(path, "train")) else path


def prepare(cfg: PretrainConfig, dist_: Dist):
    """Everything a run needs before its first step: (task, trainer, resume path); raises ConfigError on bad input."""
    family, preset = MODELS[cfg.model]
    resume = find_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume or None
    if cfg.resume == "auto" and resume is None:
        print0(f"--resume auto: no checkpoint in {cfg.output_dir}, starting a fresh run")
    prepare_output_dir(cfg, resuming=resume is not None)
    ckpt = load_checkpoint(resume, required=("model", "optimizer", "step", "args")) if resume else None
    torch.manual_seed(cfg.seed)                                           # same init on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    pretrainer = build_pretrainer(cfg.model, cfg.method, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                                  teacher=cfg.teacher, truncate=cfg.truncate)
    source = (ImageFiles(pretrain_folder(cfg.data_path)) if cfg.data_path is not None
              else ShapesDataset(cfg.num_images, image_size=cfg.input_size or PAPER_INPUT_SIZE, seed=cfg.seed))
    input_size_at = input_schedule(cfg.method, cfg.input_size, unit_size(family, preset))
    views = PretrainViews(source, input_size=input_size_at(0.0), num_views=getattr(pretrainer, "num_views", 1),
                          seed=cfg.seed)
    views.read(0)                                                         # fail now if no image is readable
    if len(views) < cfg.batch_size * cfg.accum_iter * dist_.world_size:
        raise ConfigError(f"{len(views)} images do not fill one step of {dist_.world_size} x {cfg.batch_size} x "
                          f"{cfg.accum_iter} images: lower --batch_size / --accum_iter or add images")
    method_cfg = getattr(pretrainer, "cfg", None)                         # the method's config after its overrides
    task = PretrainTask(pretrainer, views, cfg=cfg, dist_=dist_, input_size_at=input_size_at,
                        norm_pix_loss=bool(getattr(method_cfg, "norm_pix_loss", True)))
    eff_batch = cfg.batch_size * cfg.accum_iter * dist_.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256     # MAE's linear scaling rule
    run_config = {"args": asdict(cfg), "world_size": dist_.world_size, "effective_batch_size": eff_batch, "lr": lr,
                  "device": str(dist_.device),
                  "config": {"model": asdict(preset), "method": asdict(method_cfg) if is_dataclass(method_cfg)
                             else None}}
    optimizer = torch.optim.AdamW(param_groups(task.model, cfg.weight_decay), lr=lr, betas=BETAS)
    trainer = Trainer(task, cfg=cfg, dist_=dist_, optimizer=optimizer, run_config=run_config,
                      lr_at=cosine_schedule(cfg, lr=lr, steps_per_epoch=count_steps(len(views), cfg, dist_)))
    if ckpt is not None:
        trainer.resume(ckpt, resume)
    return task, trainer, resume


def one_line(err: Exception) -> str:
    """The user's message of an error, also when a DataLoader worker raised it (the main process re-raises it
    with the worker's traceback text prepended)."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


@contextmanager
def script_errors():
    """The frame of every script's main(): bad input (a ConfigError) ends in one "error: ..." line, never a
    traceback, and the process group is torn down however the run ends."""
    try:
        yield
    except ConfigError as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    finally:
        teardown_distributed()


def main(argv=None) -> list[dict]:
    cfg, parser = parse_config(PretrainConfig, argv, description=DESCRIPTION, defaults=DEFAULTS, epilog=EPILOG,
                               recipe=lambda c: "demo" if c.model.endswith("_tiny") else "paper")
    if cfg.model not in MODELS:
        parser.error(f"argument --model: invalid choice: {cfg.model!r} (choose from {', '.join(MODELS)})")
    cfg.method = cfg.method or DEFAULT_METHOD[MODELS[cfg.model][0]]
    if cfg.method not in METHOD_FILE:
        parser.error(f"argument --method: invalid choice: {cfg.method!r} (choose from {', '.join(METHOD_FILE)})")
    check_pretrain_flags(cfg, parser)
    with script_errors():
        dist_ = setup_distributed(cfg)
        try:
            task, trainer, resume = prepare(cfg, dist_)
        except (ValueError, KeyError, FileNotFoundError) as err:         # the model files' checks, by type
            raise ConfigError(err.args[0] if err.args else str(err)) from None
        print0(f"{cfg.model} + {cfg.method} on {dist_.device} x {dist_.world_size}, data: "
               f"{cfg.data_path or 'built-in shapes'} ({task.num_samples} images), output: {cfg.output_dir}")
        return trainer.launch(script=__file__, argv=sys.argv[1:] if argv is None else argv,
                              resuming=resume is not None)


if __name__ == "__main__":
    main()
