"""HiViT: a hierarchical ViT whose early stages are MLP-only, so masked units can be dropped as in MAE.

Paper:
    HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer
    (Zhang et al., ICLR 2023, arXiv 2205.14949). Plain-ViT baseline: Dosovitskiy et al., arXiv 2010.11929.

Implements:
    The HiViT backbone exactly as the released iTPN/HiViT code builds it (checkpoints load with identical
    outputs through `load_official`), a plain ViT that shares its attention block (HiViT Tab. 2 row (o); later
    files use it as a frozen teacher and for iTPN-on-ViT), and the encoder seam
    `forward_features(x, *, ids_keep=None, mask=None, mask_token=None) -> list`: with ids_keep every stage runs on
    the visible units only; the last entry is always the stage-3 tokens (B, N_vis, C).

Sections:
    1. Config and presets            <-> HiViT Tab. 7 (and its depth notation, see PRESETS)
    2. Primitives (DropPath, MLP, position tables, units) <-> Sec. 3.2, MAE's sin-cos table, BEiT's mask token
    3. Patch embedding into units     <-> Sec. 3.1, Fig. 2 (16x16 main patch = 4x4 inner patches of 4x4 px)
    4. MLP-only blocks                <-> Sec. 3.1 "MLP blocks in the early stages", Tab. 2 rows (b)-(d)
    5. Patch merging inside units     <-> Sec. 3.1 "patch merging", Fig. 2
    6. Global attention + relative position bias <-> Sec. 3.1 "main stage", Tab. 2 row (e)
    7. The HiViT model                <-> Fig. 2, Sec. 3.3 (masked units dropped at the input)
    8. The plain ViT                  <-> Tab. 2 row (o)
    9. Reading checkpoint files, loading official layouts <-> released HiViT / iTPN classifiers
    10. __main__ smoke demo

Shapes:
    B batch, C stage-3 width (stage 1 = C/4, stage 2 = C/2), H, W image size, Hp, Wp grid of 16x16 units,
    N = Hp*Wp units (= tokens in stage 3), N_vis visible units, h, w inner grid of a unit (4, 2, 1 by stage),
    K classes. A unit tensor is (B, N, h, w, c): main-patch index first, inner grid last.
    mask: (B, N), 1 = removed (masked), 0 = kept (visible). ids_keep: (B, N_vis) indices of kept units.

Differences from the paper / official code:
    - Module names: the official code keeps stages 1, 2, the two merges and stage 3 in one flat list `blocks.{i}`;
      here they are `stage1`, `merge1`, `stage2`, `merge2`, `blocks` (stage 3) so each stage reads on its own.
      MLP-only blocks call their norm `norm` (official: `norm2`) and layer scale `gamma` (official: `gamma_2`).
      `load_official` renames; outputs are identical.
    - Depth notation: the HiViT paper counts two MLP blocks as one "block" (Tab. 7's parameter counts hold only in
      that reading), so HiViT-B "2-2-20" is 4+4 MLP blocks here. Presets store literal block counts.
    - `relative_position_index` is recomputed, never stored. At another grid the bias table is resized bicubically
      on the fly (our choice; the official seg code resizes once at load, `seg/mmcv_custom/checkpoint.py`).
    - The APE is resized with the official DINO-style `scale_factor=(G+0.1)/G_0`. The official pixel pre-training
      also resamples it when units are dropped (`itpn_pixel/models/models_itpn.py`, `interpolate_pos_encoding`):
      off here; `replace(preset, ape_quirk=True)` reproduces it (library only, shown in tests/test_hivit.py).
    - For the released dense backbones: `ln_eps` (1e-5 there, 1e-6 here) and `ape_size` (seg: a 224-px APE beside
      512-px RPE tables). Constructors check every config field (check_config) and name the fix.
    - Plain ViT: mean pooling -> fc_norm -> head (like HiViT); an optional CLS token, pre-norm and QuickGELU make
      OpenAI-CLIP image encoders loadable as teachers (itpn.py). Its weights are not the official timm layout.

Run:
    # read in import order: hivit -> mim -> itpn -> fast_itpn -> train -> finetune -> detect_seg (first)
    python hivit.py                                     # CPU smoke demo, a few seconds
    torchrun --nproc_per_node 8 train.py --model hivit_b --method mae    # pre-training (train.py)
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LN_EPS", "HiViTConfig", "PRESETS", "ViTConfig", "VIT_PRESETS",
    "DropPath", "drop_path_rates", "MLP", "MLPBlock", "Attention", "AttentionBlock", "PatchEmbed", "PatchMerge",
    "HiViT", "VisionTransformer",
    "sincos_pos_embed_2d", "init_sincos_", "resize_pos_embed", "relative_position_index", "units_to_map",
    "map_to_units", "select_units", "mask_blend", "check_image_size", "check_image_dtype", "check_ids_keep",
    "UNIT", "HIVIT_RULES", "VIT_RULES", "check_config", "init_weights",
    "map_official_key", "read_checkpoint", "unwrap_checkpoint", "check_state_dict", "load_official", "count_params",
]

# LayerNorm eps of the official classification and pre-training models, and of every file in this project that
# builds on them. The official det/seg backbones use torch's default 1e-5, which `HiViTConfig.ln_eps` selects.
LN_EPS = 1e-6


# ---- 1. Config and presets ----------------------------------------------------------------------------------------

@dataclass
class HiViTConfig:
    img_size: int = 224           # side the position tables are built for (px); other sizes are interpolated
    embed_dim: int = 512          # C, stage-3 width; stage 1 is C/4 and stage 2 is C/2 (Tab. 7)
    mlp_depth1: int = 4           # MLP-only blocks in stage 1, literal count (HiViT notation halves it)
    mlp_depth2: int = 4           # MLP-only blocks in stage 2, literal count
    depth: int = 20               # attention blocks in stage 3
    num_heads: int = 8            # stage-3 heads; head_dim = 64 in every paper config
    bridge_mlp_ratio: float = 3.0 # hidden ratio r of the stage-1/2 MLPs (Tab. 2: 3)
    mlp_ratio: float = 4.0        # hidden ratio of the stage-3 MLPs
    rpe: bool = True              # relative position bias in stage 3 (off in official pixel pre-training)
    drop_path_rate: float = 0.0   # stochastic depth, linear 0 -> rate over MLP + attention blocks (Sec. 4)
    layer_scale: float = 0.0      # init of per-channel residual scales gamma (iTPN-CLIP: 0.1); 0 = no gamma
    ape_quirk: bool = False       # resample the APE at (G+0.1)/G when units are dropped (official pixel MIM quirk)
    ape_size: int | None = None   # side (px) the APE table is built for; None = img_size (official seg: 224 at 512)
    ln_eps: float = LN_EPS        # eps of every LayerNorm (official classifiers / pre-training 1e-6, det / seg 1e-5)
    num_classes: int = 1000       # K; 0 = no head (backbone only)


# HiViT paper Tab. 7. Depths are literal MLP-block counts: HiViT "1-1-10" = 2+2 MLP blocks (see the header).
# Parameter counts (1000-class head) are the official models' exact ones; the paper rounds them to 0.1M.
PRESETS: dict[str, HiViTConfig] = {
    "tiny": HiViTConfig(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2,
                        num_classes=10),
    "hivit_t": HiViTConfig(embed_dim=384, mlp_depth1=2, mlp_depth2=2, depth=10, num_heads=6),   # 19.182M, 4.6G FLOPs
    "hivit_s": HiViTConfig(embed_dim=384, mlp_depth1=4, mlp_depth2=4, depth=20, num_heads=6),   # 37.526M, 9.1G
    "hivit_b": HiViTConfig(embed_dim=512, mlp_depth1=4, mlp_depth2=4, depth=20, num_heads=8),   # 66.419M, 15.9G
    "hivit_l": HiViTConfig(embed_dim=768, mlp_depth1=8, mlp_depth2=8, depth=36, num_heads=12),  # 266.763M, 63.8G
}


@dataclass
class ViTConfig:
    img_size: int = 224           # side the position table is built for (px)
    patch_size: int = 16          # px per patch = one unit
    embed_dim: int = 768          # C
    depth: int = 12               # transformer blocks
    num_heads: int = 12           # heads, head_dim = C / num_heads
    mlp_ratio: float = 4.0        # MLP hidden ratio
    class_token: bool = False     # prepend a CLS token (CLIP / MAE layout); pooling still averages patch tokens
    pre_norm: bool = False        # LayerNorm after patch embedding + position (CLIP's ln_pre)
    quick_gelu: bool = False      # x * sigmoid(1.702 x) as in OpenAI CLIP; False = exact GELU
    ln_eps: float = LN_EPS        # LayerNorm eps (OpenAI CLIP uses 1e-5)
    drop_path_rate: float = 0.0   # stochastic depth, linear 0 -> rate
    num_classes: int = 1000       # K; 0 = no head


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10),
    "vit_s": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
}


# Config checks, run by every model constructor before it builds anything: (field, test(cfg) -> bool, the fix).
# A bad value would otherwise surface in the first forward (a reshape, a 0-d head) or train silently.
UNIT = 16                      # px per unit (main patch), the stride of stage 3
HIVIT_RULES = [
    ("img_size", lambda c: c.img_size >= UNIT and c.img_size % UNIT == 0,
     "must be a positive multiple of the 16-px unit, e.g. 224"),
    ("ape_size", lambda c: c.ape_size is None or (c.ape_size >= UNIT and c.ape_size % UNIT == 0),
     "must be None (= img_size) or a positive multiple of the 16-px unit, e.g. 224"),
    ("embed_dim", lambda c: c.embed_dim > 0 and c.embed_dim % 4 == 0,
     "must be a positive multiple of 4 (stage 1 is embed_dim / 4 wide, stage 2 embed_dim / 2)"),
    ("num_heads", lambda c: c.num_heads >= 1 and c.embed_dim % c.num_heads == 0,
     "must be >= 1 and divide embed_dim (head_dim = embed_dim / num_heads, 64 in every paper config)"),
    ("depth", lambda c: c.depth >= 1, "must be >= 1 (stage 3 needs at least one attention block)"),
    ("mlp_depth1", lambda c: c.mlp_depth1 >= 0, "must be >= 0 (MLP-only blocks in stage 1)"),
    ("mlp_depth2", lambda c: c.mlp_depth2 >= 0, "must be >= 0 (MLP-only blocks in stage 2)"),
    ("bridge_mlp_ratio", lambda c: c.bridge_mlp_ratio > 0, "must be > 0 (Tab. 2: 3.0)"),
    ("mlp_ratio", lambda c: c.mlp_ratio > 0, "must be > 0 (usually 4.0)"),
    ("drop_path_rate", lambda c: 0 <= c.drop_path_rate < 1, "must be in [0, 1)"),
    ("layer_scale", lambda c: c.layer_scale >= 0, "must be >= 0 (0 = no layer scale)"),
    ("ln_eps", lambda c: c.ln_eps > 0, "must be > 0 (1e-6, or 1e-5 for the official det/seg backbones)"),
    ("num_classes", lambda c: c.num_classes >= 0, "must be >= 0 (0 = backbone without a head)"),
]
VIT_RULES = [
    ("patch_size", lambda c: c.patch_size >= 1, "must be >= 1 (px per patch)"),
    ("img_size", lambda c: c.img_size >= c.patch_size and c.img_size % c.patch_size == 0,
     "must be a positive multiple of patch_size"),
    *(rule for rule in HIVIT_RULES if rule[0] in ("num_heads", "depth", "mlp_ratio", "drop_path_rate", "ln_eps",
                                                  "num_classes")),
    ("embed_dim", lambda c: c.embed_dim > 0, "must be > 0"),
]


def check_config(cfg, rules: list) -> None:
    """Raise one ValueError naming every field of `cfg` that breaks its rule, with the fix; rules on fields this
    config does not have are skipped (so fast_itpn.py's config reuses HIVIT_RULES)."""
    errors = [f"{name}={getattr(cfg, name)!r} {fix}" for name, test, fix in rules
              if hasattr(cfg, name) and not test(cfg)]
    if errors:
        raise ValueError(f"invalid {type(cfg).__name__}: " + "; ".join(errors))


# ---- 2. Primitives: DropPath, MLP, position tables ----------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (scaled by 1/(1-p))."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)                       # (B, 1, ..., 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to `rate` over n blocks (torch.linspace, in plain Python)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x); only for CLIP teachers."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """fc1 -> GELU -> fc2, applied to the last dim (so it acts per token, or per inner patch of a unit)."""

    def __init__(self, dim: int, *, hidden_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (grid_h*grid_w, dim), row-major.

    Layout (as MAE and the iTPN pre-training init): the first dim/2 channels encode the column, the last dim/2 the
    row; each half is [sin | cos] with omega_k = 1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))   # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")  # (gh, gw) each

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega                               # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)             # (N, dim/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()        # (N, dim)


