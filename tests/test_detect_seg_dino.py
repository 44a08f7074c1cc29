"""DINO-style detector: oracles for every claim of the DINO section.

Deformable attention vs a naive per-point bilinear loop (values and gradients), the assignment solver vs brute force,
matcher batched == unbatched, the CDN attention mask vs an element-wise rule and its effect (matching queries are
blind to DN queries), CDN noise ranges, inverse-sigmoid refinement, look-forward-twice and detached anchors through
gradients, losses recomputed by hand, post-processing by hand, and a one-batch overfit on synthetic rectangles.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import box_convert, box_iou

import detect_seg as ds
from conftest import naive_deform_sample

TINY = ds.DINO_PRESETS["tiny"]
STEPS = 50                                  # overfit steps


# ---- helpers ----

def np_focal_sum(logits, onehot, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(onehot == 1, p, 1 - p)
    a_t = np.where(onehot == 1, alpha, 1 - alpha)
    return float((-a_t * (1 - p_t) ** gamma * np.log(p_t)).sum())


def np_giou(a, b):
    """GIoU of two cxcywh boxes, from the definition (Rezatofighi et al. 2019)."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def random_targets(gen, sizes, K):
    out = []
    for n in sizes:
        c = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, K, (n,), generator=gen), "boxes": torch.cat([c, wh], -1)})
    return out


