"""Semi-supervised methods: EMA, supervised, mean teacher, BCP (docs/methods.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from medda.components import largest_component
from medda.errors import MeddaError
from medda.methods.base import MethodContext
from medda.methods.bcp import (
    BCP,
    BCPConfig,
    copy_paste,
    cuboid_mask,
    masked_ce,
    masked_dice,
    mixed_seg_loss,
    seg_loss,
)
from medda.methods.ema import ema_update, make_teacher
from medda.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from medda.methods.supervised import Supervised, SupervisedConfig

torch.set_num_threads(1)


def tiny_unet(dims: int, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=dims, in_channels=1, out_channels=k, channels=(4, 8), strides=(2,), norm="batch")


def ctx(dims: int, shape, total: int = 10, k: int = 3) -> MethodContext:
    return MethodContext(
        num_classes=k, spatial_dims=dims, patch_size=tuple(shape), total_iterations=total, seed=3
    )


def batch(shape, k: int = 3, b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "labeled": {
            "image": torch.randn(b, 1, *shape, generator=g),
            "label": torch.randint(0, k, (b, 1, *shape), generator=g).float(),
        },
        "unlabeled": {"image": torch.randn(b, 1, *shape, generator=g)},
    }


# ---------------------------------------------------------------- mask and copy-paste


@pytest.mark.parametrize("shape", [(12, 9), (12, 9, 7)])
def test_cuboid_mask_geometry(shape):
    g = torch.Generator().manual_seed(0)
    boxes = set()
    for _ in range(40):
        mask, box = cuboid_mask(shape, 2 / 3, g)
        assert mask.shape == shape and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        zeros = (mask == 0).nonzero()
        for axis, n in enumerate(shape):
            size = math.floor(2 / 3 * n)
            start, stop = box[axis]
            assert stop - start == size
            assert 0 <= start < n - size  # corner ~ U[0, n - size)
            assert zeros[:, axis].min() == start and zeros[:, axis].max() == stop - 1
        assert zeros.shape[0] == math.prod(math.floor(2 / 3 * n) for n in shape)
        boxes.add(box)
    assert len(boxes) > 1  # the position moves across iterations
    seq = [cuboid_mask(shape, 2 / 3, torch.Generator().manual_seed(5))[1] for _ in range(2)]
    assert seq[0] == seq[1]  # deterministic for a seed


def test_cuboid_mask_full_and_tiny_beta():
    mask, box = cuboid_mask((4, 6), 1.0, torch.Generator().manual_seed(0))
    assert mask.sum() == 0 and box == ((0, 4), (0, 6))
    mask, _ = cuboid_mask((4, 6), 0.1, torch.Generator().manual_seed(0))
    assert mask.sum() == 24  # floor(0.4) = 0: no cuboid


def test_copy_paste_inputs_and_labels():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]])  # (2, 1, 2, 2)
    b = -a
    out = copy_paste(a, b, m)
    expected = torch.tensor([[[[1.0, -2.0], [-3.0, 4.0]]], [[[5.0, -6.0], [-7.0, 8.0]]]])
    assert torch.equal(out, expected)
    assert torch.equal(out, a * m + b * (1 - m))
    ya = torch.tensor([[[1, 1], [2, 2]]])  # (1, 2, 2) long
    yb = torch.tensor([[[0, 3], [0, 3]]])
    y = copy_paste(ya, yb, m)
    assert y.dtype == torch.long and torch.equal(y, torch.tensor([[[1, 3], [0, 2]]]))


# ---------------------------------------------------------------- losses


def _logits(probs):  # probs (K, N) -> logits (1, K, 1, N) whose softmax is probs
    return torch.tensor(probs).log().unsqueeze(0).unsqueeze(2)


P = [[0.8, 0.3, 0.6], [0.2, 0.7, 0.4]]  # classes x voxels
Y = torch.tensor([[[0, 1, 0]]])  # (1, 1, 3)
ONLY_V1 = torch.tensor([[0.0, 1.0, 0.0]])  # spatial (1, 3)


def test_masked_ce_hand_values():
    q = _logits(P)
    assert masked_ce(q, Y, ONLY_V1).item() == pytest.approx(-math.log(0.7), rel=1e-6)
    full = (-math.log(0.8) - math.log(0.7) - math.log(0.6)) / 3
    assert masked_ce(q, Y, torch.ones(1, 3)).item() == pytest.approx(full, rel=1e-6)
    # |R| is counted over the batch: two identical samples give the same mean
    q2, y2 = torch.cat([q, q]), torch.cat([Y, Y])
    assert masked_ce(q2, y2, ONLY_V1).item() == pytest.approx(-math.log(0.7), rel=1e-6)
    # an empty region contributes 0, not NaN
    assert masked_ce(q, Y, torch.zeros(1, 3)).item() == 0.0


def test_masked_dice_hand_values_and_legacy_bg():
    q = _logits(P)
    # pooled squared, region = voxel 1 only (target class 1 there)
    loss0, loss1 = 1.0, 1 - 1.4 / 1.49
    got = masked_dice(q, Y, ONLY_V1, "pooled_squared").item()
    assert got == pytest.approx((loss0 + loss1) / 2, rel=1e-5)
    # legacy: the background class ignores the region (whole image: y0 = [1,0,1], p0 = [.8,.3,.6])
    legacy0 = 1 - 2 * 1.4 / (0.64 + 0.09 + 0.36 + 2)
    got_legacy = masked_dice(q, Y, ONLY_V1, "pooled_squared", legacy_bg_mask=True).item()
    assert got_legacy == pytest.approx((legacy0 + loss1) / 2, rel=1e-5)
    assert got_legacy < got
    # foreground-only difference: legacy equals correct when the region is the whole image
    ones = torch.ones(1, 3)
    a = masked_dice(q, Y, ones, "pooled_squared", legacy_bg_mask=True)
    assert a.item() == pytest.approx(masked_dice(q, Y, ones, "pooled_squared").item(), rel=1e-6)
    # per-sample linear, s = 1e-5
    s = 1e-5
    d0, d1 = s / (0.3 + s), (1.4 + s) / (1.7 + s)
    got_lin = masked_dice(q, Y, ONLY_V1, "per_sample_linear").item()
    assert got_lin == pytest.approx(1 - (d0 + d1) / 2, rel=1e-5)


def test_mixed_seg_loss_composition():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 5)
    y1, y2 = torch.randint(0, 3, (2, 1, 4, 5)), torch.randint(0, 3, (2, 1, 4, 5))
    m, _ = cuboid_mask((4, 5), 0.5, torch.Generator().manual_seed(1))
    got = mixed_seg_loss(q, y1, y2, m, 1.0, 0.5)
    expected = seg_loss(q, y1, m) + 0.5 * seg_loss(q, y2, 1 - m)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    parts = 0.5 * (masked_ce(q, y1, m) + masked_dice(q, y1, m))
    assert seg_loss(q, y1, m).item() == pytest.approx(parts.item(), rel=1e-6)
    # the two terms share one softmax: the gradient is the two separate terms' gradient, CE is F.cross_entropy's
    a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
    mixed_seg_loss(a, y1, y2, m, 1.0, 0.5).backward()
    (seg_loss(b, y1, m) + 0.5 * seg_loss(b, y2, 1 - m)).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8) and a.grad.abs().sum() > 0
    ce = torch.nn.functional.cross_entropy(q, y1[:, 0], reduction="none")
    assert masked_ce(q, y1, m).item() == pytest.approx(((ce * m).sum() / (2 * m.sum())).item(), rel=1e-6)
    # an empty 1-M region adds nothing
    assert mixed_seg_loss(q, y1, y2, torch.ones(4, 5)).item() == pytest.approx(
        seg_loss(q, y1, torch.ones(4, 5)).item(), rel=1e-6
    )


def test_mixed_seg_loss_keep_masks_narrow_each_term():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 5)
    y1, y2 = torch.randint(0, 3, (2, 1, 4, 5)), torch.randint(0, 3, (2, 1, 4, 5))
    m, _ = cuboid_mask((4, 5), 0.5, torch.Generator().manual_seed(1))
    k1, k2 = (torch.rand(2, 4, 5) > 0.4).float(), (torch.rand(2, 4, 5) > 0.6).float()
    got = mixed_seg_loss(q, y1, y2, m, 0.3, 0.5, keep_in_mask=k1, keep_out_mask=k2)
    expected = 0.3 * seg_loss(q, y1, m * k1) + 0.5 * seg_loss(q, y2, (1 - m) * k2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # keeping everything is the reference loss; keeping nothing removes the term
    assert mixed_seg_loss(q, y1, y2, m, keep_out_mask=torch.ones(2, 4, 5)).item() == pytest.approx(
        mixed_seg_loss(q, y1, y2, m).item(), rel=1e-6
    )
    assert mixed_seg_loss(q, y1, y2, m, 1.0, 0.5, keep_out_mask=torch.zeros(2, 4, 5)).item() == pytest.approx(
        seg_loss(q, y1, m).item(), rel=1e-6
    )


# ---------------------------------------------------------------- EMA


def _ema_pair():
    teacher = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    bt, bs = teacher[1], student[1]
    bt.running_mean.fill_(0.0), bs.running_mean.fill_(2.0)
    bt.running_var.fill_(1.0), bs.running_var.fill_(2.0)
    bt.num_batches_tracked.fill_(5), bs.num_batches_tracked.fill_(7)
    return teacher, student


def test_ema_params_scope():
    t, s = _ema_pair()
    ema_update(t, s, 0.9, "params")
    for p in t.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2))
    assert torch.equal(t[1].running_mean, torch.zeros(2)) and torch.equal(t[1].running_var, torch.ones(2))
    assert t[1].num_batches_tracked.item() == 5


def test_ema_state_dict_scope():
    t, s = _ema_pair()
    ema_update(t, s, 0.9, "state_dict")
    for p in t.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2))
    assert torch.allclose(t[1].running_mean, torch.full((2,), 0.2))
    assert torch.allclose(t[1].running_var, torch.full((2,), 1.1))
    assert t[1].num_batches_tracked.dtype == torch.long and t[1].num_batches_tracked.item() == 7
    with pytest.raises(ValueError):
        ema_update(t, s, 0.9, "buffers")


def test_make_teacher_is_a_frozen_copy():
    s = nn.Linear(2, 2)
    t = make_teacher(s)
    assert all(not p.requires_grad for p in t.parameters())
    assert all(p.requires_grad for p in s.parameters())
    assert torch.equal(t.weight, s.weight) and t.weight.data_ptr() != s.weight.data_ptr()


# ---------------------------------------------------------------- largest connected component


def test_lcc_2d_per_slice_per_class():
    lab = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    lab[0, 0, 0:2, 0:2] = 1  # class 1: 4 px (kept)
    lab[0, 0, 4, 4:6] = 1  # class 1: 2 px (dropped)
    lab[0, 0, 3, 0] = 2  # class 2: 1 px (dropped)
    lab[0, 0, 5, 0:3] = 2  # class 2: 3 px (kept)
    lab[1, 0, 2, 2] = 1  # other slice: its own largest (single px) is kept
    out = largest_component(lab, spatial_dims=2)
    exp = torch.zeros_like(lab)
    exp[0, 0, 0:2, 0:2] = 1
    exp[0, 0, 5, 0:3] = 2
    exp[1, 0, 2, 2] = 1
    assert torch.equal(out, exp)
    # connectivity: diagonal neighbours join with full connectivity only
    diag = torch.zeros(1, 5, 5, dtype=torch.long)
    diag[0, 0, 0] = diag[0, 1, 1] = diag[0, 2, 2] = 1
    diag[0, 4, 3:5] = 1
    full = diag.clone()
    full[0, 4, 3:5] = 0  # the 3-px diagonal beats the 2-px bar
    assert torch.equal(largest_component(diag, 2), full)
    four = largest_component(diag, 2, connectivity=1)
    assert four.sum() == 2 and four[0, 4, 3] == 1 and four[0, 0, 0] == 0
    # no background anywhere: every class still competes (class 1's two pixels are split by class 2's column)
    no_bg = torch.ones(1, 3, 3, dtype=torch.uint8)
    no_bg[0, :, 1] = 2
    kept = largest_component(no_bg, 2, connectivity=1)
    assert kept[0, :, 1].eq(2).all() and kept[0, :, 0].eq(1).all() and kept[0, :, 2].eq(0).all()


def test_lcc_3d_vs_per_slice():
    lab = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    lab[0, 0:2, 0:2, 0:3] = 1  # 12-voxel column through slices z = 0..2
    lab[0, 3:6, 3:6, 1] = 1  # 9-voxel plate in slice z = 1 only
    out3 = largest_component(lab, spatial_dims=3)
    exp = torch.zeros_like(lab)
    exp[0, 0:2, 0:2, 0:3] = 1
    assert torch.equal(out3, exp)
    slices = lab.permute(0, 3, 1, 2).reshape(6, 6, 6)  # (D, H, W): 2D per slice
    out2 = largest_component(slices, spatial_dims=2)
    assert out2[1].sum() == 9 and out2[1, 3, 3] == 1 and out2[1, 0, 0] == 0  # the plate wins in its slice
    assert out2[0].sum() == 4 and out2[2].sum() == 4


# ---------------------------------------------------------------- supervised and mean teacher


def test_supervised_equals_monai_dice_ce():
    net = tiny_unet(2)
    b = batch((8, 8))
    res = Supervised(net, SupervisedConfig(), ctx(2, (8, 8))).step(b, 0)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)(
        net(b["labeled"]["image"]), b["labeled"]["label"].long()
    )
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert res.logs["loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_mean_teacher_ramp_and_step():
    net = tiny_unet(2)
    mt = MeanTeacher(net, MeanTeacherConfig(ramp_iterations=100), ctx(2, (8, 8), total=200))
    assert mt.consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert mt.consistency_weight(50) == pytest.approx(0.1 * math.exp(-1.25))
    assert mt.consistency_weight(100) == pytest.approx(0.1)
    assert mt.consistency_weight(150) == pytest.approx(0.1)
    default = MeanTeacher(tiny_unet(2), MeanTeacherConfig(), ctx(2, (8, 8), total=200))
    assert default.ramp_iterations == 200
    res = mt.step(batch((8, 8)), 0)
    res.loss.backward()
    assert all(p.grad is None for p in mt.teacher.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    mt.after_step(0)  # warm-up decay min(1 - 1/1, .99) = 0: teacher := student
    for pt, ps in zip(mt.teacher.parameters(), net.parameters(), strict=True):
        assert torch.equal(pt, ps)
    assert {"teacher", "noise_device"} <= set(mt.state_dict()) and mt.eval_model() is net


# ---------------------------------------------------------------- BCP end to end


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("dims,shape", [(2, (16, 16)), (3, (8, 8, 8))])
def test_bcp_two_stages(dims, shape):
    net = Recorder(tiny_unet(dims))
    bcp = BCP(net, BCPConfig(pretrain_iterations=1), ctx(dims, shape, total=3))
    assert bcp.ema_scope == ("state_dict" if dims == 2 else "params")
    params = bcp.configure()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    b = batch(shape)

    res1 = bcp.step(b, 0)
    assert res1.logs["stage"] == 1.0 and torch.isfinite(res1.loss)
    m = torch.ones(shape)
    m[tuple(slice(a, z) for a, z in bcp.last_box)] = 0
    x = b["labeled"]["image"]
    assert torch.equal(net.inputs[-1], copy_paste(x[:2], x[2:], m))
    opt.zero_grad()
    res1.loss.backward()
    opt.step()
    bcp.after_step(0)

    net.inputs.clear()
    res2 = bcp.step(b, 1)
    assert res2.logs["stage"] == 2.0 and torch.isfinite(res2.loss)
    assert set(res2.logs) == {"loss", "loss_in", "loss_out", "stage", "pseudo_fg_ratio"}
    assert res2.logs["loss"] == pytest.approx(res2.logs["loss_in"] + res2.logs["loss_out"], rel=1e-5)
    m = torch.ones(shape)
    m[tuple(slice(a, z) for a, z in bcp.last_box)] = 0
    u = b["unlabeled"]["image"]
    assert torch.equal(net.inputs[0], copy_paste(x[:2], u[:2], m))  # inward
    assert torch.equal(net.inputs[1], copy_paste(u[2:], x[2:], m))  # outward
    # the teacher started from the student at the switch
    for pt, ps in zip(bcp.teacher.parameters(), net.parameters(), strict=True):
        assert torch.equal(pt, ps)
    before = [p.clone() for p in bcp.teacher.parameters()]
    opt.zero_grad()
    res2.loss.backward()
    assert all(p.grad is None for p in bcp.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, bcp.teacher.parameters(), strict=True))
    bcp.after_step(1)
    changed = [not torch.equal(a, p) for a, p in zip(before, bcp.teacher.parameters(), strict=True)]
    assert any(changed)
    for a, pt, ps in zip(before, bcp.teacher.parameters(), net.parameters(), strict=True):
        assert torch.allclose(pt, 0.99 * a + 0.01 * ps, atol=1e-6)
    assert bcp.eval_model() is net and "teacher" in bcp.state_dict()


def test_bcp_ema_decay_one_keeps_the_stage_1_teacher_while_the_student_trains():
    """ema_decay=1.0: self-training with a fixed teacher (the stage-1 model); its pseudo-labels never move."""
    net = tiny_unet(2)
    bcp = BCP(net, BCPConfig(pretrain_iterations=1, ema_decay=1.0), ctx(2, (16, 16), total=6))
    opt = torch.optim.SGD(bcp.configure(), lr=0.1)
    b = batch((16, 16))
    halves = (b["unlabeled"]["image"][:2], b["unlabeled"]["image"][2:])
    teacher_weights = first_labels = None
    for it in range(6):
        res = bcp.step(b, it)
        if it == 1:  # the switch: the teacher is the stage-1 student
            teacher_weights = [p.clone() for p in bcp.teacher.parameters()]
            first_labels = [y for y, _ in bcp._pseudo_labels(halves, b["labeled"]["label"])]
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        bcp.after_step(it)
    assert all(torch.equal(a, p) for a, p in zip(teacher_weights, bcp.teacher.parameters(), strict=True))
    assert not all(torch.equal(a, p) for a, p in zip(teacher_weights, net.parameters(), strict=True))
    later = [y for y, _ in bcp._pseudo_labels(halves, b["labeled"]["label"])]
    assert all(torch.equal(a, c) for a, c in zip(first_labels, later, strict=True))


def test_bcp_load_pretrain_best_and_errors():
    net = tiny_unet(2)
    bcp = BCP(net, BCPConfig(pretrain_iterations=0, legacy_bg_mask=True, teacher_mode="eval"), ctx(2, (8, 8)))
    best = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in net.state_dict().items()}
    bcp.load_pretrain_best(best)
    res = bcp.step(batch((8, 8)), 0)
    assert res.logs["stage"] == 2.0
    for k, v in bcp.teacher.state_dict().items():
        assert torch.equal(v, best[k])  # not overwritten by the switch (eval mode keeps BN buffers)
    with pytest.raises(MeddaError, match="even"):
        bcp.step(batch((8, 8), b=3), 1)
    with pytest.raises(MeddaError, match="exceeds"):
        BCP(tiny_unet(2), BCPConfig(pretrain_iterations=20), ctx(2, (8, 8), total=10))
    assert BCP(tiny_unet(2), BCPConfig(), ctx(2, (8, 8), total=40)).pretrain_iterations == 10


@pytest.mark.parametrize("dims,shape", [(2, (16, 16)), (3, (8, 8, 8))])
def test_bcp_unmixed_pretraining_sees_the_labelled_batch_as_is(dims, shape):
    """pretrain_loss='unmixed' (a medda option): stage 1 is Seg on the unmixed labelled batch; stage 2 unchanged."""
    net = Recorder(tiny_unet(dims))
    bcp = BCP(net, BCPConfig(pretrain_iterations=1, pretrain_loss="unmixed"), ctx(dims, shape, total=3))
    b = batch(shape)
    res = bcp.step(b, 0)
    x, y = b["labeled"]["image"], b["labeled"]["label"]
    assert len(net.inputs) == 1 and torch.equal(net.inputs[0], x)
    with torch.no_grad():
        expected = seg_loss(net.net(x), y, torch.ones(shape), variant=bcp.dice_variant)
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    reference = BCP(tiny_unet(dims), BCPConfig(pretrain_iterations=1), ctx(dims, shape, total=3))
    reference.step(b, 0)
    net.inputs.clear()
    stage2 = bcp.step(b, 1)
    assert stage2.loss.item() == pytest.approx(reference.step(b, 1).loss.item(), rel=1e-5)
    assert len(net.inputs) == 2  # the inward and outward mixes


def test_bcp_pseudo_confidence_only_narrows_the_pseudo_labelled_terms():
    """pseudo_confidence (a medda option) keeps the confident pseudo-labelled voxels and changes nothing else."""
    b = batch((16, 16))

    def stage2_loss(**options):
        bcp = BCP(tiny_unet(2), BCPConfig(pretrain_iterations=0, **options), ctx(2, (16, 16)))
        return bcp.step(b, 0)

    reference = stage2_loss()
    assert "pseudo_kept_ratio" not in reference.logs
    everything = stage2_loss(pseudo_confidence=1e-6)  # every voxel's top probability exceeds it
    assert everything.logs["pseudo_kept_ratio"] == 1.0
    assert everything.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    # an untrained 3-class net is never 99.99 % sure: nothing pseudo-labelled is kept, the labelled terms remain
    nothing = stage2_loss(pseudo_confidence=0.9999)
    assert nothing.logs["pseudo_kept_ratio"] == 0.0
    assert nothing.loss.item() == pytest.approx(stage2_loss(u_weight=0.0).loss.item(), rel=1e-6)
    some = stage2_loss(pseudo_confidence=0.45)
    assert 0.0 < some.logs["pseudo_kept_ratio"] < 1.0
    assert some.loss.item() != pytest.approx(reference.loss.item(), rel=1e-4)


class FixedLogits(nn.Module):
    """A teacher whose logits are log(probs) for every input: softmax gives `probs` back exactly."""

    def __init__(self, probs: torch.Tensor):  # (K, *S)
        super().__init__()
        self.logits = probs.log()

    def forward(self, x):
        return self.logits.expand(x.shape[0], *self.logits.shape)


def test_bcp_distribution_alignment_hand_values_window_and_resume():
    """distribution_alignment (a medda option): P -> normalise(P * r_l / r_t) before the argmax, r_l the labelled
    class ratios and r_t the teacher's mean probabilities, each averaged over the last `alignment_window` steps."""
    p1 = torch.tensor([0.3, 0.45, 0.6, 0.1])  # the teacher's class-1 probability on a 1 x 4 image
    teacher = FixedLogits(torch.stack([1 - p1, p1]).view(2, 1, 4))
    y_half = torch.tensor([[[0, 1, 1, 0]], [[1, 1, 0, 0]]])  # labelled targets: class 1 is half the voxels
    x = torch.zeros(1, 1, 1, 4)

    def method(**options):
        bcp = BCP(tiny_unet(2, k=2), BCPConfig(pretrain_iterations=0, lcc=False, **options), ctx(2, (1, 4), k=2))
        bcp.teacher = teacher
        return bcp

    reference = method()._pseudo_labels((x, x), y_half)
    assert reference[0][0].tolist() == [[[0, 0, 1, 0]]]  # the plain argmax: only p = 0.6 is class 1
    bcp = method(distribution_alignment=True, pseudo_confidence=0.58)
    (label_a, keep_a), (label_b, _) = bcp._pseudo_labels((x, x), y_half)
    # r_l = (0.5, 0.5); r_t = (0.6375, 0.3625), the mean of P over both halves' voxels
    factor = torch.tensor([0.5 / 0.6375, 0.5 / 0.3625])
    assert torch.allclose(bcp.alignment_factor, factor)
    assert label_a.tolist() == label_b.tolist() == [[[0, 1, 1, 0]]]  # 0.45 * 1.379 > 0.55 * 0.784
    # the kept mask is judged on the aligned probability of the final label: 0.45 -> 0.590, 0.3 -> 0.570 (class 0);
    # on the raw probabilities (0.7, 0.55, 0.6, 0.9) the same threshold would keep (1, 0, 1, 1)
    aligned_top = torch.tensor([0.7 * factor[0], 0.45 * factor[1], 0.6 * factor[1], 0.9 * factor[0]]) / torch.tensor(
        [0.7 * factor[0] + 0.3 * factor[1], 0.55 * factor[0] + 0.45 * factor[1],
         0.4 * factor[0] + 0.6 * factor[1], 0.9 * factor[0] + 0.1 * factor[1]])
    assert keep_a.flatten().tolist() == (aligned_top >= 0.58).float().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert aligned_top[1].item() == pytest.approx(0.58996, abs=1e-4)

    # the window: with 2 steps, a third step's ratios replace the first's
    bcp = method(distribution_alignment=True, alignment_window=2)
    all_background = torch.zeros_like(y_half)
    for y in (all_background, y_half, y_half):
        bcp._pseudo_labels((x, x), y)
    assert len(bcp.labeled_ratios) == 2 and torch.allclose(bcp.alignment_factor, factor)
    # resume restores both histories, so the next factor is the same as without the interruption
    resumed = method(distribution_alignment=True, alignment_window=2)
    resumed.load_state_dict(bcp.state_dict())
    bcp._pseudo_labels((x, x), all_background)
    resumed._pseudo_labels((x, x), all_background)
    assert torch.equal(resumed.alignment_factor, bcp.alignment_factor)
    assert bcp.alignment_factor[1].item() == pytest.approx(0.25 / 0.3625)