@torch.no_grad()
def init_sincos_(table: nn.Parameter, grid_hw: tuple[int, int]) -> None:
    """Overwrite a (1, Hp*Wp, C) position table with MAE's sin-cos table; it stays a trainable parameter.

    Every encoder's `init_pos_embed_sincos()` calls this: masked pre-training starts the APE from sin-cos and keeps
    it trainable (official `itpn_pixel/models/models_itpn_mim.py`, `iTPNMaskedAutoencoder.__init__`; MAE freezes it).
    """
    table.copy_(sincos_pos_embed_2d(table.shape[-1], *grid_hw)[None])   # (1, N, C)


def resize_pos_embed(table: torch.Tensor, grid_hw: tuple[int, int], *, force: bool = False) -> torch.Tensor:
    """Resize a square (1, G*G, C) position table to (1, Hp*Wp, C) as the official code does.

    Bicubic with DINO's `scale_factor = (Hp + 0.1) / G` (not `size=`): the +0.1 makes floor(G * scale) = Hp, and the
    sampling positions follow the scale factor, so the result is the official one bit for bit. With `force`, the
    table is resampled even when the grid is unchanged: the official masked pre-training does this whenever units
    are dropped (`itpn_pixel/models/models_itpn.py`, `interpolate_pos_encoding` sees N_vis != N tokens).
    """
    n, c = table.shape[1], table.shape[2]
    g = math.isqrt(n)
    hp, wp = grid_hw
    if (hp, wp) == (g, g) and not force:
        return table
    grid = table.reshape(1, g, g, c).permute(0, 3, 1, 2)                 # (1, C, G, G)
    grid = F.interpolate(grid.float(), scale_factor=((hp + 0.1) / g, (wp + 0.1) / g), mode="bicubic",
                         align_corners=False).to(table.dtype)             # (1, C, Hp, Wp)
    return grid.permute(0, 2, 3, 1).reshape(1, hp * wp, c)               # (1, Hp*Wp, C)