def tiny_inputs(B=2, side=64, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C, side // s, side // s, generator=g) for s in (8, 16, 32)]
    pad = torch.zeros(B, side, side, dtype=torch.bool)
    pad[1:, :, side // 2:] = True                                   # image 1 is half as wide: right half padding
    sizes = [(side, side)] + [(side, side // 2)] * (B - 1)
    return feats, pad, sizes


def randomise_zero_inits(head, seed=0):
    """Fresh DINO has zero-initialised offset / attention / box-delta weights; make every path carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, ds.MSDeformAttn):
                m.sampling_offsets.weight.copy_(torch.randn(m.sampling_offsets.weight.shape, generator=g) * 0.1)
                m.attention_weights.weight.copy_(torch.randn(m.attention_weights.weight.shape, generator=g) * 0.3)
        for heads in (head.decoder, head.query_selection):
            heads.box_head[-1].weight.copy_(torch.randn(heads.box_head[-1].weight.shape, generator=g) * 0.1)


# ---- D3. deformable attention ----

def test_deform_sample_reads_pixel_centres_exactly():
    """Coordinate convention: location ((j + .5) / W, (i + .5) / H) with align_corners=False is pixel (i, j)."""
    value = torch.randn(1, 12, 1, 3)                                # one level 3 x 4, one head
    for i, j in itertools.product(range(3), range(4)):
        loc = torch.tensor([(j + 0.5) / 4, (i + 0.5) / 3]).view(1, 1, 1, 1, 1, 2)
        out = ds.ms_deform_attn_sample(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1))
        torch.testing.assert_close(out[0, 0], value[0, i * 4 + j, 0])


def test_deform_sample_matches_naive_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    B, Q, M, Dh, P = 2, 3, 2, 3, 2
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, Dh, generator=g, dtype=torch.float64, requires_grad=True)
    # includes locations outside the map (zero padding) and near its border
    locations = (torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15).requires_grad_()
    weights = torch.randn(B, Q, M, L * P, generator=g, dtype=torch.float64).softmax(-1).view(B, Q, M, L, P)
    weights = weights.detach().requires_grad_()
    out = ds.ms_deform_attn_sample(value, shapes, locations, weights)
    ref = naive_deform_sample(value, shapes, locations, weights)
    torch.testing.assert_close(out, ref)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w_out).sum(), (value, locations, weights))
    grads_ref = torch.autograd.grad((ref * w_out).sum(), (value, locations, weights))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_module_matches_eq3_by_loops(ref_dim):
    """Module vs Eq. 3 written out: softmax jointly over levels x points per head, encoder offsets in level
    pixels, decoder offsets scaled by box wh / (2 P), padded tokens give zero values; values and gradients w.r.t.
    the memory, the offset and attention-weight projections."""
    g = torch.Generator().manual_seed(1)
    D, M, L, P, B, Q = 8, 2, 2, 3, 1, 3
    shapes = [(3, 4), (2, 2)]
    S = sum(h * w for h, w in shapes)
    attn = ds.MSDeformAttn(D, num_heads=M, num_levels=L, num_points=P).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    query = torch.randn(B, Q, D, generator=g, dtype=torch.float64)
    memory = torch.randn(B, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, [3, 7, 13]] = True
    if ref_dim == 2:
        reference = torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64)
    else:
        reference = torch.cat([torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2,
                               torch.rand(B, Q, L, 2, generator=g, dtype=torch.float64) * 0.4 + 0.1], -1)
    out = attn(query, reference=reference, value=memory, spatial_shapes=shapes, padding_mask=padding)

    # Eq. 3 by hand
    value = attn.value_proj(memory) * (~padding)[..., None]
    value = value.view(B, S, M, D // M)
    raw_off = attn.sampling_offsets(query).view(B, Q, M, L, P, 2)
    raw_w = attn.attention_weights(query).view(B, Q, M, L, P)
    weights = torch.zeros_like(raw_w)
    locations = torch.zeros_like(raw_off)
    for b, q, m in itertools.product(range(B), range(Q), range(M)):
        e = raw_w[b, q, m].exp()
        weights[b, q, m] = e / e.sum()                               # one softmax over all L x P of the head
        for lvl, (h, w) in enumerate(shapes):
            for p in range(P):
                if ref_dim == 2:
                    step = raw_off[b, q, m, lvl, p] / torch.tensor([w, h], dtype=torch.float64)
                    locations[b, q, m, lvl, p] = reference[b, q, lvl] + step
                else:
                    cxcy, wh = reference[b, q, lvl, :2], reference[b, q, lvl, 2:]
                    locations[b, q, m, lvl, p] = cxcy + raw_off[b, q, m, lvl, p] * wh / (2 * P)
    ref = attn.output_proj(naive_deform_sample(value, shapes, locations, weights))
    torch.testing.assert_close(out, ref)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wrt = (memory, attn.sampling_offsets.weight, attn.sampling_offsets.bias, attn.attention_weights.weight)
    for a, b in zip(torch.autograd.grad((out * w_out).sum(), wrt), torch.autograd.grad((ref * w_out).sum(), wrt)):
        torch.testing.assert_close(a, b)


def test_msdeformattn_init_directions():
    """Official init: head h points along angle 2 pi h / M (scaled to the unit square), point p at distance p + 1."""
    attn = ds.MSDeformAttn(16, num_heads=8, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))        # head 0: +x, point 2 -> 3
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))        # head 1: 45 degrees, corner
    torch.testing.assert_close(bias[2, 1, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)   # head 2: +y
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


# ---- D2/D4. positions, reference points ----

def test_sine_embeddings_match_loop_formula():
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    mask[0, 3, :] = mask[0, :, 3:] = True                             # valid region: 3 rows x 3 columns
    F_ = 4
    pos = ds.sine_position_embedding(mask, num_feats=F_)
    for i, j in itertools.product(range(3), range(3)):
        y, x = (i + 1) / 3 * 2 * math.pi, (j + 1) / 3 * 2 * math.pi    # cumulative count / valid extent x 2 pi
        for k in range(F_):
            trig = math.sin if k % 2 == 0 else math.cos
            freq = 20.0 ** (2 * (k // 2) / F_)
            assert abs(pos[0, k, i, j] - trig(y / freq)) < 1e-5        # y half first
            assert abs(pos[0, F_ + k, i, j] - trig(x / freq)) < 1e-5
    box = torch.tensor([0.1, 0.2, 0.3, 0.4])
    emb = ds.box_sine_embedding(box, num_feats=F_)
    for part, coord in enumerate([0.2, 0.1, 0.3, 0.4]):               # order y, x, w, h
        for k in range(F_):
            trig = math.sin if k % 2 == 0 else math.cos
            assert abs(emb[part * F_ + k] - trig(coord * 2 * math.pi / 10000.0 ** (2 * (k // 2) / F_))) < 1e-5


def test_encoder_reference_points_are_pixel_centres():
    """With every level padded by the same fraction, a token's reference is its own pixel centre in every level."""
    masks = []
    for h, w in [(4, 8), (2, 4)]:
        m = torch.zeros(1, h, w, dtype=torch.bool)
        m[:, :, w // 2:] = True
        masks.append(m)
    ratios = ds.valid_ratios(masks)
    torch.testing.assert_close(ratios, torch.tensor([[[0.5, 1.0], [0.5, 1.0]]]))
    ref = ds.encoder_reference_points([(4, 8), (2, 4)], ratios)
    assert ref.shape == (1, 32 + 8, 2, 2)
    torch.testing.assert_close(ref[0, 8 * 2 + 3, 1], torch.tensor([3.5 / 8, 2.5 / 4]))   # level 0, pixel (2, 3)
    torch.testing.assert_close(ref[0, 32 + 4 + 1, 0], torch.tensor([1.5 / 4, 1.5 / 2]))  # level 1, pixel (1, 1)


def test_encoder_proposals_sizes_and_validity():
    pad = torch.zeros(1, 4 * 4 + 2 * 2, dtype=torch.bool)
    pad[0, [3, 7, 11, 15]] = True                                     # level 0: last column is padding
    logits, valid = ds.encoder_proposals(pad, [(4, 4), (2, 2)])
    boxes = logits.sigmoid()
    torch.testing.assert_close(boxes[0, 5], torch.tensor([1.5 / 3, 1.5 / 4, 0.05, 0.05]))   # x / valid width 3
    torch.testing.assert_close(boxes[0, 16], torch.tensor([0.25, 0.25, 0.1, 0.1]))          # level 1 side 0.1
    assert not valid[0, 3] and torch.isinf(logits[0, 3]).all() and valid[0, :3].all() and valid[0, 16:].all()


# ---- D8. assignment and matcher ----

def brute_force_min(cost):
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return brute_force_min(cost.T)


@pytest.mark.parametrize("kind", ["uniform", "ties", "large"])
def test_assignment_matches_brute_force(kind):
    rng = np.random.default_rng({"uniform": 0, "ties": 1, "large": 2}[kind])
    for _ in range(60):
        n, m = rng.integers(1, 6, size=2)
        if kind == "uniform":
            cost = rng.normal(size=(n, m))
        elif kind == "ties":
            cost = rng.integers(0, 3, size=(n, m)).astype(float)
        else:
            cost = 1e9 + rng.integers(0, 1000, size=(n, m)).astype(float)   # large but finite, exact in float64
        rows, cols = ds.linear_sum_assignment(cost)
        assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert (np.diff(rows) > 0).all()
        assert cost[rows, cols].sum() == pytest.approx(brute_force_min(cost), rel=1e-12, abs=1e-9)


def test_assignment_rejects_nonfinite():
    with pytest.raises(ValueError, match="NaN or inf"):
        ds.linear_sum_assignment(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_matcher_batched_equals_unbatched():
    g = torch.Generator().manual_seed(3)
    B, Q, K = 4, 12, 5
    logits = torch.randn(B, Q, K, generator=g)
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05], -1)
    targets = random_targets(g, [3, 0, 5, 1], K)
    batched = ds.hungarian_match(logits, boxes, targets)
    for b in range(B):
        q, t = ds.hungarian_match(logits[b:b + 1], boxes[b:b + 1], targets[b:b + 1])[0]
        assert torch.equal(batched[b][0], q) and torch.equal(batched[b][1], t)
        assert len(q) == len(targets[b]["labels"])


def pair_cost(logit: list, box: list, label: int, gt: list) -> float:
    """DINO's matching cost of one (query, GT) pair, written out from the DINO config (set_cost_class 2,
    set_cost_bbox 5, set_cost_giou 2; focal alpha 0.25, gamma 2): scalar arithmetic only."""
    p = 1 / (1 + math.exp(-logit[label]))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, gt))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(box), corners(gt)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return 2 * focal + 5 * l1 - 2 * giou


def test_matcher_minimises_dinos_cost_by_brute_force():
    """The matching is a minimum of the pair costs written independently above, over every assignment."""
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        Q, K, n = 5, 3, 1 + trial % 4
        logits = torch.randn(1, Q, K, generator=g) * 2
        boxes = torch.cat([torch.rand(1, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(1, Q, 2, generator=g) * 0.3 + 0.05],
                          -1)
        targets = random_targets(g, [n], K)
        cost = np.array([[pair_cost(logits[0, q].tolist(), boxes[0, q].tolist(), int(targets[0]["labels"][j]),
                                    targets[0]["boxes"][j].tolist()) for j in range(n)] for q in range(Q)])
        (q, t), = ds.hungarian_match(logits, boxes, targets)
        assert len(q) == n and len(set(q.tolist())) == n
        assert cost[q.numpy(), t.numpy()].sum() == pytest.approx(brute_force_min(cost), rel=1e-6, abs=1e-6)


def test_matcher_finds_the_planted_permutation_and_losses_vanish():
    """Queries perm[j] carry GT j's exact box and a confident logit for its class: the matcher must return perm,
    and L1 and GIoU are then zero while the focal term equals its hand-computed value."""
    g = torch.Generator().manual_seed(4)
    Q, K = 10, 4
    targets = random_targets(g, [4], K)
    perm = torch.tensor([7, 2, 9, 0])
    logits = torch.full((1, Q, K), -3.0)
    boxes = torch.tensor([[0.5, 0.5, 0.02, 0.02]]).repeat(1, Q, 1)
    boxes[0, perm] = targets[0]["boxes"]
    logits[0, perm, targets[0]["labels"]] = 3.0
    (q, t), = ds.hungarian_match(logits, boxes, targets)
    assert torch.equal(q[t.argsort()], perm)
    losses = ds.set_losses(logits, boxes, targets, [(q, t)], num_boxes=4.0)
    assert losses["bbox"] < 1e-5 and losses["giou"] < 1e-5
    onehot = np.zeros((1, Q, K))
    onehot[0, perm.numpy(), targets[0]["labels"].numpy()] = 1
    assert losses["ce"].item() == pytest.approx(np_focal_sum(logits.numpy(), onehot) / 4.0, rel=1e-4)


def test_set_losses_by_hand():
    """Focal summed over all queries x classes / num_boxes (not a mean), L1 and 1 - GIoU of matched pairs /
    num_boxes."""
    g = torch.Generator().manual_seed(5)
    B, Q, K = 2, 6, 3
    logits = torch.randn(B, Q, K, generator=g)
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05], -1)
    targets = random_targets(g, [2, 3], K)
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([0, 5, 2]), torch.tensor([2, 0, 1]))]
    got = ds.set_losses(logits, boxes, targets, indices, num_boxes=5.0)
    onehot = np.zeros((B, Q, K))
    l1 = giou = 0.0
    for b, (q, t) in enumerate(indices):
        for qi, ti in zip(q.tolist(), t.tolist()):
            onehot[b, qi, targets[b]["labels"][ti]] = 1
            l1 += np.abs(boxes[b, qi].numpy() - targets[b]["boxes"][ti].numpy()).sum()
            giou += 1 - np_giou(boxes[b, qi].tolist(), targets[b]["boxes"][ti].tolist())
    assert got["ce"].item() == pytest.approx(np_focal_sum(logits.numpy(), onehot) / 5.0, rel=1e-5)
    assert got["bbox"].item() == pytest.approx(l1 / 5.0, rel=1e-5)
    assert got["giou"].item() == pytest.approx(giou / 5.0, rel=1e-5)


