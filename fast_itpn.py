"""Fast-iTPN: the iTPN pyramid on a ConvMLP/SwiGLU HiViT, plus token migration and token gathering.

Paper:
    Fast-iTPN: Integrally Pre-Trained Transformer Pyramid Network with Token Migration
    (Tian et al., TPAMI 2024, arXiv 2211.12735 v2; its Sec. 3 is iTPN, Sec. 4 Fast-iTPN, Sec. 5 experiments).

Implements:
    The Fast-iTPN backbone exactly as the released fine-tuning models build it (`load_official` loads them strictly),
    with the iTPN feature pyramid from itpn.py for dense outputs, and the two acceleration methods of Sec. 4 that were
    never released in any public code: token migration (Sec. 4.1) and token gathering (Sec. 4.2). Both are switches
    on the same weights (`set_acceleration`); with both off the forward is the plain one.

Sections:
    1. Config and presets                 <-> Tab. 2 (architecture); official `fast_itpn/modeling_finetune.py`
    2. Primitives: per-pixel LN, ConvMLP, SwiGLU <-> Tab. 2 "ConvMLP", "SwiGLU", sub-LN
    3. Early stages: stem, ConvMLP blocks, conv merge <-> Tab. 2 (MLP-only stages 1-2, LN + 2x2 conv merge)
    4. Stage-3 attention: global, window, gathering <-> Tab. 2 (q/v bias), Sec. 4.2, Fig. 4, Tab. 7 (HRPE)
    5. Token migration: schedule, selection, replenishing <-> Sec. 4.1, Fig. 3, Fig. 5
    6. The stage-3 block                  <-> Tab. 2 (SwiGLU, layer scale), Sec. 4.1 (where tokens leave)
    7. The Fast-iTPN model: backbone, pyramid, dense outputs <-> Sec. 4, Fig. 3 (replenish into the pyramid)
    8. Pre-training: frozen-teacher distillation, stem masking <-> Sec. 4.3, 5.1 (never released)
    9. Loading official checkpoints       <-> released Fast-iTPN-T/S/B/L fine-tuning models
    10. __main__ smoke demo

Shapes:
    B batch, C stage-3 width (stage 1 = C/4, stage 2 = C/2), H, W image size, Hp, Wp grid of 16x16 units,
    N = Hp*Wp stage-3 tokens, F pyramid width, K classes. Early stages use the image layout (B, c, H/s, W/s).
    Windows: nW windows of wh x ww tokens, n <= wh*ww tokens left per window (fewer after migration),
    L = n (+1 with a gathering token at index 0), M = nW*n tokens left in the backbone, R tokens migrated.
    pos: (B, nW, n) original row-major index (0..N-1) of every token still in the backbone.

Differences from the paper / official code:
    - Module names: `stage1`, `merge1`, `stage2`, `merge2`, `blocks` (stage 3) instead of one flat `blocks.{i}`
      list; early blocks call their norm `norm` (official `norm2`). `load_official` renames; outputs are identical.
    - The early stages run in image layout (official), but `forward_features` returns HiViT's unit tensors, so
      itpn.py's pyramid (F = 256, fpn_depth = 1; Fast-iTPN's dense code is unreleased) and mim.py's methods apply.
    - Left out: the official RPE option (off in every released model), `xops.SwiGLU` and `stop_grad_conv1`. Other
      input sizes interpolate the position table (pos_embed_for); attention uses `F.scaled_dot_product_attention`
      (official: explicit fp32 logits; outputs agree to float rounding, tested).
    - Token migration and token gathering (Sec. 4.1-4.2) have no official code: every equation is ours, and each
      open choice is stated with its reason in the docstring that makes it (window_shape, migration_schedule,
      select_migrants, replenish, FastAttention, FastBlock.forward_windows, FastiTPN.forward_stage3). They also
      work for classification (the paper: dense fine-tuning only). Windows divide the grid (no padding): a side
      with no window of 2..window_size tokens (208 px = 13 units) is refused with the nearest sizes that work.
    - Pre-training (Sec. 4.3) was never released: FastiTPNDistillPretrainer is our reading of it.

Run:
    # read in import order: hivit -> mim -> itpn -> fast_itpn -> train -> finetune -> detect_seg (4th)
    python fast_itpn.py                                 # CPU smoke demo, a few seconds
    python bench.py --suite fast_itpn                   # Fig. 5 / Tab. 7 speed studies at 512 px
    torchrun --nproc_per_node 8 train.py --model fast_itpn_b --method fast_itpn_distill --teacher PATH
    # pre-trainer as in itpn.py: METHODS[name](preset, cfg=PRETRAIN_PRESETS[name], teacher_path=PATH)
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hivit import (HIVIT_RULES, LN_EPS, DropPath, check_config, check_image_dtype, check_image_size, count_params,
                   drop_path_rates, init_sincos_, init_weights, load_official as hivit_load_official, map_to_units,
                   mask_blend, resize_pos_embed, select_units)
from mim import mask_to_map
from itpn import (ITPN_RULES, FeaturePyramid, PRETRAIN_PRESETS as ITPN_PRETRAIN_PRESETS, PyramidDistillation,
                  distillation_mask, iTPNPretrainConfig, pyramid_maps)

__all__ = [
    "FastiTPNConfig", "PRESETS", "ATTENTION_MODES",
    "LayerNorm2d", "ConvMLP", "SwiGLU", "ConvPatchEmbed", "ConvMLPBlock", "ConvPatchMerge",
    "FastAttention", "FastBlock", "FastiTPN",
    "window_shape", "migration_schedule", "select_migrants", "replenish",
    "FastiTPNDistillPretrainer", "PRETRAIN_PRESETS", "METHODS", "load_official",
]

ATTENTION_MODES = ("global", "window", "gathering")   # Tab. 7 rows: global MSA, WMSA, WMSA + gathering tokens
MAX_MIGRATION = 0.5               # rho < 1/2: with a constant r, rho = 1/2 would empty every window by the last layer


# ---- 1. Config and presets ----------------------------------------------------------------------------------------

@dataclass
class FastiTPNConfig:
    img_size: int = 224           # side the position table is built for (px); other sizes are interpolated
    embed_dim: int = 512          # C, stage-3 width; stage 1 is C/4, stage 2 is C/2 (Tab. 2)
    mlp_depth1: int = 3           # ConvMLP blocks in stage 1 (literal count)
    mlp_depth2: int = 3           # ConvMLP blocks in stage 2
    depth: int = 24               # D, attention blocks in stage 3
    num_heads: int = 8            # stage-3 heads, head_dim 64 in every paper config
    mlp_ratio: float = 3.0        # hidden ratio of ConvMLP and SwiGLU alike (Tab. 2; SwiGLU NOT 2/3-scaled)
    layer_scale: float = 0.1      # gamma init of stage-3 blocks (official init_values); early blocks have none
    drop_path_rate: float = 0.0   # stochastic depth, linear 0 -> rate over ConvMLP + attention blocks
    num_classes: int = 1000       # K; 0 = no head but the itpn.py feature pyramid (as itpn.py: dense/pre-training)
    fpn_dim: int = 256            # F, pyramid width (iTPN's; Fast-iTPN gives none)
    fpn_depth: int = 1            # C-MLP fusion blocks per top-down step (iTPN det/CLIP recipes use 1)
    window_size: int = 8          # tokens per window side for window attention and migration groups (ours)
    migration_ratio: float = 0.0  # rho, share of stage-3 token computation removed by migration, < 0.5 (Fig. 5)
    attention: str = "global"     # one of ATTENTION_MODES (Tab. 7); a run-time switch on the same weights
    hrpe: bool = False            # relative position bias on window attention only (Tab. 7 "HRPE"); adds tables


# Tab. 2 sizes as the released builders (`fast_itpn/modeling_finetune.py`, `fast_itpn_*_patch16_224`): exactly
# 24.220M / 39.903M / 84.825M / 312.017M parameters at 224 px; the paper's 40.0 / 85.2 / 312.3M count the position
# table at 384 / 512 / 384 px (tested).
PRESETS: dict[str, FastiTPNConfig] = {
    "tiny": FastiTPNConfig(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2,
                           num_classes=10, fpn_dim=32, window_size=2),
    "fast_itpn_t": FastiTPNConfig(embed_dim=384, mlp_depth1=1, mlp_depth2=1, depth=12, num_heads=6),
    "fast_itpn_s": FastiTPNConfig(embed_dim=384, mlp_depth1=2, mlp_depth2=2, depth=20, num_heads=6),
    "fast_itpn_b": FastiTPNConfig(embed_dim=512, mlp_depth1=3, mlp_depth2=3, depth=24, num_heads=8),
    "fast_itpn_l": FastiTPNConfig(embed_dim=768, mlp_depth1=2, mlp_depth2=2, depth=40, num_heads=12),
}


# ---- 2. Primitives: per-pixel LayerNorm, ConvMLP, SwiGLU ----------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of every pixel of a (B, c, h, w) map (what the official early stages do)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)                                         # (B, h, w, c)
        return super().forward(x).permute(0, 3, 1, 2)                     # (B, c, h, w)


class ConvMLP(nn.Module):
    """Per-pixel MLP written with 1x1 convs: fc1 -> GELU -> LN (sub-LN) -> fc2 (Tab. 2 "ConvMLP").

    Kernel 1 means no spatial mixing: it is exactly a Linear on every pixel (tested), kept as convs so the official
    weights (out, in, 1, 1) load unchanged and the maps stay in image layout.
    """

    def __init__(self, dim: int, *, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.ffn_ln = LayerNorm2d(hidden_dim, eps=LN_EPS)                 # sub-LN on the hidden layer
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x):
        return self.fc2(self.ffn_ln(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """Stage-3 MLP: w3(LN(SiLU(w1 x) * w2 x)), hidden = mlp_ratio * d (not the usual 2/3 scaling; Tab. 2)."""

    def __init__(self, dim: int, *, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)                              # gate
        self.w2 = nn.Linear(dim, hidden_dim)                              # value
        self.ffn_ln = nn.LayerNorm(hidden_dim, eps=LN_EPS)                # sub-LN
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


# ---- 3. Early stages: stem, ConvMLP blocks, conv merge ------------------------------------------------------------

class ConvPatchEmbed(nn.Module):
    """4x4/4 stem conv to (B, C/4, H/4, W/4); no LayerNorm (official patch_norm=False). SimMIM-style stem masking.

    mask (B, N), 1 = masked: every masked 16-px unit (a 4x4 block of stem pixels) is replaced by `mask_token`
    (the hint in the released `fast_itpn/modeling_finetune.py`, `ConvPatchEmbed`, whose `bool_masked_pos` path
    replaces 4x4 stem blocks). Pre-training only; the token exists only then.
    """

    def __init__(self, dim: int, *, mask_token: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 4, 4)) if mask_token else None   # one 16-px unit

    def forward(self, x, *, mask: torch.Tensor | None = None):
        x = self.proj(x)                                                  # (B, C/4, 4Hp, 4Wp)
        if mask is None:
            return x
        if self.mask_token is None:
            raise ValueError("stem masking (mask=...) needs the learned mask token, which exists only for "
                             "pre-training: build the model with FastiTPN(cfg, stem_mask_token=True)")
        hp, wp = x.shape[-2] // 4, x.shape[-1] // 4
        m = mask_to_map(mask, (hp, wp), 4)[:, None]                       # (B, 1, 4Hp, 4Wp): unit -> its 4x4 pixels
        token = self.mask_token.repeat(1, 1, hp, wp)                      # (1, C/4, 4Hp, 4Wp)
        return mask_blend(x, m, token)                                    # (B, C/4, 4Hp, 4Wp)


class ConvMLPBlock(nn.Module):
    """x <- x + DropPath(ConvMLP(LN(x))) on a (B, c, h, w) map: HiViT's MLP-only block in image layout, no gamma."""

    def __init__(self, dim: int, *, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=LN_EPS)
        self.mlp = ConvMLP(dim, hidden_dim=int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.norm(x)))