def relative_position_index(grid_hw: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) index into a ((2Hp-1)(2Wp-1), heads) bias table: idx = (drow + Hp-1)(2Wp-1) + (dcol + Wp-1).

    drow, dcol = position(query) - position(key), as Swin/BEiT; no extra entries for a CLS token.
    """
    hp, wp = grid_hw
    rows, cols = torch.meshgrid(torch.arange(hp, device=device), torch.arange(wp, device=device), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])               # (2, N)
    delta = coords[:, :, None] - coords[:, None, :]                       # (2, N, N)
    return (delta[0] + hp - 1) * (2 * wp - 1) + (delta[1] + wp - 1)      # (N, N)


def check_image_size(x: torch.Tensor, patch: int = 16) -> tuple[int, int]:
    """Return the unit grid (Hp, Wp) of a (B, 3, H, W) batch, or raise a ValueError that names valid sizes."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % patch or w % patch:
        def near(s):
            return f"{s // patch * patch} or {(s // patch + 1) * patch}"
        raise ValueError(f"image size {h}x{w} is not divisible by the {patch}-px unit: use a multiple of {patch} "
                         f"(e.g. {near(h)} for the height, {near(w)} for the width); resize or pad the input")
    return h // patch, w // patch


def check_image_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> None:
    """Raise a ValueError unless the images have the model's dtype (or a float type under torch.autocast).

    uint8 images would fail deep inside the stem conv, float64 ones with a dtype clash; both name the fix here."""
    if x.dtype == weight_dtype:
        return
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)   # meta has no autocast
    if autocast and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return
    raise ValueError(f"images are {x.dtype} but the model's weights are {weight_dtype}: pass {weight_dtype} images "
                     f"(uint8 pictures: x.float() / 255, then normalise with the ImageNet mean/std), or bf16/fp16 "
                     f"ones under torch.autocast")


