"""bench.py: speed and memory claims of the papers, measured side by side in one run (ratios, medians).

Paper:
    HiViT (arXiv 2205.14949) Tab. 8 and supplementary Tab. 12; iTPN / Fast-iTPN (arXiv 2211.12735) Fig. 5, Tab. 7;
    FastMIM (arXiv 2212.06593); M3I (arXiv 2211.09807).

Implements:
    A tiny CLI that times each paper's speed claim as a ratio of two configurations measured in the same process,
    with warm-up and medians, and prints each row as soon as it is measured. Speed never appears in a test
    (STYLE.md 10): it lives here.

Sections:
    1. Timing helpers        (warm-up, median of reps, one-thread CPU time, peak memory, --amp autocast)
    2. hivit.py suite        <-> HiViT Tab. 8 (dropping masked units), supplementary Tab. 12 (HiViT-B vs ViT-B)
    3. itpn.py suite         <-> iTPN Sec. 3.3-3.4: step cost of the pixel / paper (MIM+MFM) / distillation recipes
    4. mim.py suite          <-> HiViT Tab. 8 (MAE vs SimMIM), FastMIM Sec. 3 (128 px), M3I step cost
    5. fast_itpn.py suite    <-> Fast-iTPN Fig. 5 (token migration), Tab. 7 (window attention, gathering, HRPE)
    6. train.py suite        whole pre-training steps through the real CLI (data loading included), peak memory
    7. finetune.py suite     fine-tuning steps (finetune.py's own Trainer, recipe, layer decay, MixUp / CutMix) and
                             evaluation images/s, peak memory; Fast-iTPN Sec. 5.2 classification with token migration
    8. detect_seg.py suite   dense heads' steps; Mask R-CNN-lite vs torchvision; deformable attention vs the loop
    9. CLI

Shapes:
    B batch, H = W image side.

Differences from the paper / official code:
    - Numbers are measured on whatever machine runs this; the papers measured on V100/A100 GPUs. Ratios, not
      absolute throughput, are what compare. Rows that take long on a CPU (1024-px inputs, an iTPN-B training run)
      run only with --long.
    - --amp bf16 (CUDA only) runs the timed forwards under torch.autocast(bfloat16), as train.py / finetune.py
      train on GPUs (not finetune.evaluate, which finetune.py runs in fp32, nor the deformable-attention row, which
      runs on the CPU); the default is fp32. CPU bf16 is refused: without native bf16 units it ran ~35x slower.

Run:
    python bench.py                         # every suite, CPU, default batches (minutes per suite: see --help)
    python bench.py --suite hivit --batch 8 --reps 5
    python bench.py --suite fast_itpn --long   # adds the 1024-px rows
    python bench.py --device cuda           # on a GPU machine
    python bench.py --device cuda --amp bf16 --suite dense --suite finetune --long   # bf16 autocast, the papers' sizes
"""

import argparse
import ctypes
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import detect_seg as ds
import fast_itpn
import finetune
import hivit
import itpn
import mim
import train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))   # conftest's oracles


# ---- 1. Timing helpers, autocast ----------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, *, warmup: int = 2, reps: int = 5, device: str = "cpu") -> float:
    """Median wall-clock seconds of fn() over `reps` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_seconds(steps: dict, *, reps: int, device: str) -> dict:
    """Median seconds of each fn in `steps` (name -> fn), timed round by round (one warm-up round, then `reps`), so a
    load change on a shared machine hits every row alike. CPU: process CPU time with ONE thread: unlike wall-clock
    time, other processes on a shared machine do not inflate it (a second thread would spin at every barrier while
    the other waits for a core)."""
    threads, clock = torch.get_num_threads(), time.process_time if device == "cpu" else time.perf_counter
    if device == "cpu":
        torch.set_num_threads(1)
    times = {name: [] for name in steps}
    try:
        for round_ in range(1 + reps):
            for name, fn in steps.items():
                sync(device)
                t0 = clock()
                fn()
                sync(device)
                if round_ > 0:
                    times[name].append(clock() - t0)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(fn, *, device: str = "cpu") -> float | None:
    """Peak accelerator memory of one fn() call in MiB (None on CPU, where torch does not track it)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def rss_mb(field: str) -> float | None:
    """This process's resident memory ("VmRSS") or its peak since the last reset_peak_rss ("VmHWM") in MiB, read
    from Linux's /proc/self/status; None where that file does not exist."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))   # kB -> MiB
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> float | None:
    """Start counting one row's CPU peak memory; returns the RSS now (MiB), None off Linux.

    Two steps. First, memory that earlier rows freed goes back to the OS (gc, then glibc's malloc_trim): otherwise
    the allocator hands it out again without the RSS growing, and this row would look smaller than it is. Second,
    writing 5 to /proc/self/clear_refs sets the peak (VmHWM) back to the current RSS (getrusage's ru_maxrss only
    ever grows). rss_mb("VmHWM") - the returned RSS is then the memory the row added at its peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):                                     # not glibc: skip the trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return rss_mb("VmRSS")