def test_dino_losses_denoising_part_by_hand():
    """DN losses: positive slot g 2G + j is tied to GT j, negatives and padding are "no object" and get no
    box loss, everything is normalised by num_boxes x groups."""
    g = torch.Generator().manual_seed(15)
    K, Q, groups = 3, 5, 2
    targets = random_targets(g, [2, 1], K)
    G = 2
    n_dn = groups * 2 * G
    dn_logits = torch.randn(1, 2, n_dn, K, generator=g)
    dn_boxes = torch.rand(1, 2, n_dn, 4, generator=g) * 0.2 + 0.3           # garbage everywhere ...
    onehot = np.zeros((2, n_dn, K))
    for b, t in enumerate(targets):
        for grp in range(groups):
            for j in range(len(t["labels"])):
                dn_boxes[0, b, grp * 2 * G + j] = t["boxes"][j]              # ... except exact positives
                onehot[b, grp * 2 * G + j, t["labels"][j]] = 1
    out = {"logits": torch.randn(1, 2, Q, K, generator=g), "boxes": torch.rand(1, 2, Q, 4, generator=g) * 0.3 + 0.2,
           "enc_logits": torch.randn(2, Q, K, generator=g), "enc_boxes": torch.rand(2, Q, 4, generator=g) * 0.3 + 0.2,
           "dn_logits": dn_logits, "dn_boxes": dn_boxes, "dn_groups": groups, "dn_group_size": 2 * G}
    losses = ds.dino_losses(out, targets)
    assert losses["loss_bbox_dn"] < 1e-6 and losses["loss_giou_dn"] < 1e-5
    expected = np_focal_sum(dn_logits[0].numpy(), onehot) / (3 * groups)      # 3 GTs in the batch
    assert losses["loss_ce_dn"].item() == pytest.approx(expected, rel=1e-5)
    assert {"loss_ce", "loss_bbox_enc", "loss_giou_dn"} <= set(losses)