def check_ids_keep(ids_keep: torch.Tensor, *, batch_size: int, num_units: int) -> None:
    """Raise a ValueError unless ids_keep is a (B, N_vis) integer tensor of unit indices in [0, N), N_vis >= 1."""
    if ids_keep.dtype not in (torch.int64, torch.int32) or ids_keep.ndim != 2 or ids_keep.shape[0] != batch_size:
        raise ValueError(f"ids_keep must be a (B={batch_size}, N_vis) integer tensor of unit indices, got "
                         f"{tuple(ids_keep.shape)} {ids_keep.dtype} (mim.random_masking returns one)")
    if ids_keep.shape[1] == 0:
        raise ValueError(f"ids_keep keeps no unit of this {num_units}-unit image: at least one unit must stay "
                         f"visible (lower the mask ratio or use larger images)")
    if ids_keep.device.type == "meta" or not ids_keep.numel():           # meta (FLOP counting): no values to check
        return
    if int(ids_keep.min()) < 0 or int(ids_keep.max()) >= num_units:
        raise ValueError(f"ids_keep holds unit indices outside [0, {num_units}) for this {num_units}-unit image")


def units_to_map(units: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Unfold a full unit tensor (B, N, h, w, c) into an image-layout map (B, c, Hp*h, Wp*w) for dense heads."""
    b, n, h, w, c = units.shape
    hp, wp = grid_hw
    x = units.reshape(b, hp, wp, h, w, c)                                 # (B, Hp, Wp, h, w, c)
    x = x.permute(0, 5, 1, 3, 2, 4)                                       # (B, c, Hp, h, Wp, w)
    return x.reshape(b, c, hp * h, wp * w)                                # (B, c, Hp*h, Wp*w)


def map_to_units(x: torch.Tensor, inner: int) -> torch.Tensor:
    """Image-layout map (B, c, Hp*inner, Wp*inner) -> nested units (B, N, inner, inner, c); inverse of units_to_map."""
    b, c, hh, ww = x.shape
    hp, wp = hh // inner, ww // inner
    x = x.reshape(b, c, hp, inner, wp, inner)                             # (B, c, Hp, h, Wp, w)
    x = x.permute(0, 2, 4, 3, 5, 1)                                       # (B, Hp, Wp, h, w, c)
    return x.reshape(b, hp * wp, inner, inner, c)                         # (B, N, h, w, c), unit n = Wp*row + col


def select_units(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Keep entries `ids` along the index dim of t: ids (B, L) on a (B, N, ...) tensor -> (B, L, ...).

    The index dim is the last dim of ids, so ids (B, nW, m) on a (B, nW, n, ...) tensor gives (B, nW, m, ...)
    (tokens grouped in windows). Trailing dims of t are carried along (take_along_dim broadcasts them).
    """
    idx = ids.reshape(*ids.shape, *[1] * (t.ndim - ids.ndim))            # (B, L, 1, ...)
    return torch.take_along_dim(t, idx, dim=ids.ndim - 1)                 # (B, L, ...)


def mask_blend(x: torch.Tensor, m: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x where m == 0, fill where m == 1: x * (1 - m) + fill * m, with m broadcast against x (1 = masked).

    The one formula behind BEiT's mask token (the stage-3 input here, iTPN's distillation), Fast-iTPN's stem mask
    token, SimMIM/FastMIM's masked RGB input and M3I's mixed image (mim.py). Written as the official code writes it
    (`itpn_clip/modeling_pretrain.py`, `forward_features_for_pretraining`), so outputs match to the bit.
    """
    m = m.to(x.dtype)
    return x * (1 - m) + fill.to(x.dtype) * m


def init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0; convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---- 3. Patch embedding into units --------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """4x4 stem conv, then the nested unit layout (B, N, 4, 4, C/4): each 16x16 unit holds 4x4 inner patches."""

    def __init__(self, dim: int, *, inner: int = 4, norm: bool = True, ln_eps: float = LN_EPS):
        super().__init__()
        self.inner = inner                                                # inner patches per unit side (16 / 4)
        self.proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)            # one token per 4x4-px inner patch
        self.norm = nn.LayerNorm(dim, eps=ln_eps) if norm else nn.Identity()

    def forward(self, x):
        x = self.proj(x)                                                  # (B, C/4, 4Hp, 4Wp)
        return self.norm(map_to_units(x, self.inner))                     # (B, N, 4, 4, C/4): unit n = Wp*row + col


# ---- 4. MLP-only blocks -------------------------------------------------------------------------------------------

class MLPBlock(nn.Module):
    """x <- x + DropPath(gamma * MLP(LN(x))) on the last dim: no attention and no spatial mixing at all.

    This is HiViT's early-stage block (Sec. 3.1) and iTPN's C-MLP pyramid block. Because it touches only the channel
    dim, a unit's output depends on that unit alone, which is what allows masked units to be dropped at the input.
    """

    def __init__(self, dim: int, *, mlp_ratio: float, drop_path: float = 0.0, layer_scale: float = 0.0,
                 ln_eps: float = LN_EPS):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MLP(dim, hidden_dim=int(dim * mlp_ratio))
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.mlp(self.norm(x))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)


# ---- 5. Patch merging inside units --------------------------------------------------------------------------------

class PatchMerge(nn.Module):
    """2x2 merge inside every unit: (B, N, h, w, c) -> (B, N, h/2, w/2, 2c). Swin's order TL, BL, TR, BR, LN, Linear.

    The norm comes before the (bias-free) reduction, as in the official `itpn_pixel/models/models_itpn.py`,
    `PatchMerge`.
    """

    def __init__(self, dim: int, *, ln_eps: float = LN_EPS):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=ln_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        tl, bl = x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2]                 # (B, N, h/2, w/2, c) each
        tr, br = x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]
        x = torch.cat([tl, bl, tr, br], dim=-1)                           # (B, N, h/2, w/2, 4c)
        return self.reduction(self.norm(x))                               # (B, N, h/2, w/2, 2c)


# ---- 6. Global attention with relative position bias --------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and an optional relative position bias table.

    `rpe_grid` (Gh, Gw) is the grid the bias table is built for: ((2Gh-1)(2Gw-1), heads), initialised to zeros
    (official). Logits are computed in fp32 and clamped to the finite range before the softmax (official).

    `keep_attention` (default False) is a public switch for pictures: when True, every forward stores its softmax
    probabilities, detached, as `last_attention` (B, heads, N, N) in fp32, each row summing to 1 (finetune.py draws
    the last block's). The softmax is computed explicitly either way, so the switch never changes the output.
    """

    def __init__(self, dim: int, *, num_heads: int, rpe_grid: tuple[int, int] | None = None):
        super().__init__()
        self.keep_attention = False                                       # True: store last_attention (pictures)
        self.last_attention: torch.Tensor | None = None                   # (B, heads, N, N) of the last forward
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rpe_grid = rpe_grid
        if rpe_grid is not None:
            gh, gw = rpe_grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1), num_heads))

    def relative_bias(self, rpe_index: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Bias (B or 1, heads, N, N) for an index from `relative_position_index(grid_hw)` (gathered if masked)."""
        table = self.relative_position_bias_table
        if tuple(grid_hw) != tuple(self.rpe_grid):                        # another resolution: resize the table
            gh, gw = self.rpe_grid
            hp, wp = grid_hw
            table = table.t().reshape(1, -1, 2 * gh - 1, 2 * gw - 1)      # (1, heads, 2Gh-1, 2Gw-1)
            table = F.interpolate(table, size=(2 * hp - 1, 2 * wp - 1), mode="bicubic", align_corners=False)
            table = table.reshape(self.num_heads, -1).t()                 # ((2Hp-1)(2Wp-1), heads)
        bias = table[rpe_index]                                           # (B, N, N, heads)
        return bias.permute(0, 3, 1, 2)                                   # (B, heads, N, N)

    def forward(self, x, *, rpe_index=None, grid_hw=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)   # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                              # 3 x (B, heads, N, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)                     # (B, heads, N, N)
        if self.rpe_grid is not None:
            if rpe_index is None:
                raise ValueError("this Attention has a relative position table: pass rpe_index and grid_hw")
            attn = attn + self.relative_bias(rpe_index, grid_hw)
        fmax = torch.finfo(torch.float32).max
        attn = attn.float().clamp(min=-fmax, max=fmax).softmax(dim=-1)
        if self.keep_attention:
            self.last_attention = attn.detach()                           # (B, heads, N, N), rows sum to 1
        attn = attn.to(v.dtype)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)                   # (B, N, C)
        return self.proj(x)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(g1 * Attn(LN(x))), then x + DropPath(g2 * MLP(LN(x)))."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: float = 0.0, rpe_grid: tuple[int, int] | None = None, ln_eps: float = LN_EPS,
                 quick_gelu: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads=num_heads, rpe_grid=rpe_grid)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MLP(dim, hidden_dim=int(dim * mlp_ratio), quick_gelu=quick_gelu)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x, *, rpe_index=None, grid_hw=None):
        y = self.attn(self.norm1(x), rpe_index=rpe_index, grid_hw=grid_hw)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


# ---- 7. The HiViT model -------------------------------------------------------------------------------------------

class HiViT(nn.Module):
    """HiViT classifier and backbone. forward(x) -> (B, K) logits; forward_features(x, ...) -> stage outputs."""

    def __init__(self, cfg: HiViTConfig):
        super().__init__()
        check_config(cfg, HIVIT_RULES)
        self.cfg = cfg
        c, n1, n2, n3, eps = cfg.embed_dim, cfg.mlp_depth1, cfg.mlp_depth2, cfg.depth, cfg.ln_eps
        self.grid = (cfg.img_size // UNIT, cfg.img_size // UNIT)          # (Hp, Wp) the RPE tables are built for
        ape_side = (cfg.ape_size or cfg.img_size) // UNIT                 # official seg: 14 (224 px) at Hp = 32
        self.ape_grid = (ape_side, ape_side)                              # the APE table's grid, resized per input
        dpr = drop_path_rates(cfg.drop_path_rate, n1 + n2 + n3)          # Sec. 4: merges get no drop path

        def mlp_stage(dim, rates):
            return nn.ModuleList(MLPBlock(dim, mlp_ratio=cfg.bridge_mlp_ratio, drop_path=p,
                                          layer_scale=cfg.layer_scale, ln_eps=eps) for p in rates)

        self.patch_embed = PatchEmbed(c // 4, ln_eps=eps)                 # Sec. 3.1: 4x4 stem + LN
        self.stage1 = mlp_stage(c // 4, dpr[:n1])                         # (B, N, 4, 4, C/4)
        self.merge1 = PatchMerge(c // 4, ln_eps=eps)
        self.stage2 = mlp_stage(c // 2, dpr[n1:n1 + n2])                  # (B, N, 2, 2, C/2)
        self.merge2 = PatchMerge(c // 2, ln_eps=eps)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, ape_side * ape_side, c))
        self.blocks = nn.ModuleList(                                      # stage 3: (B, N, C) tokens
            AttentionBlock(c, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path=p,
                           layer_scale=cfg.layer_scale, rpe_grid=self.grid if cfg.rpe else None, ln_eps=eps)
            for p in dpr[n1 + n2:])
        self.fc_norm = nn.LayerNorm(c, eps=eps) if cfg.num_classes > 0 else None
        self.head = nn.Linear(c, cfg.num_classes) if cfg.num_classes > 0 else None
        self.apply(init_weights)
        nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)         # fine-tune init; MIM: init_pos_embed_sincos

    def init_pos_embed_sincos(self) -> None:
        """Start the (still trainable) APE from MAE's 2-D sin-cos table, as masked pre-training does."""
        init_sincos_(self.absolute_pos_embed, self.ape_grid)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the fine-tuning recipes exempt from weight decay (besides biases and norms)."""
        return {"absolute_pos_embed"} | {n for n, _ in self.named_parameters() if "relative_position_bias" in n}

    # -- the steps of forward_features, in order --

    def embed_units(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None):
        """Stem on the full image, then keep only visible units: ((B, N_vis, 4, 4, C/4), (Hp, Wp))."""
        grid_hw = check_image_size(x)
        check_image_dtype(x, self.patch_embed.proj.weight.dtype)
        if ids_keep is not None:
            check_ids_keep(ids_keep, batch_size=x.shape[0], num_units=grid_hw[0] * grid_hw[1])
        units = self.patch_embed(x)                                       # (B, N, 4, 4, C/4)
        if ids_keep is not None:                                          # Sec. 3.3: drop masked units MAE-style
            units = select_units(units, ids_keep)                         # (B, N_vis, 4, 4, C/4)
        return units, grid_hw

    def forward_early(self, units: torch.Tensor):
        """Stages 1-2 (MLP-only) and both merges: returns f4, f8 and the stage-3 input tokens (B, N_vis, C)."""
        for blk in self.stage1:
            units = blk(units)
        f4 = units                                                        # (B, N_vis, 4, 4, C/4), stride 4
        units = self.merge1(units)                                        # (B, N_vis, 2, 2, C/2)
        for blk in self.stage2:
            units = blk(units)
        f8 = units                                                        # (B, N_vis, 2, 2, C/2), stride 8
        tokens = self.merge2(units)[:, :, 0, 0, :]                        # (B, N_vis, C), stride 16
        return f4, f8, tokens

    def pos_embed_for(self, grid_hw: tuple[int, int], ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """APE for this grid, gathered to the visible units: (1 or B, N_vis, C)."""
        ape = resize_pos_embed(self.absolute_pos_embed, grid_hw,
                               force=self.cfg.ape_quirk and ids_keep is not None)   # (1, N, C)
        if ids_keep is None:
            return ape
        return select_units(ape.expand(ids_keep.shape[0], -1, -1), ids_keep)   # (B, N_vis, C)

    def rpe_index(self, grid_hw: tuple[int, int], ids_keep: torch.Tensor | None = None):
        """Relative-position index (1 or B, N_vis, N_vis), gathered on rows and columns when units are dropped."""
        if not self.cfg.rpe:
            return None
        index = relative_position_index(grid_hw, device=self.absolute_pos_embed.device)[None]   # (1, N, N)
        if ids_keep is None:
            return index
        rows = select_units(index.expand(ids_keep.shape[0], -1, -1), ids_keep)   # (B, N_vis, N): kept queries
        return torch.take_along_dim(rows, ids_keep[:, None, :], dim=2)       # (B, N_vis, N_vis): kept keys

    def forward_stage3(self, tokens: torch.Tensor, *, grid_hw, ids_keep=None) -> list[torch.Tensor]:
        """Run the attention blocks on (B, N_vis, C) tokens that already carry the APE; every block's output."""
        rpe_index = self.rpe_index(grid_hw, ids_keep)
        outs = []
        for blk in self.blocks:
            tokens = blk(tokens, rpe_index=rpe_index, grid_hw=grid_hw)
            outs.append(tokens)                                           # (B, N_vis, C)
        return outs

    def forward_features(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        """The encoder seam: [f4 (B, N_vis, 4, 4, C/4), f8 (B, N_vis, 2, 2, C/2), then every stage-3 block's
        output (B, N_vis, C)]; the last entry is the stage-3 tokens, the input of a head.

        ids_keep: (B, N_vis) unit indices; only these units are processed, in every stage (MAE-style dropping).
        mask, mask_token: (B, N) with 1 = masked and a (1, 1, C) token; the stage-3 input of masked units is
            replaced by the token before the APE is added (BEiT-style, iTPN's CLIP recipe). Stages 1-2 still see
            the masked pixels; use ids_keep for a leak-free encoder.
        """
        if (mask is None) != (mask_token is None):
            raise ValueError("pass mask and mask_token together (or neither)")
        if mask is not None and ids_keep is not None:
            raise ValueError("mask tokens replace masked units, ids_keep drops them: pass one of the two")
        units, grid_hw = self.embed_units(x, ids_keep)
        f4, f8, tokens = self.forward_early(units)
        if mask is not None:
            tokens = mask_blend(tokens, mask[:, :, None], mask_token)     # (B, N, C), mask (B, N, 1)
        tokens = tokens + self.pos_embed_for(grid_hw, ids_keep)
        return [f4, f8, *self.forward_stage3(tokens, grid_hw=grid_hw, ids_keep=ids_keep)]

    def forward(self, x):
        if self.head is None:
            raise ValueError("this HiViT has num_classes=0 (backbone only): call forward_features instead")
        f16 = self.forward_features(x)[-1]                                # (B, N, C)
        return self.head(self.fc_norm(f16.mean(dim=1)))                   # (B, K): mean pool, no CLS token


# ---- 8. The plain ViT (HiViT Tab. 2 row (o)) ----------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """Plain ViT with the same AttentionBlock. forward(x) -> (B, K); forward_features -> every block's tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        check_config(cfg, VIT_RULES)
        self.cfg = cfg
        c, p = cfg.embed_dim, cfg.patch_size
        self.grid = (cfg.img_size // p, cfg.img_size // p)
        self.patch_embed = nn.Conv2d(3, c, kernel_size=p, stride=p)      # one token per unit
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], c))   # patch positions only
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, c)) if cfg.class_token else None
        self.norm_pre = nn.LayerNorm(c, eps=cfg.ln_eps) if cfg.pre_norm else None
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            AttentionBlock(c, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path=r, ln_eps=cfg.ln_eps,
                           quick_gelu=cfg.quick_gelu) for r in dpr)
        self.norm = nn.LayerNorm(c, eps=cfg.ln_eps)
        self.fc_norm = nn.LayerNorm(c, eps=cfg.ln_eps) if cfg.num_classes > 0 else None
        self.head = nn.Linear(c, cfg.num_classes) if cfg.num_classes > 0 else None
        self.apply(init_weights)
        for t in (self.pos_embed, self.cls_token, self.cls_pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)

    def init_pos_embed_sincos(self) -> None:
        """Start the (trainable) patch position table from MAE's 2-D sin-cos table (MAE freezes it; we do not)."""
        init_sincos_(self.pos_embed, self.grid)

    def no_weight_decay(self) -> set[str]:
        """Position tables and the CLS token (those this model has) are exempt from weight decay, as in MAE."""
        return {"pos_embed"} | ({"cls_token", "cls_pos_embed"} if self.cls_token is not None else set())

    def forward_features(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None):
        """Same seam as HiViT.forward_features, but returns a list of every block's patch tokens (B, N_vis, C).

        The CLS token (if any) is dropped from the outputs. The last entry is after the final LayerNorm (what MAE's
        encoder and CLIP's ln_post return); earlier entries are raw block outputs (iTPN-on-ViT taps layers 4, 7).
        """
        if (mask is None) != (mask_token is None):
            raise ValueError("pass mask and mask_token together (or neither)")
        grid_hw = check_image_size(x, self.cfg.patch_size)
        check_image_dtype(x, self.patch_embed.weight.dtype)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)          # (B, N, C)
        if mask is not None:
            tokens = mask_blend(tokens, mask[:, :, None], mask_token)     # (B, N, C), mask (B, N, 1)
        tokens = tokens + resize_pos_embed(self.pos_embed, grid_hw)       # (B, N, C)
        if ids_keep is not None:
            check_ids_keep(ids_keep, batch_size=x.shape[0], num_units=tokens.shape[1])
            tokens = select_units(tokens, ids_keep)                       # (B, N_vis, C)
        n_cls = 0
        if self.cls_token is not None:
            cls = (self.cls_token + self.cls_pos_embed).expand(tokens.shape[0], -1, -1)   # (B, 1, C)
            tokens = torch.cat([cls, tokens], dim=1)                      # (B, 1 + N_vis, C)
            n_cls = 1
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        outs = []
        for blk in self.blocks:
            tokens = blk(tokens)
            outs.append(tokens[:, n_cls:])                                # (B, N_vis, C)
        outs[-1] = self.norm(outs[-1])
        return outs

    def forward(self, x):
        if self.head is None:
            raise ValueError("this ViT has num_classes=0 (backbone only): call forward_features instead")
        return self.head(self.fc_norm(self.forward_features(x)[-1].mean(dim=1)))   # (B, K)