def test_bcp_distribution_alignment_logs_its_factors_and_leaves_stage_1_alone():
    b = batch((16, 16))

    def steps(**options):
        bcp = BCP(tiny_unet(2), BCPConfig(pretrain_iterations=1, **options), ctx(2, (16, 16), total=3))
        return bcp.step(b, 0), bcp.step(b, 1)

    (ref1, ref2), (res1, res2) = steps(), steps(distribution_alignment=True)
    assert res1.loss.item() == pytest.approx(ref1.loss.item(), rel=1e-6)
    assert "alignment_factor/1" not in ref2.logs
    assert {f"alignment_factor/{c}" for c in range(3)} <= set(res2.logs)


@pytest.mark.parametrize("dims,shape", [(2, (16, 16)), (3, (8, 8, 8))])
def test_bcp_supervised_weight_adds_the_unmixed_labelled_loss_in_stage_2_only(dims, shape):
    """supervised_weight w (a medda option): stage 2's loss is the reference's + w * Seg on the unmixed labelled
    batch, from a third student forward on exactly that batch; stage 1 is untouched."""
    b = batch(shape)
    x, y = b["labeled"]["image"], b["labeled"]["label"]

    def run(**options):
        net = Recorder(tiny_unet(dims))
        bcp = BCP(net, BCPConfig(pretrain_iterations=1, **options), ctx(dims, shape, total=3))
        return net, bcp, bcp.step(b, 0), bcp.step(b, 1)

    _, _, ref1, ref2 = run()
    net, bcp, res1, res2 = run(supervised_weight=0.7)
    assert res1.loss.item() == pytest.approx(ref1.loss.item(), rel=1e-6) and "loss_sup" not in res1.logs
    assert len(net.inputs) == 1 + 3 and torch.equal(net.inputs[-1], x)  # stage 1: one forward; stage 2: three
    with torch.no_grad():
        sup = seg_loss(net.net(x), y, torch.ones(shape), variant=bcp.dice_variant)
    assert res2.logs["loss_sup"] == pytest.approx(sup.item(), rel=1e-5)
    assert res2.loss.item() == pytest.approx(ref2.loss.item() + 0.7 * sup.item(), rel=1e-5)
    assert res2.logs["loss_in"] == pytest.approx(ref2.logs["loss_in"], rel=1e-6)
    res2.loss.backward()
    assert all(p.grad is None for p in bcp.teacher.parameters())