def autocast(device: str, amp: str):
    """--amp as a context: torch.autocast(bfloat16) on the device for "bf16", a disabled one for "none". Forward
    passes only: backward runs in the dtypes the forward chose (autocast's own advice)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")


def fwd_bwd(model, x, *, amp: str, device: str, **kwargs):
    """One forward + backward of the stage-3 output (the part a pre-training step always pays)."""
    def step():
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            out = model.forward_features(x, **kwargs)[-1]
        out.float().mean().backward()
    return step


def forward_gmacs(build, side: int = 224) -> float:
    """Forward GMACs of one side x side image through the model `build()` makes, counted on the meta device (exact,
    no memory, independent of the machine's load). MACs = FLOPs / 2."""
    with warnings.catch_warnings():                                       # teacher weights into a meta model: no-op
        warnings.simplefilter("ignore", UserWarning)
        with torch.device("meta"):
            model = build()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops() / 2e9


# ---- 2. hivit.py suite --------------------------------------------------------------------------------------------
# Every suite is a generator of rows (name, value, note), so the CLI prints each row as soon as it is measured.

def bench_hivit(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """HiViT Tab. 8: dropping 75% of units speeds up a pre-training step ~1.8-2x; supp. Tab. 12: HiViT-B 0.95x ViT-B."""
    torch.manual_seed(0)
    model = hivit.HiViT(hivit.PRESETS["hivit_b"]).to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    n, n_vis = 196, 49                                                   # 14x14 units, 75% masked
    ids_keep = torch.rand(batch, n, device=device).argsort(dim=1)[:, :n_vis]   # (B, N_vis)
    t_all = measure(fwd_bwd(model, x, amp=amp, device=device), reps=reps, device=device)
    yield "HiViT-B fwd+bwd 224, all units (s/step)", t_all, f"batch {batch}"
    t_drop = measure(fwd_bwd(model, x, ids_keep=ids_keep, amp=amp, device=device), reps=reps, device=device)
    yield "HiViT-B fwd+bwd 224, 75% units dropped (s/step)", t_drop, f"batch {batch}"
    yield "speed-up from dropping masked units", t_all / t_drop, "x  (HiViT Tab. 8: ~1.8-2x)"
    vit = hivit.VisionTransformer(hivit.VIT_PRESETS["vit_b"]).to(device)
    with torch.no_grad(), autocast(device, amp):
        t_hivit_fwd = measure(lambda: model(x), reps=reps, device=device)
        t_vit_fwd = measure(lambda: vit(x), reps=reps, device=device)
    yield "HiViT-B / ViT-B forward throughput", t_vit_fwd / t_hivit_fwd, "x  (supp. Tab. 12: 0.95x)"


# ---- 3. itpn.py suite: iTPN-B pre-training steps of the three recipes vs an MAE-style HiViT-B step --------------

def bench_itpn(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """Whole pre-training steps (forward + loss + backward) at 224 px, as ratios to mim.py's MAE step on HiViT-B.

    The baseline is HiViT's MAE recipe (6-block decoder). The pixel recipe adds the pyramid and a 3-level decoder
    input; the paper method adds an EMA-teacher pass over the 75% masked units and three one-block level decoders
    with their MFM heads (also reported against the pixel recipe); distillation encodes every unit (mask tokens) plus
    2 aux blocks and a frozen ViT-B/16 teacher (random weights, written to a temporary file: nothing is downloaded).
    Forward GMACs per image (teacher included) are counted exactly on the meta device, so they do not depend on the
    load. The four steps are timed round by round (interleaved_seconds; CPU: single-thread CPU time).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device)
    cpu_note = ", 1-thread CPU time" if device == "cpu" else ""

    def step(model):
        model = model.to(device)

        def run():
            model.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = model(x)["loss"]
            loss.backward()
        return run

    def mae():                                                            # HiViT's MAE recipe: 6b512d decoder
        return mim.METHODS["mae"](hivit.HiViT(replace(hivit.PRESETS["hivit_b"], num_classes=0)), cfg=mim.MAE_HIVIT)

    g_mae = forward_gmacs(mae)
    yield "MAE-style HiViT-B forward GMACs / image", g_mae, "meta-device count"
    arch = itpn.PRESETS["itpn_b"]
    labels = {"itpn_pixel": "pixel recipe", "itpn": "paper MIM+MFM, EMA", "itpn_distill": "distill, ViT-B teacher"}
    runs = {"mae": step(mae())}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = os.path.join(tmp, "vit_b_teacher.pth")
        torch.save(hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_b"], num_classes=0)).state_dict(),
                   teacher_path)
        for method, label in labels.items():
            teacher = {"teacher_path": teacher_path} if method == "itpn_distill" else {}

            def build():
                return itpn.METHODS[method](arch, cfg=itpn.PRETRAIN_PRESETS[method], **teacher)
            g = forward_gmacs(build)
            yield f"iTPN-B {label} forward GMACs / MAE's", g / g_mae, f"x  ({g:.2f} GMACs/image)"
            runs[method] = step(build())
    t = interleaved_seconds(runs, reps=reps, device=device)              # all four steps, round by round
    yield "MAE-style HiViT-B step 224 (s)", t["mae"], f"batch {batch}, 75% dropped, 6b512d decoder" + cpu_note
    for method, label in labels.items():
        yield f"iTPN-B {label} step / MAE HiViT-B step", t[method] / t["mae"], f"x  ({t[method]:.3f} s/step)"
    yield "iTPN-B paper method step / pixel recipe step", t["itpn"] / t["itpn_pixel"], \
        "x  (Eq. 4's MFM: EMA teacher pass + 3 level decoders)"


# ---- 4. mim.py suite: MAE vs SimMIM, FastMIM low resolution, M3I cost -------------------------------------------

def bench_mim(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """Whole pre-training steps (forward + loss + backward) of mim.py methods on HiViT-B, as ratios of step times.

    HiViT Tab. 8 / Sec. 4.2: MAE-style dropping (HiViT's recipe: 6-block decoder, App. A) 1.82x faster than feeding
    every unit (SimMIM); MAE's own 8-block decoder is timed too, for comparison; FastMIM Sec. 3:
    128 px instead of 224 px (~3x fewer tokens); M3I encodes every unit of the mix plus an EMA target pass and two
    decoder passes (a MAC count of ViT-B, 3 x the trained modules + 1 x the no-grad ones, estimates ~4.7x an MAE
    step). Rows of one ratio are timed round by round (interleaved_seconds; CPU: single-thread CPU time).
    """
    torch.manual_seed(0)
    encoder_cfg = replace(hivit.PRESETS["hivit_b"], num_classes=0)
    cpu_note = ", 1-thread CPU time" if device == "cpu" else ""

    def step(name, side, **overrides):
        cfg = replace(mim.MAE_HIVIT if name == "mae" else mim.PRESETS[name], **overrides)   # as train.py builds it
        model = mim.METHODS[name](hivit.HiViT(encoder_cfg), cfg=cfg).to(device)
        x = torch.randn(batch, 3, side, side, device=device)
        extra = {}
        if model.num_views == 2:                                          # M3I: (B, 2, 3, H, W) + crop geometry
            x = torch.stack([x, torch.randn_like(x)], dim=1)
            frames = [[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.2, 0.6, 0.7, 1.0]]   # (top, left, height, width, flip)
            extra = {"geometry": torch.tensor(frames, device=device).expand(batch, -1, -1)}

        def run():
            model.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = model(x, **extra)["loss"]
            loss.backward()
        return run

    t = interleaved_seconds({"mae": step("mae", 224), "simmim": step("simmim", 224),
                             "mae8": step("mae", 224, decoder_depth=8),          # MAE's ViT decoder on HiViT-B
                             "mae_light": step("mae", 224, decoder_dim=256, decoder_depth=1, decoder_heads=8),
                             "m3i": step("m3i", 224)}, reps=reps, device=device)
    yield "MAE (drop 75%, 6b512d) step 224 (s)", t["mae"], f"batch {batch}, HiViT-B" + cpu_note
    yield "SimMIM (all units, 1b256d) step 224 (s)", t["simmim"], f"batch {batch}, HiViT-B" + cpu_note
    yield "MAE-drop vs SimMIM-full step speed-up", t["simmim"] / t["mae"], "x  (HiViT Tab. 8: 1.82x)"
    yield "  same, MAE with MAE's own 8b512d decoder", t["simmim"] / t["mae8"], "x"
    yield "  same, MAE with SimMIM's 1b256d decoder", t["simmim"] / t["mae_light"], "x  (encoder saving alone)"
    yield "M3I (mix + EMA target + 2 decoder passes) step (s)", t["m3i"], f"batch {batch}, HiViT-B" + cpu_note
    yield "M3I vs MAE step cost", t["m3i"] / t["mae"], "x  (MAC estimate for ViT-B: ~4.7x)"
    t = interleaved_seconds({"128": step("fastmim", 128), "224": step("fastmim", 224)}, reps=reps, device=device)
    yield "FastMIM (HOG, 1b256d) step 128 vs 224 speed-up", t["224"] / t["128"], "x  (FastMIM Sec. 3)"


# ---- 5. fast_itpn.py suite: token migration (Fig. 5) and token gathering (Tab. 7) at 512 px ----------------------

# (row, migration_ratio, attention, hrpe, the paper's number). Every row runs the same Fast-iTPN-B weights.
FAST_ITPN_ROWS = [
    ("global attention, no migration", 0.0, "global", False, "baseline"),
    ("token migration 10%", 0.1, "global", False, "Fig. 5: +15%"),
    ("token migration 20%", 0.2, "global", False, "Fig. 5: +20%"),
    ("token migration 30%", 0.3, "global", False, "Fig. 5: +23%"),
    ("token migration 40%", 0.4, "global", False, "Fig. 5: +27%"),
    ("window attention", 0.0, "window", False, "Tab. 7: ~+90%"),
    ("window attention + HRPE", 0.0, "window", True, "Tab. 7"),
    ("window + gathering tokens", 0.0, "gathering", False, "Tab. 7: ~+85%"),
    ("window + gathering tokens + HRPE", 0.0, "gathering", True, "Tab. 7 / Fig. 5: ~+70%"),
    ("window + gathering + migration 40%", 0.4, "gathering", False, "ours: both methods together"),
]


def fast_itpn_flops(cfg, side: int) -> list[float]:
    """Forward FLOPs of backbone + pyramid for every FAST_ITPN_ROWS row at side x side (meta device: exact, free)."""
    with torch.device("meta"):
        models = {hrpe: fast_itpn.FastiTPN(replace(cfg, hrpe=hrpe)) for hrpe in (False, True)}
    x = torch.empty(1, 3, side, side, device="meta")
    flops = []
    for _, ratio, attention, hrpe, _ in FAST_ITPN_ROWS:
        models[hrpe].set_acceleration(migration_ratio=ratio, attention=attention)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            models[hrpe].forward_pyramid(x)
        flops.append(counter.get_total_flops())
    return flops


def bench_fast_itpn(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """Fast-iTPN Fig. 5 and Tab. 7: forward of Fast-iTPN-B backbone + pyramid at 512x512 under each switch.

    First the speed-up in FLOPs at 512 and 1024 px (exact, meta device, instant). Then wall-clock rows, timed in
    interleaved rounds (one warm-up round, then `reps` rounds, median per row), so a load change on a shared machine
    hits every row alike; the note adds the speed-up in process CPU time (robust to other processes). On CPU the
    rows run on one thread: on a shared machine a second thread spins at every barrier while the other waits for a
    core, so both clocks would measure the neighbours. --long adds the same switches timed at 1024 px.
    """
    cfg = replace(fast_itpn.PRESETS["fast_itpn_b"], img_size=512, num_classes=0)
    f512, f1024 = fast_itpn_flops(cfg, 512), fast_itpn_flops(cfg, 1024)
    yield "Fast-iTPN-B backbone+pyramid forward GMACs", f512[0] / 2e9, f"at 512 px; {f1024[0] / 2e9:.0f} at 1024 px"
    for i, (name, _, _, _, paper) in enumerate(FAST_ITPN_ROWS[1:], start=1):
        yield f"FLOPs speed-up: {name}", f512[0] / f512[i], f"x  at 512 px ({f1024[0] / f1024[i]:.2f}x at 1024) {paper}"
    torch.manual_seed(0)
    plain = fast_itpn.FastiTPN(cfg).to(device).eval()
    with_hrpe = fast_itpn.FastiTPN(replace(cfg, hrpe=True)).to(device).eval()
    with_hrpe.load_state_dict(plain.state_dict(), strict=False)           # same weights + zero-initialised tables
    models = {False: plain, True: with_hrpe}
    threads = "1 thread" if device == "cpu" else device

    def forward_seconds(row, x):
        """Wall and process-CPU seconds of one no-grad forward of backbone + pyramid under a row's switches."""
        _, ratio, attention, hrpe, _ = row
        models[hrpe].set_acceleration(migration_ratio=ratio, attention=attention)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), autocast(device, amp):
            models[hrpe].forward_pyramid(x)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    def timed_rows(rows, side, batch_size):
        """Rows interleaved round by round (round 0 = warm-up), a progress line per round, then median rows."""
        x = torch.randn(batch_size, 3, side, side, device=device)
        wall, cpu = [[] for _ in rows], [[] for _ in rows]
        saved_threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)
        try:
            for round_ in range(1 + reps):
                t_round = time.perf_counter()
                for i, row in enumerate(rows):
                    w, c = forward_seconds(row, x)
                    if round_ > 0:
                        wall[i].append(w)
                        cpu[i].append(c)
                label = "warm-up round" if round_ == 0 else f"round {round_} of {reps}"
                yield f"  ({label}: {len(rows)} rows at {side} px, s)", time.perf_counter() - t_round, ""
        finally:
            torch.set_num_threads(saved_threads)
        wall, cpu = [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]
        yield f"{side} px baseline: {rows[0][0]} (s)", wall[0], f"batch {batch_size}, {threads}"
        for i, (name, *_, paper) in enumerate(rows[1:], start=1):
            cpu_note = f"cpu time {cpu[0] / cpu[i]:.2f}x  " if device == "cpu" else ""   # no meaning on CUDA
            yield f"speed-up at {side} px: {name}", wall[0] / wall[i], f"x  {cpu_note}{paper}"

    yield from timed_rows(FAST_ITPN_ROWS, 512, batch)
    if long:                                                              # attention dominates at 4096 tokens
        big = [row for row in FAST_ITPN_ROWS if row[1] == 0.0 and not row[3]]   # global, window, gathering
        yield from timed_rows(big, 1024, 1)


# ---- 6. train.py suite: the whole pre-training step, data loading included ---------------------------------------

def bench_train(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """`python train.py` as a user runs it, for 2 epochs of `reps` steps; images/s of the second (steady) epoch, so
    the first steps' allocations do not count. Peak memory: CUDA max allocated, or the child process's peak RSS.
    Rows have fixed batches: 32 for the demo, 8 for iTPN-B (--long); `batch` is not used here."""
    runs = [("demo: itpn_tiny + itpn, 64 px, batch 32", ["--batch_size", "32"], "")]
    if long:
        runs.append(("iTPN-B + itpn, 224 px, batch 8", ["--model", "itpn_b", "--batch_size", "8", "--num_workers",
                                                        "2"], "; fixed batch 8, --batch not used"))
    for name, argv, note in runs:
        per_step = int(argv[argv.index("--batch_size") + 1])
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "train.py", *argv, "--num_images", str(per_step * reps), "--epochs", "2",
                   "--warmup_epochs", "1", "--device", "cuda" if device.startswith("cuda") else "cpu", "--amp", amp,
                   "--save_every", "100", "--vis_every", "100", "--output_dir", out]
            subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                           env={**os.environ, "TQDM_DISABLE": "1"})
            with open(os.path.join(out, "log.txt")) as f:
                last = [json.loads(line) for line in f][-1]
        peak = last.get("max_mem_mb") or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # KiB -> MiB
        yield f"train.py step, {name} (images/s)", last["images_per_sec"], "data loading included" + note
        yield (f"train.py peak memory, {name} (MiB)", peak,
               ("CUDA max allocated" if "max_mem_mb" in last else "peak RSS of the largest child so far") + note)


# ---- 7. finetune.py suite: fine-tuning steps and evaluation, built by finetune.py itself --------------------------

CPU_PEAK = "peak RSS over building the run and timing it, minus the RSS before"


def finetune_trainer(argv: list[str], *, out: str, device: str, amp: str):
    """(task, trainer) as `python finetune.py ARGV` builds them: its flags and recipe (the one for a pixel-pre-trained
    checkpoint; the weights stay random, nothing is loaded), classifier, layer-decay AdamW groups, MixUp / CutMix,
    EMA and the Trainer with its own autocast (--amp). The built-in data is drawn small; no step is taken."""
    argv = [*argv, "--output_dir", out, "--device", "cuda" if device.startswith("cuda") else "cpu", "--amp", amp,
            "--num_workers", "0", "--mixup", "0.8", "--cutmix", "1.0"]   # mixing on, also for the demo
    cfg, _ = train.parse_config(finetune.FinetuneConfig, argv, description="", defaults=finetune.RECIPES,
                                recipe=lambda c: finetune.recipe_name(c.model, "pixel", c.linear_probe))
    task, trainer, _ = finetune.prepare(cfg, train.Dist(0, 1, torch.device(device)), None)
    return task, trainer


def finetune_step(trainer, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step of finetune's Trainer on a fixed batch already on the device (data loading excluded):
    MixUp / CutMix, forward under the run's autocast, smoothed loss, backward, gradient norm, AdamW with layer-wise
    lr scales, EMA (when the recipe keeps one)."""
    batches = itertools.repeat((x, y, torch.zeros(len(y), dtype=torch.long)))   # (inputs, labels, skipped)
    return lambda: trainer.train_step(batches)


def inference(model, x: torch.Tensor, *, device: str, amp: str):
    """One no-grad forward in eval mode (the classifier's logits), under --amp."""
    def run():
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            model(x)
        model.train()
    return run


def bench_finetune(*, batch: int | None, reps: int, device: str, long: bool, amp: str):
    """finetune.py: fine-tuning step and inference images/s and peak memory of the demo (itpn_tiny, 64 px, batch
    32) and, with --long, iTPN-B at 224 px (batch 8) and Fast-iTPN-B classification at 384 px with token migration
    rho = 0 / 0.2 / 0.4 on the same weights (Fast-iTPN Sec. 4.1 and 5.2; the paper times migration only on dense
    tasks). Fast-iTPN-B's batch: --batch, else its recipe's 32 on CUDA and 4 on a CPU. Steps and forwards of one
    model are timed round by round (interleaved_seconds; CPU: 1-thread CPU time). Peak memory: CUDA max allocated
    in one step (weights, gradients, AdamW and EMA states, activations), or on CPU (Linux) the peak RSS over
    building the run and timing it minus the RSS before (reset_peak_rss)."""
    cuda = device.startswith("cuda")
    note = "1-thread CPU time" if not cuda else device + (", bf16 autocast" if amp == "bf16" else ", fp32")
    rows = [("demo itpn_tiny 64 px", "itpn_tiny", 64, 32)] + ([("iTPN-B 224 px", "itpn_b", 224, 8)] if long else [])
    for label, model_name, side, b in rows:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as out:
            rss = reset_peak_rss()
            val = "64" if model_name.endswith("_tiny") else "1"           # only the demo runs finetune.evaluate
            task, trainer = finetune_trainer(["--model", model_name, "--input_size", str(side), "--batch_size", str(b),
                                              "--num_images", str(b), "--num_val_images", val],
                                             out=out, device=device, amp=amp)
            x = torch.randn(b, 3, side, side, device=device)
            y = torch.randint(0, task.cfg.nb_classes, (b,), device=device)
            t = interleaved_seconds({"step": finetune_step(trainer, x, y),
                                     "eval": inference(task.model, x, device=device, amp=amp)}, reps=reps,
                                    device=device)
            yield f"{label} fine-tuning step (images/s)", b / t["step"], f"batch {b}, MixUp/CutMix, {note}"
            yield f"{label} inference (images/s)", b / t["eval"], f"batch {b}, {note}"
            if cuda:
                yield f"{label} fine-tuning peak memory (MiB)", \
                    peak_memory_mb(finetune_step(trainer, x, y), device=device), "CUDA max allocated in one step"
            elif rss is not None:
                yield f"{label} fine-tuning peak memory (MiB)", rss_mb("VmHWM") - rss, CPU_PEAK
            if model_name.endswith("_tiny"):                             # the val loop as finetune.py runs it
                t = interleaved_seconds({"evaluate": task.evaluate}, reps=reps, device=device)["evaluate"]
                yield f"{label} finetune.evaluate (images/s)", len(task.val_views) / t, \
                    f"{len(task.val_views)} val images, data loading included, fp32 as finetune.py evaluates"
        del task, trainer
    if not long:
        return
    torch.manual_seed(0)
    b = batch or (32 if cuda else 4)
    with tempfile.TemporaryDirectory() as out:
        rss = reset_peak_rss()
        task, trainer = finetune_trainer(["--model", "fast_itpn_b", "--input_size", "384", "--batch_size", str(b),
                                          "--num_images", str(b), "--num_val_images", "1"],
                                         out=out, device=device, amp=amp)
        model, ratios = task.model, (0.0, 0.2, 0.4)
        x = torch.randn(b, 3, 384, 384, device=device)
        y = torch.randint(0, task.cfg.nb_classes, (b,), device=device)

        def at(ratio, fn):                                                # Sec. 4.1: a switch on the same weights
            def run():
                model.set_acceleration(migration_ratio=ratio)
                fn()
            return run

        runs = {}
        for r in ratios:
            runs[("step", r)] = at(r, finetune_step(trainer, x, y))
            runs[("eval", r)] = at(r, inference(model, x, device=device, amp=amp))
        t = interleaved_seconds(runs, reps=reps, device=device)
        for kind, what in (("step", "fine-tuning step"), ("eval", "inference")):
            yield f"Fast-iTPN-B 384 px {what}, no migration (images/s)", b / t[(kind, 0.0)], f"batch {b}, {note}"
            for r in ratios[1:]:
                yield f"  speed-up with token migration {r:.0%}", t[(kind, 0.0)] / t[(kind, r)], \
                    f"x  ({b / t[(kind, r)]:.2f} images/s)"
        if cuda:
            for r in ratios:
                yield f"Fast-iTPN-B 384 px step peak memory, migration {r:.0%} (MiB)", \
                    peak_memory_mb(at(r, finetune_step(trainer, x, y)), device=device), "CUDA max allocated in one step"
        elif rss is not None:
            yield "Fast-iTPN-B 384 px fine-tuning peak memory (MiB)", rss_mb("VmHWM") - rss, CPU_PEAK + ", all rows"
        model.set_acceleration(migration_ratio=0.0)


# ---- 8. detect_seg.py suite: the dense heads on the pyramid ------------------------------------------------------

def synthetic_targets(batch: int, side: int, num_classes: int, *, seed: int = 0) -> list:
    """Three boxes per image with their filled rectangles as masks, labels 1..K (a fixed dense training batch)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * side * 0.6
        boxes = torch.cat([xy, xy + side * (0.1 + 0.3 * torch.rand(3, 2, generator=g))], dim=1)   # (3, 4) xyxy
        masks = torch.zeros(3, side, side, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            m[y0:y1, x0:x1] = True
        targets.append({"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (3,), generator=g),
                        "masks": masks, "semantic": torch.randint(0, num_classes, (side, side), generator=g)})
    return targets


def dense_model(model: str, task: str, head: str, num_classes: int):
    """detect_seg's DenseModel for --model / --task / --head, as the driver builds it (random weights)."""
    cfg = ds.DenseConfig(task=task, head=head, model=model, drop_path=0.0)
    backbone, neck, widths = ds.build_backbone(model, cfg)
    head_module = ds.build_head(cfg, widths=widths, num_classes=num_classes, tiny=model.endswith("_tiny"))
    return ds.DenseModel(backbone, neck=neck, head=head_module, task=task, head_name=head)


def dense_step(model, images, targets, *, task: str, amp: str):
    """One training step's forward + backward of a DenseModel (the driver's loss, without the optimizer)."""
    def step():
        model.zero_grad(set_to_none=True)
        sizes = [tuple(images.shape[-2:])] * len(images)
        pad_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        with autocast(images.device.type, amp):
            if task == "seg":
                out = model(images, pad_mask=pad_mask, image_sizes=sizes)
                loss = ds.seg_loss(out, torch.stack([t["semantic"] for t in targets]))["loss"]
            else:
                loss = model(images, pad_mask=pad_mask, image_sizes=sizes, targets=targets)["loss"]
        loss.backward()
    return step


def bench_dense(*, batch: int, reps: int, device: str, long: bool, amp: str):
    """detect_seg.py: training / inference images/s of the heads (demo sizes; iTPN-B at 512 px with --long), Mask
    R-CNN-lite against torchvision's heads on the same pyramid features and weights, deformable attention by
    grid_sample against the per-point bilinear loop it replaces."""
    from conftest import naive_deform_sample, torchvision_twin   # the tests' oracles, one copy (tests/conftest.py)
    from torchvision.models.detection.image_list import ImageList
    torch.manual_seed(0)
    rows = [("itpn_tiny", "seg", "uperhead", 64, 8), ("itpn_tiny", "det", "maskrcnn", 64, 8),
            ("itpn_tiny", "det", "dino", 64, 8)]
    if long:                                                              # the papers' sizes: slow on a CPU
        rows += [("itpn_b", "seg", "uperhead", 512, batch), ("itpn_b", "det", "maskrcnn", 512, batch),
                 ("itpn_b", "det", "dino", 512, batch)]
    threads = "1 thread" if device == "cpu" else device + (", bf16 autocast" if amp == "bf16" else "")
    for model_name, task, head, side, b in rows:
        model = dense_model(model_name, task, head, num_classes=8).to(device).train()
        images, targets = torch.randn(b, 3, side, side, device=device), synthetic_targets(b, side, 8)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        train_s = interleaved_seconds({"step": dense_step(model, images, targets, task=task, amp=amp)}, reps=reps,
                                      device=device)["step"]
        model.eval()
        pad_mask = None if task == "seg" else torch.zeros(b, side, side, dtype=torch.bool, device=device)
        with torch.no_grad(), autocast(device, amp):
            infer_s = interleaved_seconds({"eval": lambda: model(images, pad_mask=pad_mask,
                                                                  image_sizes=[(side, side)] * b)},
                                          reps=reps, device=device)["eval"]
        yield f"{model_name} + {head} {side} px train step (images/s)", b / train_s, f"batch {b}, {threads}"
        yield f"{model_name} + {head} {side} px inference (images/s)", b / infer_s, f"batch {b}, {threads}"
        del model                                                         # free it before the next row's
    if long:                                                              # ADE20K test: whole image vs windows
        model = dense_model("itpn_b", "seg", "uperhead", num_classes=150).to(device).eval()
        x = torch.randn(1, 3, 512, 683, device=device)

        def logits_fn(images):
            return model(images, pad_mask=None, image_sizes=None)["logits"]

        with torch.no_grad(), autocast(device, amp):
            t = interleaved_seconds({"whole": lambda: ds.predict_whole(logits_fn, x),
                                     "slide": lambda: ds.predict_slide(logits_fn, x)}, reps=reps, device=device)
        yield "iTPN-B + UPerHead 512x683 whole-image inference (images/s)", 1 / t["whole"], threads
        yield "iTPN-B + UPerHead 512x683 sliding-window inference (images/s)", 1 / t["slide"], "512 windows, stride 341"
    # Mask R-CNN-lite vs torchvision's Mask R-CNN heads: same settings ("torchvision" preset), same weights, same
    # iTPN-B pyramid-shaped features (256 channels, strides 4..64 of a 512-px input), batch 2.
    side, b, strides = 512, 2, (4, 8, 16, 32, 64)
    lite = ds.MaskRCNNLite(256, num_classes=80, strides=strides, cfg=ds.MASKRCNN_PRESETS["torchvision"]).to(device)
    twin = torchvision_twin(lite).to(device)
    feats = [torch.randn(b, 256, side // s, side // s, device=device) for s in strides]
    targets = [{k: v.to(device) for k, v in t.items() if k != "semantic"} for t in synthetic_targets(b, side, 80)]
    image_list = ImageList(torch.zeros(b, 3, side, side, device=device), [(side, side)] * b)
    named = {str(i): f for i, f in enumerate(feats)}

    def lite_train():
        lite.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = lite(feats, image_sizes=[(side, side)] * b, targets=targets)["loss"]
        loss.backward()

    def twin_train():
        twin.zero_grad(set_to_none=True)
        with autocast(device, amp):
            proposals, rpn_losses = twin.rpn(image_list, named, targets)
            _, roi_losses = twin.roi_heads(named, proposals, image_list.image_sizes, targets)
        sum({**rpn_losses, **roi_losses}.values()).backward()

    def twin_eval():
        proposals, _ = twin.rpn(image_list, named)
        detections, _ = twin.roi_heads(named, proposals, image_list.image_sizes)
        return twin.transform.postprocess(detections, image_list.image_sizes, image_list.image_sizes)

    lite.train(), twin.train()
    t = interleaved_seconds({"lite": lite_train, "torchvision": twin_train}, reps=reps, device=device)
    yield "Mask R-CNN-lite / torchvision heads, train step (speed)", t["torchvision"] / t["lite"], \
        f"x  lite {t['lite']:.2f} s, 512 px, batch 2, heads only"
    lite.eval(), twin.eval()
    with torch.no_grad(), autocast(device, amp):
        t = interleaved_seconds({"lite": lambda: lite(feats, image_sizes=[(side, side)] * b),
                                 "torchvision": twin_eval}, reps=reps, device=device)
    yield "Mask R-CNN-lite / torchvision heads, inference (speed)", t["torchvision"] / t["lite"], \
        f"x  lite {t['lite']:.2f} s, masks pasted by both"
    # Deformable attention (Deformable DETR Eq. 3): one grid_sample per level against the per-point loop.
    shapes, heads, dh, levels, points, queries = [(16, 16), (8, 8), (4, 4), (2, 2)], 4, 8, 4, 4, 8
    value = torch.randn(1, sum(h * w for h, w in shapes), heads, dh, device=device, requires_grad=True)
    locations = torch.rand(1, queries, heads, levels, points, 2, device=device, requires_grad=True)
    weights = torch.rand(1, queries, heads, levels, points, device=device).softmax(-1).requires_grad_()

    def fwd_bwd_of(fn):
        def step():
            with autocast(device, amp):
                out = fn(value, shapes, locations, weights)
            out.float().sum().backward()
        return step

    t = interleaved_seconds({"grid_sample": fwd_bwd_of(ds.ms_deform_attn_sample),
                             "loop": fwd_bwd_of(naive_deform_sample)}, reps=reps, device=device)
    yield "deformable attention fwd+bwd, grid_sample / naive loop (speed)", t["loop"] / t["grid_sample"], \
        f"x  {queries} queries x {heads} heads x {levels} levels x {points} points, {device}" + \
        (", bf16 autocast" if amp == "bf16" else "")


# ---- 9. CLI -------------------------------------------------------------------------------------------------------

# name -> (suite, default batch, default reps, minutes on a 2-core CPU with the defaults, without --long)
SUITES = {
    "hivit": (bench_hivit, 4, 3, "2"),
    "itpn": (bench_itpn, 4, 3, "3"),
    "mim": (bench_mim, 4, 3, "3"),
    "fast_itpn": (bench_fast_itpn, 1, 2, "2"),
    "train": (bench_train, None, 3, "0.5"),
    "finetune": (bench_finetune, None, 3, "0.1"),
    "dense": (bench_dense, 2, 3, "4"),
}


def main():
    timings = "; ".join(f"{name} ~{minutes}" for name, (*_, minutes) in SUITES.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=f"Minutes per suite on a 2-core CPU with the defaults: {timings}; "
                                            f"--long adds the 1024-px Fast-iTPN rows (~4 more), an iTPN-B "
                                            f"train.py run (~3 more), finetune's iTPN-B and Fast-iTPN-B rows (~7 "
                                            f"more) and dense's iTPN-B rows at 512 px.")
    parser.add_argument("--suite", choices=sorted(SUITES), action="append",
                        help="suite(s) to run (repeatable); default: all, in the order of the epilog")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per timed step; default: the suite's own (hivit 4, itpn 4, mim 4, fast_itpn 1, "
                             "dense 2 for its iTPN-B rows; finetune: its Fast-iTPN-B rows, 32 on CUDA and 4 on a CPU; "
                             "the demo rows and train keep their fixed batches)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per row, the median is reported; default: the suite's own "
                             "(fast_itpn 2, others 3)")
    parser.add_argument("--long", action="store_true",
                        help="also run the long rows: Fast-iTPN at 1024 px, an iTPN-B train.py run, iTPN-B / "
                             "Fast-iTPN-B fine-tuning (224 / 384 px) and iTPN-B dense heads at 512 px")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"],
                        help="bf16: every timed forward under torch.autocast(bfloat16), CUDA only; none: fp32")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible to PyTorch (check the driver, "
                         "CUDA_VISIBLE_DEVICES and the torch build) - or use --device cpu")
    if args.amp == "bf16" and args.device == "cpu":
        raise SystemExit("error: --amp bf16 needs --device cuda: CPU bf16 autocast ran ~35x slower than fp32 here "
                         "(no native bf16 units), so its timings would mislead - use --amp none on a CPU")
    where = f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {where}, amp {args.amp}, {torch.get_num_threads()} threads", flush=True)
    for name in args.suite or list(SUITES):
        suite, batch, reps, _ = SUITES[name]
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        for row, value, note in suite(batch=args.batch or batch, reps=args.reps or reps, device=args.device,
                                      long=args.long, amp=args.amp):
            print(f"  {row:58s} {value:10.3f}  {note}", flush=True)
        print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