# ---- D6. contrastive denoising ----

def test_dn_attention_mask_structure():
    groups, size, Q = 3, 4, 5
    mask = ds.dn_attention_mask(num_groups=groups, group_size=size, num_queries=Q)
    n_dn = groups * size
    group_of = lambda i: i // size if i < n_dn else None            # noqa: E731  None = matching query
    for i, j in itertools.product(range(n_dn + Q), repeat=2):
        gi, gj = group_of(i), group_of(j)
        blocked = (gi is None and gj is not None) or (gi is not None and gj is not None and gi != gj)
        assert mask[i, j].item() == blocked, (i, j)
    assert mask[n_dn:, :n_dn].all() and not mask[:n_dn, n_dn:].any()   # matching blind to DN; DN sees matching


def test_cdn_queries_layout_and_noise_ranges():
    torch.manual_seed(6)
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.1, 0.3],
                                                                             [0.6, 0.4, 0.3, 0.1]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    groups, lam = 50, 0.4
    labels, boxes, real = ds.cdn_queries(targets, num_groups=groups, num_classes=4, label_noise_ratio=0.0,
                                         box_noise_scale=lam)
    G = 3
    assert labels.shape == (2, groups * 2 * G) and boxes.shape == (2, groups * 2 * G, 4)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        for grp in range(groups):
            for kind in (0, 1):                                        # 0 positive, 1 negative
                for j in range(G):
                    slot = grp * 2 * G + kind * G + j
                    assert real[b, slot].item() == (j < n)
                    if j >= n:
                        assert torch.equal(boxes[b, slot], torch.full((4,), 0.5))
                        continue
                    assert labels[b, slot] == t["labels"][j]           # no label noise at ratio 0
                    gt = box_convert(t["boxes"][j], "cxcywh", "xyxy")
                    shift = (box_convert(boxes[b, slot], "cxcywh", "xyxy") - gt).abs()
                    half = t["boxes"][j, 2:].repeat(2) / 2 * lam
                    if kind == 0:
                        assert (shift <= half + 1e-6).all()           # positives: inside lambda (Sec. 3.3)
                    else:
                        assert (shift >= half - 1e-6).all() and (shift <= 2 * half + 1e-6).all()
    assert ds.dn_num_groups(100, 7) == 14 and ds.dn_num_groups(6, 10) == 1
    # label noise: resampled with probability ratio / 2, uniformly over K classes (so unchanged 1/K of the time)
    many = [{"labels": torch.zeros(40, dtype=torch.int64), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(40, 1)}]
    labels, _, _ = ds.cdn_queries(many, num_groups=50, num_classes=10, label_noise_ratio=0.5, box_noise_scale=1.0)
    changed = (labels != 0).float().mean().item()
    assert abs(changed - 0.25 * 0.9) < 0.03