def test_loop_phase_switch_reloads_best_and_restarts_selection(tmp_path):
    """The engine hands BCP the best stage-1 weights at the switch; the selected model is a stage-2 one."""
    import itertools

    from medda.config import OptimConfig, TrainConfig
    from medda.engine.loop import Validation, run_loop
    from medda.models.factory import read_checkpoint, save_checkpoint

    net = tiny_unet(2)
    bcp = BCP(net, BCPConfig(pretrain_iterations=4), ctx(2, (8, 8), total=8))
    b = batch((8, 8))
    streams = {name: itertools.repeat(b[name]) for name in ("labeled", "unlabeled")}
    scores = {2: 0.9, 4: 0.1, 6: 0.3, 8: 0.2}  # the stage-1 best (iteration 2) beats every stage-2 score
    snapshots, switch = {}, {}

    def save(tag, it):
        return save_checkpoint(tmp_path / f"{tag}.pt", bcp.eval_model(), {"iteration": it})

    def validate(model, it):
        snapshots[it] = {k: v.clone() for k, v in model.state_dict().items()}
        return Validation(scores[it])

    start_phase = bcp.start_phase

    def spy(phase, state):
        start_phase(phase, state)
        switch.update(
            phase=phase,
            student={k: v.clone() for k, v in net.state_dict().items()},
            teacher={k: v.clone() for k, v in bcp.teacher.state_dict().items()},
        )

    bcp.start_phase = spy
    train = TrainConfig(iterations=8, val_every=2, channels_last=False, amp="off")
    result = run_loop(
        bcp, streams, train, OptimConfig(name="sgd", lr=0.01), torch.device("cpu"), None, save, validate
    )
    assert switch["phase"] == 2
    assert not torch.equal(snapshots[2]["model.0.conv.weight"], snapshots[4]["model.0.conv.weight"])
    for k, v in snapshots[2].items():  # student and teacher restart from the stage-1 best, not the last
        assert torch.equal(switch["student"][k], v) and torch.equal(switch["teacher"][k], v)
    assert result.best_iteration == 6 and result.best_score == 0.3
    assert read_checkpoint(result.best_path)["meta"]["iteration"] == 6
    assert [h["iteration"] for h in result.history] == [2, 4, 6, 8]