# ---- 9. Reading checkpoint files, loading official checkpoints ----------------------------------------------------

# Keys that exist only in official *pre-training* checkpoints (pyramid, decoders, MIM/CLIP heads): a classifier
# ignores them, and `load_official` reports them in its return value.
PRETRAIN_ONLY_PREFIXES = (
    "mask_token", "decoder_", "align_dim_", "split_16to8.", "split_8to4.", "block_16to8.", "block_8to4.",
    "fpn_modules.", "lm_head.", "lm_cls_head.", "norm.", "norm_cls.", "cls_pt_layers.",
)


def map_official_key(key: str, *, mlp_depth1: int, mlp_depth2: int) -> str | None:
    """Official HiViT/iTPN backbone key -> our key (None for derived buffers). Non-backbone keys pass unchanged.

    Official `blocks.{i}` is one flat list: [0, n1) stage-1 MLP blocks, n1 merge 1, then n2 stage-2 MLP blocks,
    merge 2 at n1+n2+1, then the attention blocks.
    """
    if key.endswith("relative_position_index"):                          # derived buffer, recomputed here
        return None
    if not key.startswith("blocks."):
        return key
    _, i, rest = key.split(".", 2)
    i, n1, n2 = int(i), mlp_depth1, mlp_depth2
    if i < n1 or n1 < i <= n1 + n2:                                       # MLP-only block: norm2 -> norm, gamma_2
        stage, j = ("stage1", i) if i < n1 else ("stage2", i - n1 - 1)
        rest = {"norm2.weight": "norm.weight", "norm2.bias": "norm.bias", "gamma_2": "gamma"}.get(rest, rest)
        return f"{stage}.{j}.{rest}"
    if i == n1:
        return f"merge1.{rest}"
    if i == n1 + n2 + 1:
        return f"merge2.{rest}"
    return f"blocks.{i - n1 - n2 - 2}.{rest}"