class ConvPatchMerge(nn.Module):
    """LN per pixel, then a 2x2/2 conv with bias: (B, c, h, w) -> (B, 2c, h/2, w/2) (Tab. 2 "conv merge").

    A 2x2 stride-2 conv never crosses a 16-px unit boundary (units are 4x4 and 2x2 pixels at strides 4 and 8), so
    units stay independent before stage 3, as in HiViT. Equal to concat(2x2 pixels) -> Linear (tested).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=LN_EPS)
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=2, stride=2)

    def forward(self, x):
        return self.reduction(self.norm(x))


# ---- 4. Stage-3 attention: global, window, window + gathering tokens ----------------------------------------------

def window_shape(grid_hw: tuple[int, int], window_size: int) -> tuple[int, int]:
    """(wh, ww): per side, the largest divisor of the grid side that is <= window_size (ours; 14 -> 7, 32 -> 8).

    Window size (open choice): `window_size` = 8 tokens per side, so a 512-px image (32x32 tokens) has 4x4 windows
    of 64 tokens, and a side that 8 does not divide uses its largest divisor <= 8 (14 -> 7 at 224 px). Why: 8 keeps
    >= 16 windows at the paper's 512-px dense inputs and divisors avoid padding tokens that would need masking in
    every layer. A side > 1 with no divisor in 2..window_size (a prime above it: 11, 13, 17, 19, 23, ... units) would
    give windows one token wide: window attention would mix nothing along it and every migration group would hold
    one token (r = 0). Such a side is refused (ValueError) with the nearest sides that work; padding it to whole
    windows and masking the padding (Swin) is the alternative this file does not take.
    """
    def works(side: int) -> bool:
        return side == 1 or any(side % d == 0 for d in range(2, min(window_size, side) + 1))

    for side in grid_hw:
        if not works(side):
            lower = next(t for t in range(side - 1, 0, -1) if works(t))
            upper = next((t for t in range(side + 1, 2 * side + 2) if works(t)), None)
            sizes = f"{lower * 16} px ({lower} units)" + (f" or {upper * 16} px ({upper} units)" if upper else "")
            raise ValueError(f"window attention / token migration cannot split a {side}-unit side ({side * 16} px) "
                             f"into windows of 2..{window_size} tokens ({side} has no divisor there), so its windows "
                             f"would be 1 token wide and mix nothing: use {sizes} for that side, or "
                             f"attention='global' with migration_ratio=0 (the plain path takes any size)")
    return tuple(max(d for d in range(1, min(window_size, s) + 1) if s % d == 0) for s in grid_hw)


def window_partition(x: torch.Tensor, grid_hw, win) -> torch.Tensor:
    """(B, N, ...) row-major tokens -> (B, nW, wh*ww, ...) windows in raster order, tokens raster-ordered inside."""
    (hp, wp), (wh, ww) = grid_hw, win
    b, rest = x.shape[0], x.shape[2:]
    x = x.reshape(b, hp // wh, wh, wp // ww, ww, *rest)                  # (B, nWh, wh, nWw, ww, ...)
    x = x.transpose(2, 3)                                                 # (B, nWh, nWw, wh, ww, ...)
    return x.reshape(b, (hp // wh) * (wp // ww), wh * ww, *rest)          # (B, nW, wh*ww, ...)


class FastAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, learnable q and v biases and no k bias (Tab. 2).

    forward(x) is plain global attention on (B, N, C). forward_windows(x) works on windowed tokens (B, nW, L, C) in
    one of three modes (Tab. 7): "global" (every token sees every token; windows only group tokens for migration),
    "window" (attention inside each window) and "gathering" (index 0 of every window is a gathering token, Sec. 4.2).
    It also returns the head-averaged keys that token migration scores (Sec. 4.1).

    Gathering tokens (open choice): one per window, initialised as the mean of the window's tokens at the first
    stage-3 layer, then carried through every block like a CLS token (same LN, attention weights, MLP, layer scale;
    no new parameters, so gathering is a switch on the released weights). Per layer, one attention with this
    pattern: a token attends to the tokens of its window and to its window's gathering token (window attention +
    broadcast), a gathering token attends to itself and to every token of the image (global gathering; q.k only
    between gathering tokens and tokens, never token-token across windows). Gathering tokens are dropped at the
    end. Why: a joint softmax keeps every token's attention weights summing to 1, as in the weights it was trained
    with; the window's global context arrives one layer after it is gathered.
    Limiting case (tested): with one window covering the map, the gathering path equals the plain block applied to
    [mean token; tokens], i.e. a ViT with a mean-initialised CLS token; without gathering tokens, one window equals
    plain global attention.

    `keep_attention` (default False) is hivit.Attention's switch for pictures: when True, forward(x) computes the
    logits explicitly (scale hd^-0.5, as `scaled_dot_product_attention` uses) and stores the fp32 softmax
    probabilities, detached, as `last_attention` (B, heads, N, N). The fused kernel otherwise; the two agree to
    float rounding.
    Only the plain global path records: with token migration or window attention no N x N map exists.
    """

    def __init__(self, dim: int, *, num_heads: int, hrpe_window: int | None = None):
        super().__init__()
        self.keep_attention = False                                       # True: store last_attention (pictures)
        self.last_attention: torch.Tensor | None = None                   # (B, heads, N, N) of the last forward
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))                      # k has no bias: it would cancel in softmax
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.hrpe_window = hrpe_window
        if hrpe_window is not None:                                       # Tab. 7 HRPE, zero init (ours)
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * hrpe_window - 1) ** 2, num_heads))

    def split_heads(self, x):
        """(..., T, C) -> q, k, v each (..., heads, T, hd)."""
        *lead, t, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        return [y.reshape(*lead, t, self.num_heads, c // self.num_heads).transpose(-3, -2)   # (..., heads, T, hd)
                for y in (q, k, v)]

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.split_heads(x)                                     # 3 x (B, heads, N, hd)
        if self.keep_attention:                                           # the explicit softmax, for pictures
            logits = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)   # (B, heads, N, N)
            attn = logits.softmax(dim=-1)                                 # (B, heads, N, N), rows sum to 1
            self.last_attention = attn.detach()
            x = attn.to(v.dtype) @ v                                      # (B, heads, N, hd)
        else:
            x = F.scaled_dot_product_attention(q, k, v)                   # (B, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))              # (B, N, C)

    def window_bias(self, pos: torch.Tensor, grid_w: int, *, gathering: bool) -> torch.Tensor:
        """HRPE for the tokens left in each window: (B*nW, heads, L, L), 0 on the gathering token's row/column.

        HRPE (`hrpe=True`, open choice): a zero-initialised relative position bias table ((2*window_size-1)^2, heads)
        per block, indexed by the original 2-D offsets of the tokens left in a window, on window attention only
        (0 bias for the gathering token). Zero init keeps the released weights' outputs until fine-tuning moves it.
        """
        s = self.hrpe_window
        rows, cols = pos // grid_w, pos % grid_w                          # (B, nW, n) each
        d_row = rows[..., :, None] - rows[..., None, :] + s - 1           # (B, nW, n, n), in [0, 2s-2]
        d_col = cols[..., :, None] - cols[..., None, :] + s - 1           # (B, nW, n, n), in [0, 2s-2]
        bias = self.relative_position_bias_table[d_row * (2 * s - 1) + d_col]   # (B, nW, n, n, heads)
        bias = bias.flatten(0, 1).permute(0, 3, 1, 2)                     # (B*nW, heads, n, n)
        return F.pad(bias, (1, 0, 1, 0)) if gathering else bias          # (B*nW, heads, L, L)

    def forward_windows(self, x, *, mode: str, pos=None, grid_w=None):
        """x (B, nW, L, C) -> (out (B, nW, L, C), keys (B, nW, L, hd) averaged over heads for migration)."""
        if self.keep_attention:
            raise ValueError("keep_attention records the plain global path only: switch token migration and window "
                             "attention off (set_acceleration(migration_ratio=0.0, attention='global'))")
        b, nw, t, c = x.shape
        if mode == "global":                                              # windows are only migration groups
            groups = x.reshape(b, nw * t, c)                              # (B, nW*L, C): one sequence per image
        else:                                                             # Sec. 4.2: batched window attention
            groups = x.reshape(b * nw, t, c)                              # (B*nW, L, C): one sequence per window
        q, k, v = self.split_heads(groups)                                # 3 x (B | B*nW, heads, nW*L | L, hd)
        bias = None
        if mode != "global" and self.hrpe_window is not None:
            bias = self.window_bias(pos, grid_w, gathering=mode == "gathering").to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)    # (B | B*nW, heads, nW*L | L, hd)
        if mode == "gathering":                                           # index 0: attend globally instead
            q, k, v, out = (y.reshape(b, nw, *y.shape[1:]) for y in (q, k, v, out))   # (B, nW, heads, L, hd)
            out = torch.cat([self.gather_globally(q, k, v), out[..., 1:, :]], dim=3)  # (B, nW, heads, L, hd)
            out = out.flatten(0, 1)                                       # (B*nW, heads, L, hd)
        keys = k.mean(dim=-3).reshape(b, nw, t, -1)                       # (B, nW, L, hd), ToMe's head average
        out = out.transpose(1, 2).reshape(b, nw, t, c)                    # (B, nW, L, C)
        return self.proj(out), keys

    @staticmethod
    def gather_globally(q, k, v):
        """Gathering tokens (index 0 of each window) attend to every token and to themselves (Sec. 4.2, Fig. 4).

        q, k, v: (B, nW, heads, L, hd). Returns (B, nW, heads, 1, hd). The other gathering tokens are masked out,
        so q.k is computed only between a gathering token and tokens (plus its own key, as a CLS token has).
        """
        b, nw, h, t, d = k.shape
        q_g = q[:, :, :, 0].transpose(1, 2)                               # (B, heads, nW, hd)
        k_all = k.transpose(1, 2).reshape(b, h, nw * t, d)                # (B, heads, nW*L, hd)
        v_all = v.transpose(1, 2).reshape(b, h, nw * t, d)                # (B, heads, nW*L, hd)
        is_g = torch.zeros(nw, t, dtype=torch.bool, device=q.device)
        is_g[:, 0] = True                                                 # (nW, L): gathering-token keys
        own = torch.eye(nw, dtype=torch.bool, device=q.device)[:, :, None]   # (nW, nW, 1): my own window
        allowed = (~is_g[None] | own).reshape(nw, nw * t)                 # (nW, nW*L): tokens + own gathering token
        out = F.scaled_dot_product_attention(q_g, k_all, v_all, attn_mask=allowed)  # (B, heads, nW, hd)
        return out.transpose(1, 2)[:, :, :, None]                         # (B, nW, heads, 1, hd)