def test_matching_queries_are_blind_to_denoising_queries():
    """With the CDN attention mask the matching part of the decoder gives the same outputs with and without DN
    queries (they hold noised GTs; seeing them would leak the answers to the matching queries)."""
    torch.manual_seed(7)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).eval()
    randomise_zero_inits(head)
    feats, pad, sizes = tiny_inputs()
    targets = ds.normalise_targets(
        [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 8.0, 60.0, 30.0]])},
         {"labels": torch.tensor([3]), "boxes": torch.tensor([[2.0, 10.0, 25.0, 50.0]])}],
        image_sizes=sizes, num_classes=4)
    with torch.no_grad():
        plain = head.forward_outputs(feats, pad_mask=pad)
        with_dn = head.forward_outputs(feats, pad_mask=pad, dn_targets=targets)
    assert with_dn["dn_groups"] == TINY.dn_number // 2 and with_dn["dn_logits"].shape[2] == 3 * 2 * 2
    torch.testing.assert_close(with_dn["logits"], plain["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["boxes"], plain["boxes"], atol=1e-5, rtol=1e-5)


# ---- D7. refinement, look-forward-twice, detached anchors ----

def test_inverse_sigmoid_round_trip_and_identity_refinement():
    x = torch.linspace(-6.5, 6.5, 101, dtype=torch.float64)
    torch.testing.assert_close(ds.inverse_sigmoid(x.sigmoid()), x)
    b = torch.linspace(1e-3, 1 - 1e-3, 101, dtype=torch.float64)
    torch.testing.assert_close(ds.inverse_sigmoid(b).sigmoid(), b)
    # fresh head: the box delta is zero-initialised, so every decoder layer reproduces its anchors exactly
    torch.manual_seed(8)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).eval()
    feats, pad, _ = tiny_inputs()
    with torch.no_grad():
        out = head.forward_outputs(feats, pad_mask=pad)
    for layer_boxes in out["boxes"]:
        torch.testing.assert_close(layer_boxes, out["enc_boxes"], atol=1e-6, rtol=1e-5)


def _captured_outputs(module):
    store = []
    handle = module.register_forward_hook(lambda m, inp, out: store.append(out))
    return store, handle


def test_refinement_is_in_inverse_sigmoid_space():
    """Deformable DETR Sec. 4.2 / DINO: b_i = sigmoid(Delta_i + logit(b_{i-1})), b_0 = the selected anchors; checked
    with torch.logit on the deltas the box head actually produced."""
    torch.manual_seed(14)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).eval()
    randomise_zero_inits(head)
    feats, pad, _ = tiny_inputs()
    deltas, handle = _captured_outputs(head.decoder.box_head)
    with torch.no_grad():
        out = head.forward_outputs(feats, pad_mask=pad)
    handle.remove()
    previous = out["enc_boxes"]
    for delta, boxes in zip(deltas, out["boxes"]):
        torch.testing.assert_close(boxes, (delta + torch.logit(previous)).sigmoid(), atol=1e-5, rtol=1e-4)
        previous = boxes