def read_checkpoint(path: str, *, what: str = "checkpoint") -> dict:
    """The one reader of checkpoint-like files (train.py --resume, finetune.py --finetune, itpn.py's teachers, ...):
    torch.load(weights_only=True), so no pickled code is ever run, with one ValueError per kind of bad file.

    `what` names the file's role in the messages (a flag such as "--resume", or "teacher"). Returns the dict as
    stored; hivit.unwrap_checkpoint finds the state_dict inside it."""
    if os.path.isdir(path or ""):
        raise ValueError(f"{what} {path!r} is a folder: pass the checkpoint file inside it")
    if not path or not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} not found: no such file (a local file is needed; nothing is downloaded)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                                             # torch raises many types here
        if "Unsupported global" in str(err):                              # weights_only met a pickled class
            reason = ("it holds pickled Python objects, which are not loaded from files (they could run code); "
                      "re-save its tensors as a plain dict")
        else:
            reason = f"it is not a PyTorch checkpoint or it is truncated ({type(err).__name__})"
        raise ValueError(f"{what} {path!r} cannot be read: {reason}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def unwrap_checkpoint(ckpt: dict) -> dict:
    """Find the state_dict in an official file ({'model'|'module'|'state_dict': sd} or sd) and strip 'module.'.

    Anything but a dict with string keys is a ValueError that says what is expected (a path: read_checkpoint)."""
    if not isinstance(ckpt, dict) or not all(isinstance(k, str) for k in ckpt):
        got = f"the str {ckpt!r}" if isinstance(ckpt, (str, os.PathLike)) else \
            ("a dict with non-string keys" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        fix = ": read the file first, hivit.read_checkpoint(path)" if isinstance(ckpt, (str, os.PathLike)) else ""
        raise ValueError(f"expected a state dict (name -> tensor), or a checkpoint dict holding one under 'model', "
                         f"'module' or 'state_dict'; got {got}{fix}")
    for k in ("model", "module", "state_dict"):
        if isinstance(ckpt.get(k), dict):
            ckpt = ckpt[k]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def check_state_dict(found: dict, expected: dict, *, what: str, hint: str, names: dict | None = None,
                     allow_missing: tuple[str, ...] = ()) -> None:
    """Raise unless `found` (key -> tensor) fills `expected` (key -> shape) key for key, shape for shape.

    First a KeyError naming every missing key and every unexpected one (under `names[key]`, the checkpoint's own
    name, when given), then a ValueError naming every shape mismatch with both shapes. `allow_missing`: key prefixes
    that may stay at their init. `what` says what failed to match, `hint` what the user should check. Every strict
    loader of this project (hivit, itpn, fast_itpn, itpn's teachers) reports through this one function.
    """
    not_tensors = sorted((names or {}).get(k, k) for k, v in found.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{what}: entries that are not tensors: {not_tensors[:8]} (a state dict maps names to "
                         f"tensors; {hint})")
    unexpected = sorted((names or {}).get(k, k) for k in set(found) - set(expected))
    missing = sorted(k for k in set(expected) - set(found) if not k.startswith(tuple(allow_missing)))
    if unexpected or missing:
        raise KeyError(f"{what}: missing keys {missing}, unexpected keys {unexpected} ({hint})")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
             for k, v in found.items() if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise ValueError(f"{what}: shape mismatch ({hint}): " + "; ".join(wrong))


def load_official(model: nn.Module, state_dict: dict, *, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Strictly load an official HiViT/iTPN classifier checkpoint into a HiViT; returns the ignored keys.

    Errors (check_state_dict) name missing keys by our name and unexpected keys by the file's name. Ignored, and
    returned: `relative_position_index` buffers and the pre-training-only keys in PRETRAIN_ONLY_PREFIXES.
    `allow_missing`: key prefixes our model may keep at init (e.g. ("head.", "fc_norm.") when fine-tuning from a
    pre-training checkpoint).
    """
    cfg = model.cfg
    ours = model.state_dict()
    mapped, source, ignored = {}, {}, []
    for key, value in unwrap_checkpoint(state_dict).items():
        new = map_official_key(key, mlp_depth1=cfg.mlp_depth1, mlp_depth2=cfg.mlp_depth2)
        if new is None or (new not in ours and new.startswith(PRETRAIN_ONLY_PREFIXES)):
            ignored.append(key)
            continue
        mapped[new], source[new] = value, key
    check_state_dict(mapped, {k: v.shape for k, v in ours.items()}, names=source, allow_missing=allow_missing,
                     what=f"official checkpoint does not match {type(model).__name__}",
                     hint="check the preset: depths, rpe, layer_scale, num_classes, and build the model at the "
                          "checkpoint's img_size")
    model.load_state_dict(mapped, strict=not allow_missing)
    return ignored


# ---- 10. Smoke demo -----------------------------------------------------------------------------------------------

def count_params(model_class: type[nn.Module], cfg) -> int:
    """Parameter count of `model_class(cfg)` without allocating memory (meta device); any file's model."""
    with torch.device("meta"):
        model = model_class(cfg)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    torch.manual_seed(0)
    model = HiViT(PRESETS["tiny"])
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)                                    # [f4, f8, each stage-3 block's output]
    print(f"tiny HiViT on {tuple(x.shape)}: stage 1 {tuple(feats[0].shape)}, stage 2 {tuple(feats[1].shape)}, "
          f"stage 3 {tuple(feats[-1].shape)} ({len(feats) - 2} blocks)")
    ids_keep = torch.rand(2, 16).argsort(dim=1)[:, :4]                    # keep 4 of 16 units (75% masked)
    print("visible units only:", [tuple(f.shape) for f in model.forward_features(x, ids_keep=ids_keep)])
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    print(f"forward + backward ok, loss {loss.item():.4f}")
    for name, cfg in {**PRESETS, **VIT_PRESETS}.items():
        model_class = HiViT if isinstance(cfg, HiViTConfig) else VisionTransformer
        print(f"{name:9s} {count_params(model_class, cfg) / 1e6:9.3f}M parameters")