# ---- 5. Token migration: schedule, selection, replenishing --------------------------------------------------------

def migration_schedule(n: int, depth: int, ratio: float) -> list[int]:
    """r_l, tokens migrated per window by each of the D layers (ours, Sec. 4.1, Fig. 5).

    r per layer (open choice): `migration_ratio` rho is the share of stage-3 token computation that migration
    removes, i.e. averaged over the D layers rho*n of a window's n tokens are gone. With ToMe's constant r that
    gives r = 2*rho*n/(D+1) per layer (rounded cumulatively; rho < 0.5), so at rho = 0.4 about 80% of the tokens
    have left when stage 3 ends. Why: "from the first stage-3 layer on, per layer" (Sec. 4.1) suggests ToMe's
    constant r, and the other reading, rho = the fraction gone at the end, cannot reach Fig. 5's speed-ups (+15% at
    10%, +27% at 40%, reported with Mask R-CNN) even in the FLOPs of backbone + pyramid alone (bench.py counts them).
    """
    if not 0.0 <= ratio < MAX_MIGRATION:
        raise ValueError(f"migration_ratio must be in [0, {MAX_MIGRATION}), got {ratio}")
    rate = 2 * ratio * n / (depth + 1)                                    # constant r (may be fractional)
    done = [min(n - 1, round(rate * (l + 1))) for l in range(depth)]     # tokens gone after layer l
    r = [d - prev for d, prev in zip(done, [0] + done[:-1])]
    left = [n - d for d in [0] + done[:-1]]                               # tokens entering layer l
    if any(r_l > (m + 1) // 2 for r_l, m in zip(r, left)):                # at most all of set A per layer
        raise ValueError(f"migration_ratio {ratio} drops more than set A holds in one layer (n={n}, D={depth})")
    return r


def select_migrants(keys: torch.Tensor, r: int):
    """Pick the r set-A tokens per window most similar to set B (Sec. 4.1, Fig. 3; formulas ours).

    keys (B, nW, n, hd) head-averaged keys of the tokens, in window raster order. Returns drop (B, nW, r), partner
    (B, nW, r) (the most similar B token of each dropped one) and keep (B, nW, n - r), all positions in 0..n-1;
    keep is ascending, so the survivors stay in raster order.
    A/B split (open choice): tokens at even positions of each window's sequence (kept in raster order) are set A,
    odd are set B (ToMe's alternation). Why: every A token has B neighbours in its row, and the split needs no
    parameters.
    Similarity (open choice): cosine of the head-averaged attention keys, score(a) = max_b cos(k_a, k_b); the r
    highest-scoring A tokens leave. Why: the keys are what attention compares, so near-duplicate keys get
    near-duplicate attention and a dropped token is one the others barely miss (ToMe's argument).
    """
    k = F.normalize(keys.float(), dim=-1)
    sim = k[..., 0::2, :] @ k[..., 1::2, :].transpose(-1, -2)             # (B, nW, nA, nB) cosine A-to-B
    score, best_b = sim.max(dim=-1)                                       # (B, nW, nA)
    drop_a = score.argsort(dim=-1, descending=True)[..., :r]              # (B, nW, r) indices into A
    drop = 2 * drop_a                                                     # (B, nW, r) positions in the window
    partner = 2 * best_b.gather(-1, drop_a) + 1                           # (B, nW, r) positions of B partners
    gone = torch.zeros(keys.shape[:-1], device=keys.device).scatter(-1, drop, 1.0)   # (B, nW, n)
    keep = gone.argsort(dim=-1, stable=True)[..., :keys.shape[-2] - r]    # (B, nW, n-r), ascending
    return drop, partner, keep


def replenish(tokens: torch.Tensor, pos: torch.Tensor, store: list, num_tokens: int) -> torch.Tensor:
    """Put every migrated token back at its original position: (B, M, C) survivors -> full (B, N, C) map (Fig. 3).

    store: one (pos_drop (B, R), pos_partner (B, R), offset (B, R, C)) per layer that migrated tokens.
    Replenishing equation (open choice): a token i dropped at layer l with B partner p(i) is stored as its offset to
    the partner, o_i = x_i^(l) - x_p^(l), and put back after stage 3 as  x_i = x_p(final) + o_i  =  x_i^(l) +
    (x_p(final) - x_p^(l)), i.e. it receives the residual updates its most similar token received after it left.
    Partners that left later are resolved first (store read backwards), so every position is written exactly once.
    Why: the plain stale copy x_i^(l) would mix layer-l features into the last-layer map; the partner's update is
    the best estimate of what the dropped token would have become. The pyramid then sees a full (B, N, C) map.
    """
    b, _, c = tokens.shape
    full = tokens.new_zeros(b, num_tokens, c).scatter(1, pos[..., None].expand(-1, -1, c), tokens)   # (B, N, C)
    for pos_drop, pos_partner, offset in reversed(store):
        moved = select_units(full, pos_partner) + offset                  # (B, R, C): x_p(final) + o_i
        full = full.scatter(1, pos_drop[..., None].expand(-1, -1, c), moved)   # (B, N, C)
    return full


# ---- 6. The stage-3 block -----------------------------------------------------------------------------------------

class FastBlock(nn.Module):
    """Pre-norm block: x + DropPath(g1 * Attn(LN x)), then x + DropPath(g2 * SwiGLU(LN x)) (Tab. 2).

    forward(x) is the plain path on (B, N, C). forward_windows(x, ...) is the accelerated path on (B, nW, L, C):
    the chosen attention mode, then (if r > 0) token migration between attention and MLP (Sec. 4.1).
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, drop_path: float = 0.0,
                 layer_scale: float = 0.1, hrpe_window: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = FastAttention(dim, num_heads=num_heads, hrpe_window=hrpe_window)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = SwiGLU(dim, hidden_dim=int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))     # layer scale, official init_values 0.1
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    def forward_windows(self, x, *, pos, grid_w: int, mode: str, r: int = 0):
        """x (B, nW, L, C), pos (B, nW, n) -> (x (B, nW, L - r, C), pos (B, nW, n - r), record or None).

        record = (pos_drop (B, nW*r), pos_partner (B, nW*r), offset (B, nW*r, C)) for `replenish`.
        Where tokens leave (open choice): between the attention and the MLP of the layer (as ToMe merges), so layer
        l's MLP already runs on fewer tokens.
        """
        y, keys = self.attn.forward_windows(self.norm1(x), mode=mode, pos=pos, grid_w=grid_w)
        x = x + self.drop_path(self.gamma_1 * y)                          # (B, nW, L, C)
        record = None
        if r > 0:                                                         # Sec. 4.1: migrate before the MLP
            n_gather = 1 if mode == "gathering" else 0                    # gathering tokens never migrate
            tokens = x[:, :, n_gather:]                                   # (B, nW, n, C)
            with torch.no_grad():                                         # a discrete choice: no gradient
                drop, partner, keep = select_migrants(keys[:, :, n_gather:], r)
            offset = select_units(tokens, drop) - select_units(tokens, partner)   # (B, nW, r, C)
            record = (select_units(pos, drop).flatten(1), select_units(pos, partner).flatten(1),
                      offset.flatten(1, 2))                               # (B, nW*r), (B, nW*r), (B, nW*r, C)
            x = torch.cat([x[:, :, :n_gather], select_units(tokens, keep)], dim=2)   # (B, nW, L - r, C)
            pos = select_units(pos, keep)                                 # (B, nW, n - r)
        x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x, pos, record


# ---- 7. The Fast-iTPN model ---------------------------------------------------------------------------------------

# Fast-iTPN's own field; HiViT's and iTPN's rules cover the fields the configs share (hivit.check_config).
FAST_RULES = [("window_size", lambda c: c.window_size >= 1, "must be >= 1 (tokens per window side; ours 8)")]


def check_acceleration(cfg: FastiTPNConfig) -> FastiTPNConfig:
    """Validate the two run-time switches (Sec. 4.1 ratio, Tab. 7 attention mode); returns cfg unchanged."""
    if cfg.attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {cfg.attention!r}")
    if not 0.0 <= cfg.migration_ratio < MAX_MIGRATION:
        raise ValueError(f"migration_ratio must be in [0, {MAX_MIGRATION}), got {cfg.migration_ratio}")
    return cfg


class FastiTPN(nn.Module):
    """Fast-iTPN classifier / backbone. forward(x) -> (B, K); forward_features(x) -> [f4, f8, f16] stage outputs."""

    def __init__(self, cfg: FastiTPNConfig, *, stem_mask_token: bool = False, pyramid: bool = True):
        """stem_mask_token: build the learned mask unit of SimMIM-style stem masking (pre-training only).
        pyramid: with num_classes = 0, also build itpn.py's feature pyramid (dense heads, distillation); False
        gives the bare backbone that mim.py's methods wrap (they read stage 3 only, so a pyramid would get no
        gradient and stall DDP)."""
        super().__init__()
        check_config(cfg, HIVIT_RULES + ITPN_RULES + FAST_RULES)          # one message naming each bad field
        self.cfg = check_acceleration(cfg)
        c, n1, n2, n3 = cfg.embed_dim, cfg.mlp_depth1, cfg.mlp_depth2, cfg.depth
        self.grid = (cfg.img_size // 16, cfg.img_size // 16)              # (Hp, Wp) the position table is built for
        dpr = drop_path_rates(cfg.drop_path_rate, n1 + n2 + n3)          # merges get no drop path (official)
        self.patch_embed = ConvPatchEmbed(c // 4, mask_token=stem_mask_token)
        self.stage1 = nn.ModuleList(ConvMLPBlock(c // 4, mlp_ratio=cfg.mlp_ratio, drop_path=p) for p in dpr[:n1])
        self.merge1 = ConvPatchMerge(c // 4)
        self.stage2 = nn.ModuleList(ConvMLPBlock(c // 2, mlp_ratio=cfg.mlp_ratio, drop_path=p)
                                    for p in dpr[n1:n1 + n2])
        self.merge2 = ConvPatchMerge(c // 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], c))   # APE only, no RPE
        self.blocks = nn.ModuleList(
            FastBlock(c, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path=p,
                      layer_scale=cfg.layer_scale, hrpe_window=cfg.window_size if cfg.hrpe else None)
            for p in dpr[n1 + n2:])
        self.fc_norm = nn.LayerNorm(c, eps=LN_EPS) if cfg.num_classes > 0 else None
        self.head = nn.Linear(c, cfg.num_classes) if cfg.num_classes > 0 else None
        self.pyramid = None                                               # as itpn.py: a backbone carries the pyramid
        if cfg.num_classes == 0 and pyramid:
            self.pyramid = FeaturePyramid(c, fpn_dim=cfg.fpn_dim, fpn_depth=cfg.fpn_depth, ln_eps=LN_EPS)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)                 # fine-tune init; MIM: init_pos_embed_sincos
        if self.head is not None:                                         # official init_scale 0.01 on the head
            self.head.weight.data.mul_(0.01)

    def init_pos_embed_sincos(self) -> None:
        """Start the (still trainable) APE from MAE's 2-D sin-cos table, as hivit.py's encoders (mim.py calls it)."""
        init_sincos_(self.pos_embed, self.grid)

    def set_acceleration(self, *, migration_ratio: float | None = None, attention: str | None = None) -> None:
        """Switch token migration / window attention / gathering on the same weights (Sec. 4: fine-tuning time).

        Only the two run-time fields of `cfg` change; HRPE adds parameters and is therefore chosen at build time.
        """
        changes = {k: v for k, v in (("migration_ratio", migration_ratio), ("attention", attention)) if v is not None}
        self.cfg = check_acceleration(replace(self.cfg, **changes))

    def accelerated(self) -> bool:
        """True when stage 3 leaves the released model's path (any migration, or window attention)."""
        return self.cfg.migration_ratio > 0 or self.cfg.attention != "global"

    def no_weight_decay(self) -> set[str]:
        """Official Fast-iTPN recipe: no decay on pos_embed (plus biases and norms, handled by the optimizer)."""
        return {"pos_embed"} | {n for n, _ in self.named_parameters() if "relative_position_bias" in n}

    # -- stage by stage --

    def forward_early(self, x: torch.Tensor, *, mask: torch.Tensor | None = None):
        """Stem, stages 1-2 and both merges: f4 (B, C/4, H/4, W/4), f8 (B, C/2, H/8, W/8), tokens (B, N, C)."""
        check_image_size(x)
        check_image_dtype(x, self.patch_embed.proj.weight.dtype)
        x = self.patch_embed(x, mask=mask)                                # (B, C/4, H/4, W/4)
        for blk in self.stage1:
            x = blk(x)
        f4 = x
        x = self.merge1(x)                                                # (B, C/2, H/8, W/8)
        for blk in self.stage2:
            x = blk(x)
        f8 = x
        tokens = self.merge2(x).flatten(2).transpose(1, 2)                # (B, N, C), row-major
        return f4, f8, tokens

    def pos_embed_for(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The APE for this grid, (1, N, C), interpolated (DINO-style, hivit.resize_pos_embed) for another grid.

        So a model built at the checkpoint's img_size takes 384/512/640-px images; the official scripts instead
        rebuild the model at the target size."""
        return resize_pos_embed(self.pos_embed, grid_hw)

    def forward_stage3(self, tokens: torch.Tensor, *, grid_hw: tuple[int, int]):
        """Stage 3 on (B, N, C) tokens that carry the APE -> (tokens (B, M, C), pos (B, M), store) for `replenish`.

        Plain path (no migration, global attention): M = N, pos = arange(N), empty store. Otherwise tokens are
        windowed, gathering tokens (if any) are prepended per window, and each layer may migrate tokens.
        Migration windows = attention windows, also with global attention (open choice). Why: equal drops per window
        keep every window the same length, so window attention stays one batched matmul after migration.
        """
        cfg = self.cfg
        b, n, c = tokens.shape
        if not self.accelerated():                                        # the released model's forward
            for blk in self.blocks:
                tokens = blk(tokens)
            return tokens, torch.arange(n, device=tokens.device).expand(b, n), []
        win = window_shape(grid_hw, cfg.window_size)
        x = window_partition(tokens, grid_hw, win)                        # (B, nW, n, C)
        pos = window_partition(torch.arange(n, device=tokens.device).expand(b, n), grid_hw, win)   # (B, nW, n)
        if cfg.attention == "gathering":                                  # Sec. 4.2: one gathering token per window
            x = torch.cat([x.mean(dim=2, keepdim=True), x], dim=2)        # (B, nW, 1 + n, C)
        store = []
        schedule = migration_schedule(win[0] * win[1], cfg.depth, cfg.migration_ratio)
        for blk, r in zip(self.blocks, schedule):
            x, pos, record = blk.forward_windows(x, pos=pos, grid_w=grid_hw[1], mode=cfg.attention, r=r)
            if record is not None:
                store.append(record)
        if cfg.attention == "gathering":
            x = x[:, :, 1:]                                               # (B, nW, n, C): gathering tokens retire
        return x.flatten(1, 2), pos.flatten(1), store                     # (B, M, C), (B, M)

    def forward_features(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> list:
        """The encoder seam: [f4 (B, N_vis, 4, 4, C/4), f8 (B, N_vis, 2, 2, C/2), f16 (B, N_vis, C)] unit tensors.

        f16 is the replenished full map when token migration is on (Sec. 4.1). Per-block stage-3 outputs are not
        listed (migrated tokens have none), so f16 follows f8 directly.
        ids_keep (B, N_vis): MAE-style dropping of units; exact even though units are selected after stage 2,
            because no early op crosses a unit (only stage 3 is saved).
        mask (B, N), 1 = masked, with mask_token (1, 1, C): BEiT-style, the stage-3 input of masked units is
            replaced by the token, as in HiViT. mask alone: SimMIM-style stem masking with the model's own learned
            mask unit (built with stem_mask_token=True), Fast-iTPN's pre-training; no level then sees masked pixels.
        """
        grid_hw = check_image_size(x)
        if mask_token is not None and (mask is None or ids_keep is not None):
            raise ValueError("mask_token goes with mask (BEiT-style mask tokens), and not with ids_keep")
        f4, f8, tokens = self.forward_early(x, mask=mask if mask_token is None else None)
        f4, f8 = map_to_units(f4, 4), map_to_units(f8, 2)                 # (B, N, 4, 4, C/4), (B, N, 2, 2, C/2)
        if mask_token is not None:
            tokens = mask_blend(tokens, mask[:, :, None], mask_token)     # (B, N, C), mask (B, N, 1)
        tokens = tokens + self.pos_embed_for(grid_hw)                     # (B, N, C)
        if ids_keep is not None:
            if self.accelerated():
                raise ValueError("token migration and window attention need the full grid: pre-training with "
                                 "ids_keep runs with migration_ratio=0 and attention='global'")
            f4, f8, tokens = (select_units(t, ids_keep) for t in (f4, f8, tokens))   # (B, N_vis, ...)
        kept, pos, store = self.forward_stage3(tokens, grid_hw=grid_hw)
        return [f4, f8, replenish(kept, pos, store, tokens.shape[1])]    # Fig. 3: full (B, N, C) map

    def forward_levels(self, x: torch.Tensor, *, ids_keep=None, mask=None, mask_token=None) -> list[torch.Tensor]:
        """itpn.py's pyramid on the full (replenished) map: [p16 (B, N, 1, 1, F), p8 (.., 2, 2, F), p4 (.., 4, 4, F)].

        The pyramid is C-MLPs and per-unit up-sampling only (no attention), so migrated tokens can be put back
        before it and every level comes out at full resolution (Sec. 4.1, Fig. 3).
        """
        feats = self.forward_features(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
        return self.require_pyramid()(feats[0], feats[1], feats[-1])

    def require_pyramid(self) -> FeaturePyramid:
        if self.pyramid is None:
            raise ValueError("this Fast-iTPN is a classifier (num_classes > 0) and has no pyramid: build it with "
                             "num_classes=0 for detection, segmentation or pre-training")
        return self.pyramid

    def forward_pyramid(self, x: torch.Tensor, *, mode: str = "det") -> dict[str, torch.Tensor]:
        """Dense maps like itpn.py: "det" {"p4".."p64"} (B, F, H/s, W/s); "seg" {"p4".."p32"} + backbone features."""
        return pyramid_maps(self.require_pyramid(), self.forward_features(x), check_image_size(x), mode=mode)

    def forward(self, x):
        if self.head is None:
            raise ValueError("this Fast-iTPN has num_classes=0 (backbone + pyramid): call forward_features, "
                             "forward_levels or forward_pyramid instead")
        f16 = self.forward_features(x)[-1]                                # (B, N, C)
        return self.head(self.fc_norm(f16.mean(dim=1)))                   # (B, K): mean pooling, no CLS token


# ---- 8. Pre-training: frozen-teacher distillation with SimMIM-style stem masking ---------------------------------

class FastiTPNDistillPretrainer(PyramidDistillation):
    """Fast-iTPN pre-training (Sec. 4.3, 5.1; never released): a frozen teacher supervises the pyramid, cosine loss.

    imgs (B, 3, H, W), normalised -> block mask (B, N) -> masked units become a learned token at the stem
    (SimMIM-style, the hint in the released `ConvPatchEmbed`; every unit is encoded) -> backbone + pyramid ->
    itpn.py's PyramidDistillation head (levels space-to-depth'ed to C per unit and summed, LN, Linear(C, T)) ->
    1 - cos against the teacher's (B, N, T) target on all units (the recipe's `distill_loss`).
    Runs without migration or gathering. Because the mask acts before any op, no pyramid level sees a masked
    unit's pixels (unlike iTPN's stage-3 mask token, whose pyramid sees them through the stage-1/2 laterals; tested).
    Ours throughout (never released): the stem masking, 75/196 BEiT blocks, the shared head; iTPN's auxiliary
    3/4-depth head is left out (nothing describes one for Fast-iTPN).
    out = {"loss", "mask" (B, N), "pred" (B, N, T), "logs": {"loss_main"}}. The PRETRAINER CONTRACT (README, Seams).
    """

    ARCH_OVERRIDES = dict(num_classes=0, migration_ratio=0.0, attention="global")   # backbone + pyramid, plain path

    def __init__(self, arch: FastiTPNConfig, *, cfg: iTPNPretrainConfig, teacher_path: str):
        arch = replace(arch, **self.ARCH_OVERRIDES)
        super().__init__(cfg=cfg, teacher_path=teacher_path, embed_dim=arch.embed_dim, fpn_dim=arch.fpn_dim)
        self.encoder = FastiTPN(arch, stem_mask_token=True)
        nn.init.trunc_normal_(self.encoder.patch_embed.mask_token, std=0.02)

    def forward(self, imgs):
        grid_hw = check_image_size(imgs)
        mask = distillation_mask(imgs.shape[0], grid_hw, mask_ratio=self.cfg.distill_mask_ratio).to(imgs.device)
        levels = self.encoder.forward_levels(imgs, mask=mask)            # stem masking: [p16, p8, p4] (B, N, h, w, F)
        pred = self.main_prediction(levels)                               # (B, N, T)
        loss = self.distill_loss(pred, self.teacher(imgs))                # Sec. 4.3: cosine, all units
        return {"loss": loss, "mask": mask, "pred": pred, "logs": {"loss_main": loss.detach()}}


# Method name -> recipe (itpn.py's iTPNPretrainConfig: the distillation fields) and class, as in itpn.py.
PRETRAIN_PRESETS: dict[str, iTPNPretrainConfig] = {
    "fast_itpn_distill": ITPN_PRETRAIN_PRESETS["itpn_distill_cosine"],   # Sec. 4.3: 1 - cos, 75/196 block mask
}
METHODS: dict[str, type[nn.Module]] = {"fast_itpn_distill": FastiTPNDistillPretrainer}


# ---- 9. Loading official checkpoints ------------------------------------------------------------------------------

def load_official(model: FastiTPN, state_dict: dict) -> list[str]:
    """Strictly load a released Fast-iTPN fine-tuning checkpoint (`fast_itpn/modeling_finetune.py` layout; the key
    listings are in tests/official_keys/fast_itpn_*).

    The official flat `blocks.{i}` list maps onto stage1 / merge1 / stage2 / merge2 / blocks with hivit.py's key
    mapping (the same flat indexing; early blocks norm2 -> norm). Every official key must be used and every
    backbone key of ours filled; only the parts the release does not have (the pyramid, HRPE tables, the stem mask
    token) may stay at their init. Returns the ignored keys.
    """
    ours = [k for k in model.state_dict() if k.startswith(("pyramid.", "patch_embed.mask_token"))
            or "relative_position_bias_table" in k]
    return hivit_load_official(model, state_dict, allow_missing=tuple(ours))


# ---- 10. Smoke demo ------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    model = FastiTPN(PRESETS["tiny"])
    x = torch.randn(2, 3, 64, 64)
    f4, f8, f16 = model.forward_features(x)
    print(f"tiny Fast-iTPN on {tuple(x.shape)}: stage 1 {tuple(f4.shape)}, stage 2 {tuple(f8.shape)}, "
          f"stage 3 {tuple(f16.shape)}")
    for mode in ATTENTION_MODES:
        model.set_acceleration(migration_ratio=0.4, attention=mode)
        kept, pos, store = model.forward_stage3(f16, grid_hw=(4, 4))
        print(f"  attention={mode:9s} migration 0.4: {kept.shape[1]} of 16 tokens left, "
              f"{sum(s[0].shape[1] for s in store)} migrated and replenished")
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    print(f"forward + backward with both switches on ok, loss {loss.item():.4f}")
    for name, cfg in PRESETS.items():
        print(f"{name:12s} {count_params(FastiTPN, cfg) / 1e6:9.3f}M parameters at {cfg.img_size} px")