def test_look_forward_twice_gradients():
    """Sec. 3.5: layer i's box loss reaches layer i - 1's delta (look forward twice) but not layer i - 2's, and no
    gradient flows along the references fed forward: layer i's hidden state ignores layer i - 1's delta."""
    torch.manual_seed(9)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY)
    randomise_zero_inits(head)
    feats, pad, _ = tiny_inputs()
    deltas, handle = _captured_outputs(head.decoder.box_head)
    out = head.forward_outputs(feats, pad_mask=pad)
    handle.remove()
    assert len(deltas) == TINY.dec_layers == 3
    boxes, logits = out["boxes"], out["logits"]
    g_twice = torch.autograd.grad(boxes[1].sum(), deltas[0], retain_graph=True)[0]
    assert g_twice.abs().sum() > 0
    g_thrice = torch.autograd.grad(boxes[2].sum(), deltas[0], retain_graph=True, allow_unused=True)[0]
    assert g_thrice is None or g_thrice.abs().sum() == 0
    g_feed = torch.autograd.grad(logits[1].sum(), deltas[0], retain_graph=True, allow_unused=True)[0]
    assert g_feed is None or g_feed.abs().sum() == 0


def test_decoder_samples_boxes_in_the_padded_frame():
    """References are relative to the unpadded image; cross-attention gets them scaled by each level's valid
    ratio. Image 1 has its right half padded: ratio (0.5, 1) on the 8x8, 4x4 and 2x2 levels; the extra 1x1 level's
    nearest-resized mask keeps pixel (0, 0), which is valid, so ratio (1, 1) there."""
    torch.manual_seed(16)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).eval()
    feats, pad, _ = tiny_inputs()
    seen = []
    handle = head.decoder.layers[0].cross_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["reference"]), with_kwargs=True)
    with torch.no_grad():
        out = head.forward_outputs(feats, pad_mask=pad)
    handle.remove()
    expected = {0: [(1.0, 1.0)] * 4, 1: [(0.5, 1.0)] * 3 + [(1.0, 1.0)]}
    for b, ratios in expected.items():
        for lvl, (rw, rh) in enumerate(ratios):
            torch.testing.assert_close(seen[0][b, :, lvl], out["enc_boxes"][b] * torch.tensor([rw, rh, rw, rh]))