def test_loop_cross_validation_fold_switches_from_the_last_weights_and_final_run_stops_early(tmp_path):
    """A cross-validation fold (`validation_use="score"`) only scores: it writes no best checkpoint, and BCP's stage 2 starts
    from the last stage-1 weights, as in the final run, which has no validation. `stop_at` ends the run early under
    the full schedule."""
    import itertools

    from medda.config import OptimConfig, TrainConfig
    from medda.engine.loop import Validation, lr_factor, run_loop
    from medda.models.factory import read_checkpoint, save_checkpoint

    net = tiny_unet(2)
    bcp = BCP(net, BCPConfig(pretrain_iterations=4), ctx(2, (8, 8), total=8))
    b = batch((8, 8))
    streams = {name: itertools.repeat(b[name]) for name in ("labeled", "unlabeled")}
    snapshots, switch, lrs = {}, {}, []

    def save(tag, it):
        return save_checkpoint(tmp_path / f"{tag}.pt", bcp.eval_model(), {"iteration": it})

    def validate(model, it):
        snapshots[it] = {k: v.clone() for k, v in model.state_dict().items()}
        return Validation({2: 0.9, 4: 0.1, 6: 0.3}[it])

    start_phase = bcp.start_phase

    def spy(phase, state):
        start_phase(phase, state)
        switch["student"] = {k: v.clone() for k, v in net.state_dict().items()}

    bcp.start_phase = spy
    train = TrainConfig(iterations=8, val_every=2, channels_last=False, amp="off")
    optim = OptimConfig(name="sgd", lr=0.01, schedule="poly")
    result = run_loop(bcp, streams, train, optim, torch.device("cpu"), None, save, validate,
                      log=lambda metrics, it: lrs.extend((it, v) for k, v in metrics.items() if k == "train/lr"),
                      log_every=1,
                      validation_use="score", stop_at=6)
    for k, v in snapshots[4].items():  # the last stage-1 weights (iteration 4), not the best (iteration 2)
        assert torch.equal(switch["student"][k], v)
    assert result.iterations == 6 and [h["iteration"] for h in result.history] == [2, 4, 6]
    assert result.best_path is None and not (tmp_path / "best.pt").exists()
    assert result.best_iteration == 6 and result.best_score == 0.3  # still scored (stage 2's best: 6, not 2)
    assert read_checkpoint(result.last_path)["meta"]["iteration"] == 6
    # the LR after step 6 is the 8-iteration schedule's, not a schedule that ends at 6
    assert dict(lrs)[6] == pytest.approx(0.01 * lr_factor(6, 8, optim))