def test_selected_anchors_are_detached():
    """Mixed query selection: decoder outputs get no gradient through the anchor boxes; only the encoder's
    own top-k predictions (its loss) train the encoder box head."""
    torch.manual_seed(10)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY)
    randomise_zero_inits(head)
    feats, pad, _ = tiny_inputs()
    enc_deltas, handle = _captured_outputs(head.query_selection.box_head)
    out = head.forward_outputs(feats, pad_mask=pad)
    handle.remove()
    g_dec = torch.autograd.grad(out["boxes"].sum() + out["logits"].sum(), enc_deltas[0], retain_graph=True,
                                allow_unused=True)[0]
    assert g_dec is None or g_dec.abs().sum() == 0
    assert torch.autograd.grad(out["enc_boxes"].sum(), enc_deltas[0])[0].abs().sum() > 0


# ---- D9-D11. head: losses, gradients, outputs, bad input ----

def pixel_targets():
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [10.0, 30.0, 60.0, 60.0]])},
            {"labels": torch.tensor([4]), "boxes": torch.tensor([[2.0, 2.0, 28.0, 40.0]])}]


def test_training_losses_and_a_gradient_for_every_parameter():
    torch.manual_seed(11)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).train()
    feats, pad, sizes = tiny_inputs()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(2):                          # after one step the zero-initialised weights no longer block paths
        opt.zero_grad()
        losses = head(feats, pad_mask=pad, image_sizes=sizes, targets=pixel_targets())
        losses["loss"].backward()
        opt.step()
    n_sets = 1 + TINY.dec_layers * 2            # encoder + every layer's matching part and DN part
    assert len(losses) == 1 + 3 * n_sets and torch.isfinite(losses["loss"])
    expected = sum(ds.LOSS_WEIGHT[k.split("_")[1]] * v for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"].detach(), expected)
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_training_without_any_gt():
    torch.manual_seed(12)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).train()
    feats, pad, sizes = tiny_inputs()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = head(feats, pad_mask=pad, image_sizes=sizes, targets=empty)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss_ce_dn"] == 0 and losses["loss_bbox"] == 0
    assert head.label_enc.weight.grad is not None                     # every parameter stays in the graph (DDP)


def test_postprocess_by_hand():
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 2, 1], logits[0, 0, 0], logits[0, 2, 0] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.9, 0.5, 0.4, 0.2]]])
    (res,) = ds.dino_postprocess(logits, boxes, [(50, 100)], num_select=3)
    torch.testing.assert_close(res["labels"], torch.tensor([2, 1, 1]))            # 1-based, query 2 twice
    torch.testing.assert_close(res["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(res["boxes"][1], torch.tensor([40.0, 15.0, 60.0, 35.0]))   # (w, h) = (100, 50)
    torch.testing.assert_close(res["boxes"][0], torch.tensor([70.0, 20.0, 100.0, 30.0]))  # x2 110 clipped to 100


def test_eval_output_format():
    torch.manual_seed(13)
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).eval()
    feats, pad, sizes = tiny_inputs()
    with torch.no_grad():
        results = head(feats, pad_mask=pad, image_sizes=sizes)
    assert len(results) == 2
    for res, (h, w) in zip(results, sizes):
        assert res["boxes"].shape == (TINY.num_select, 4) and res["scores"].shape == res["labels"].shape
        assert res["labels"].min() >= 1 and res["labels"].max() <= 4
        assert (res["scores"][:-1] >= res["scores"][1:]).all()
        b = res["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert (b[:, 2:] >= b[:, :2]).all()


def test_targets_are_normalised_by_the_unpadded_size():
    (t,) = ds.normalise_targets([{"labels": torch.tensor([3]), "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]])}],
                                image_sizes=[(80, 40)], num_classes=3)
    assert t["labels"].tolist() == [2]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_bad_inputs_have_clear_messages():
    head = ds.DINOHead([32, 32, 32], num_classes=4, cfg=TINY).train()
    feats, pad, sizes = tiny_inputs()
    bad_label = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]])}] * 2
    with pytest.raises(ValueError, match="1..4"):
        head(feats, pad_mask=pad, image_sizes=sizes, targets=bad_label)
    with pytest.raises(ValueError, match="needs targets"):
        head(feats, pad_mask=pad, image_sizes=sizes)
    with pytest.raises(ValueError, match="feature maps"):
        head(feats[:2], pad_mask=pad, image_sizes=sizes, targets=pixel_targets())
    with pytest.raises(ValueError, match="pad_mask"):
        head(feats, pad_mask=pad.float(), image_sizes=sizes, targets=pixel_targets())
    with pytest.raises(ValueError, match="num_levels"):
        ds.DINOHead([32] * 5, num_classes=4, cfg=TINY)
    with pytest.raises(ValueError, match="x2 >= x1"):
        head(feats, pad_mask=pad, image_sizes=sizes,
             targets=[{"labels": torch.tensor([1]), "boxes": torch.tensor([[9.0, 1.0, 5.0, 5.0]])}] * 2)


# ---- one-batch overfit on synthetic rectangles ----

def rectangles_batch():
    """Two 64 x 64 images with two filled rectangles each; the class is the colour channel (1..3)."""
    specs = [[(1, (6, 8, 30, 34)), (3, (36, 30, 60, 58))], [(2, (10, 36, 54, 60)), (1, (40, 4, 58, 26))]]
    images = torch.zeros(2, 3, 64, 64)
    targets = []
    for b, objs in enumerate(specs):
        for label, (x1, y1, x2, y2) in objs:
            images[b, label - 1, y1:y2, x1:x2] = 1.0
        targets.append({"labels": torch.tensor([lab for lab, _ in objs]),
                        "boxes": torch.tensor([box for _, box in objs], dtype=torch.float32)})
    return images, targets


class TinyStem(nn.Module):
    """Strides 8, 16, 32 from a few convs (a stand-in for the pyramid)."""

    def __init__(self, c=32):
        super().__init__()
        self.s8 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1), nn.ReLU(),
                                nn.Conv2d(c, c, 3, 2, 1), nn.ReLU())
        self.s16 = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.ReLU())
        self.s32 = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        p8 = self.s8(x)
        p16 = self.s16(p8)
        return [p8, p16, self.s32(p16)]


def test_one_batch_overfit_on_rectangles():
    torch.manual_seed(0)
    images, targets = rectangles_batch()
    stem, head = TinyStem(), ds.DINOHead([32, 32, 32], num_classes=3, cfg=TINY)
    params = list(stem.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    pad, sizes = torch.zeros(2, 64, 64, dtype=torch.bool), [(64, 64)] * 2
    head.train()
    history = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = head(stem(images), pad_mask=pad, image_sizes=sizes, targets=targets)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)                # DINO's max-norm
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.4 * np.mean(history[:3]), history[::10]
    head.eval()
    with torch.no_grad():
        results = head(stem(images), pad_mask=pad, image_sizes=sizes)
    for res, t in zip(results, targets):
        for label, box in zip(t["labels"], t["boxes"]):
            keep = res["labels"] == label
            best = res["boxes"][keep][res["scores"][keep].argmax()]   # the top-scoring detection of that class
            assert box_iou(best[None], box[None]).item() > 0.5, (label, best, box)