def test_loop_keeps_a_checkpoint_every_val_every_iterations_without_validation(tmp_path):
    """`train.keep_checkpoints` without a validator (a fixed-budget run) still keeps the trajectory: it<N> every
    `val_every` iterations, each the model of that iteration; the run's model is the last one."""
    import itertools

    from medda.config import OptimConfig, TrainConfig
    from medda.engine.loop import run_loop
    from medda.models.factory import read_checkpoint, save_checkpoint

    net = tiny_unet(2)
    bcp = BCP(net, BCPConfig(pretrain_iterations=2), ctx(2, (8, 8), total=6))
    b = batch((8, 8))
    streams = {name: itertools.repeat(b[name]) for name in ("labeled", "unlabeled")}

    def save(tag, it):
        return save_checkpoint(tmp_path / f"{tag}.pt", bcp.eval_model(), {"iteration": it})

    train = TrainConfig(iterations=6, val_every=2, channels_last=False, amp="off", keep_checkpoints=True)
    result = run_loop(bcp, streams, train, OptimConfig(name="sgd", lr=0.01), torch.device("cpu"), None, save)
    assert sorted(p.name for p in tmp_path.glob("it*.pt")) == ["it2.pt", "it4.pt", "it6.pt"]
    assert [read_checkpoint(tmp_path / f"it{i}.pt")["meta"]["iteration"] for i in (2, 4, 6)] == [2, 4, 6]
    assert result.best_path is None and not result.history
    last, kept = read_checkpoint(result.last_path)["state_dict"], read_checkpoint(tmp_path / "it6.pt")["state_dict"]
    assert all(torch.equal(last[k], kept[k]) for k in last)
    assert not torch.equal(read_checkpoint(tmp_path / "it2.pt")["state_dict"]["model.0.conv.weight"],
                           last["model.0.conv.weight"])


@pytest.mark.parametrize("method", ["bcp", "mean_teacher"])
def test_loop_puts_the_teacher_in_the_batches_memory_format(method):
    """With `train.channels_last`, the EMA teacher's weights take the student's layout (a contiguous teacher ran
    slower convolutions and a 10x slower argmax over its classes), and its values are unchanged."""
    import itertools

    from medda.config import OptimConfig, TrainConfig
    from medda.engine.loop import run_loop

    net = tiny_unet(2)
    learner = (BCP(net, BCPConfig(pretrain_iterations=1), ctx(2, (8, 8), total=2)) if method == "bcp" else
               MeanTeacher(net, MeanTeacherConfig(), ctx(2, (8, 8), total=2)))
    teacher_before = {k: v.clone() for k, v in learner.teacher.state_dict().items()}
    b = batch((8, 8))
    streams = {name: itertools.repeat(b[name]) for name in ("labeled", "unlabeled")}
    convs = [m.weight for m in learner.teacher.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                             for w in convs)
    train = TrainConfig(iterations=1, val_every=1, channels_last=True, amp="off")
    run_loop(learner, streams, train, OptimConfig(name="sgd", lr=1e-12), torch.device("cpu"), None,
             lambda tag, it: None)
    convs = [m.weight for m in learner.teacher.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # really converted (1x1 kernels are both)
    if method == "mean_teacher":  # lr 1e-12: the EMA of a (practically) unchanged student leaves the teacher's weights as they were
        for k, v in learner.teacher.state_dict().items():
            if v.is_floating_point() and "running" not in k:
                assert torch.allclose(v, teacher_before[k], atol=1e-6)


def test_loop_trains_the_same_network_through_torch_compile():
    """`train.compile` runs the training steps through torch.compile: the same updates as eager steps (to float
    tolerance), the teacher copied from the network itself, and `method.model` the plain network outside a step."""
    import itertools

    from medda.config import OptimConfig, TrainConfig
    from medda.engine.loop import run_loop

    def trained(compiled: bool) -> BCP:
        learner = BCP(tiny_unet(2), BCPConfig(pretrain_iterations=2), ctx(2, (8, 8), total=4))
        b = batch((8, 8))
        streams = {name: itertools.repeat(b[name]) for name in ("labeled", "unlabeled")}
        train = TrainConfig(iterations=4, val_every=100, channels_last=False, amp="off", compile=compiled)
        run_loop(learner, streams, train, OptimConfig(name="sgd", lr=0.05), torch.device("cpu"), None,
                 lambda tag, it: None)
        return learner

    torch._dynamo.reset()
    eager, compiled = trained(False), trained(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
    assert type(compiled.model) is UNet and set(compiled.teacher.state_dict()) == set(eager.teacher.state_dict())
    start = tiny_unet(2).state_dict()
    for key, value in eager.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(compiled.model.state_dict()[key], value, atol=1e-5), key
            assert torch.allclose(compiled.teacher.state_dict()[key], eager.teacher.state_dict()[key], atol=1e-5)
    assert not torch.equal(eager.model.state_dict()["model.0.conv.weight"], start["model.0.conv.weight"])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_is_fused_and_updates_as_the_reference(name):
    """Adam(W) runs torch's fused kernel, whose updates equal the per-tensor reference implementation's (on a
    network without batch norm: a bias followed by BN has noise-level gradients that Adam turns into full steps)."""
    from medda.config import OptimConfig
    from medda.engine.loop import build_optimizer

    def network() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))

    fused_net, reference_net = network(), network()
    fused = build_optimizer(list(fused_net.parameters()), OptimConfig(name=name, lr=0.01, weight_decay=0.1))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    reference = cls(reference_net.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"]
    x = batch((8, 8))["labeled"]["image"]
    for _ in range(3):
        for net, opt in ((fused_net, fused), (reference_net, reference)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (key, a), b in zip(fused_net.state_dict().items(), reference_net.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
    assert not torch.equal(fused_net[0].weight, network()[0].weight)
