"""Issue 11: the prior/statistics fixes and the two new source-free methods (DPL, SHOT-IM), on tiny tensors."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medda.api import _method_optim
from medda.config import DataConfig, load_config
from medda.data.cards import load_card
from medda.data.loading import Data, tiles
from medda.data.priors import Prior, measure_class_prior, summarise_ratios
from medda.methods import losses as L
from medda.methods.base import MethodContext, head_parameters
from medda.methods.dpl import prototype_labels
from medda.registry import get_method
from medda.selection import tile_ratios

torch.set_num_threads(1)
K = 3


def tiny_net(channels: int = 4, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    layers += [nn.Dropout2d(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Conv2d(channels, K, 1))


def ctx(prior=None, presence=None) -> MethodContext:
    return MethodContext(num_classes=K, spatial_dims=2, patch_size=(8, 8), total_iterations=10,
                         class_ratio_prior=prior, class_presence=presence)


def make(name: str, net: nn.Module, prior=None, presence=None, **options):
    cls = get_method(name)
    return cls(net, cls.Config(**options), ctx(prior, presence))


def image_batch(b: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"unlabeled": {"image": torch.randn(b, 1, 8, 8, generator=g) * 2 + 1}}


# ----------------------------------------------------------------------- priors measured the way methods see images
def test_tiles_pad_small_images_and_cover_large_ones_with_inference_windows():
    volume = torch.zeros(1, 4, 4, 3)
    volume[0, :2, :2, :] = 1
    data2d = DataConfig(card="c.yaml", mode="2d", patch_size=[8, 8], slice_axis=2)
    t = tiles(volume, data2d)
    assert t.shape == (3, 1, 8, 8) and float(t[0].sum()) == 4  # zero-padded, nothing lost
    data3d = DataConfig(card="c.yaml", mode="3d", patch_size=[4, 4, 4])
    # 8 x 4 x 6: two windows along x (0, 4), one along y, two along z (0, 2: overlapping, no padding added)
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 8, 4, 6)
    t3 = tiles(ramp, data3d)
    assert t3.shape == (4, 1, 4, 4, 4)
    assert t3[0, 0, 0, 0].tolist() == [0, 1, 2, 3] and t3[1, 0, 0, 0].tolist() == [2, 3, 4, 5]


def test_prior_counts_the_padded_patch_area_and_marginal_includes_empty_images():
    # Bug 3: a 4x4 slice with 4 foreground pixels inside an 8x8 patch covers 4/64 of the image the model sees,
    # not 4/16; bug 1/2: the marginal prior averages over every image, empty ones included.
    ratios = np.array([[60 / 64, 4 / 64, 0.0], [1.0, 0.0, 0.0]])
    record = summarise_ratios(ratios, ["background", "a", "b"], cases=1, geometry="2d 8x8")
    assert record["conditional"]["a"] == pytest.approx(4 / 64)
    assert record["presence"]["a"] == pytest.approx(0.5)
    assert record["marginal"]["a"] == pytest.approx(2 / 64)
    prior = Prior.from_record(record, ["background", "a", "b"], "train")
    assert prior.marginal == pytest.approx([1 - 2 / 64, 2 / 64, 0.0])


def test_measured_prior_equals_the_monitor_ratio_of_a_perfect_prediction(tmp_path):
    """Prior and monitor measure the same way: a one-hot prediction of the labels has KL 0 to the prior."""
    label = np.zeros((6, 5, 4), np.int16)
    label[1:4, 1:3, 1:3] = 1
    label[2, 2, 1] = 2
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=label.shape).astype(np.float32) + 5, affine),
             tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    card_path = tmp_path / "card.yaml"
    card_path.write_text("name: t\nsite: s\ndescription: d\nanatomy: a\nmodality: MRI\nprovenance: p\nlicence: l\n"
                         "citation: c\nspacing: [1, 1, 1]\norientation: native\nintensity: {method: zscore}\nlabels:\n"
                         "  - {code: 0, id: 0, name: background}\n  - {code: 1, id: 1, name: a}\n"
                         "  - {code: 2, id: 2, name: b}\n")
    card = load_card(card_path)
    data = DataConfig(card=card_path, mode="2d", patch_size=[8, 8], cache=False, foreground_crop=False)
    case = {"id": "c", "image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    record = measure_class_prior(card, data, [case], str(card_path))
    assert record["images"] == 4 and record["presence"]["b"] == pytest.approx(0.25)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(label).long(), K).permute(3, 0, 1, 2)[None].float()
    predicted = tile_ratios(onehot, data).mean(dim=0)
    marginal = torch.tensor(Prior.from_record(record, card.class_names, "train").marginal)
    torch.testing.assert_close(predicted, marginal.float(), atol=1e-6, rtol=1e-5)
    assert float(L.kl_divergence(predicted, marginal)) == pytest.approx(0.0, abs=1e-6)
    # Class "a" covers 5 and 6 pixels of its two slices, counted against the 8x8 patch, not the 6x5 slice.
    assert record["conditional"]["a"] == pytest.approx(5.5 / 64, abs=1e-6)


def test_entropy_prior_batch_mode_compares_the_pooled_ratio_with_the_marginal_prior():
    # Bug 2: slices pooled over a batch include slices without the structure.
    prior, presence = torch.tensor([0.8, 0.1, 0.1]), torch.tensor([1.0, 0.5, 1.0])
    m = make("entropy_prior", tiny_net(), prior, presence, absent_classes="batch", lambda_entropy=0.0)
    m.configure()
    batch = image_batch()
    res = m.step(batch, 0)
    with torch.no_grad():
        probs = torch.softmax(m.model(batch["unlabeled"]["image"]), 1)
    marginal = torch.tensor([0.85, 0.05, 0.1])
    expected = L.kl_divergence(L.class_ratios(probs, pooled=True), marginal)
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert L.marginal_prior(prior, presence).tolist() == pytest.approx(marginal.tolist())


# ----------------------------------------------------------------------- AdaBN: one complete, ordered pass
def test_full_pass_visits_every_slice_once_in_order(tmp_path):
    from medda.data.phantoms import write_phantom_dataset

    root = write_phantom_dataset(tmp_path, ("A",), cases_per_site=3, seed=3, fov_mm=(64.0, 64.0, 48.0))
    cfg = load_config(None, ["data.card=data_cards/phantom_site_a.yaml", f"data.target.path={root / 'A' / 'datalist.json'}",
                             "data.mode=2d", "data.patch_size=[32,32]", "data.slice_axis=2", "data.cache=false"])
    data = Data.load(cfg.data)
    cases = data.cases(cfg.data.target, "target")
    stream, length = data.full_pass(cases, batch_images=5)
    batches = [next(stream) for _ in range(length)]
    from medda.data.transforms import inference_chain

    chain = inference_chain(data.card, cfg.data, False)
    volumes = [chain({"image": c["image"]})["image"] for c in cases]
    expected = torch.cat([tiles(v, cfg.data) for v in volumes])
    assert expected.shape[0] >= sum(int(v.shape[3]) for v in volumes)  # every slice, larger ones in windows
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), expected)  # all once, in order
    assert all(b["image"].shape[1:] == (1, 32, 32) and b["image"].shape[0] <= 5 for b in batches)
    again = [next(data.full_pass(cases, 5)[0])["image"] for _ in range(1)]
    torch.testing.assert_close(again[0], batches[0]["image"])  # deterministic


# ----------------------------------------------------------------------- OSUDA: gamma/beta adapt, consistency restrains
def _osuda_affine_shift(**options) -> float:
    """Mean |change| of BN gamma/beta after 30 OSUDA steps on a small MONAI UNet (~500 BN channels)."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, K, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="batch")
    cls = get_method("osuda")
    m = cls(net, cls.Config(**options), MethodContext(num_classes=K, spatial_dims=2, patch_size=(32, 32),
                                                         total_iterations=30))
    params = m.configure()
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    for i in range(30):
        x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 + 1
        res = m.step({"unlabeled": {"image": x}}, i)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    return float(sum((p.detach() - s).abs().mean() for p, s in zip(params, start, strict=True)) / len(params))


def test_osuda_mean_consistency_lets_gamma_beta_adapt_and_still_restrains_them():
    # Bug 5: summed over channels, the L1 consistency's subgradient (~alpha ~ 1 per parameter) outweighs the entropy
    # gradient (~1e-3): gamma/beta stay at the source values and OSUDA reduces to BN-statistics adaptation.
    adapted = _osuda_affine_shift(hsc_reduction="mean")
    pinned = _osuda_affine_shift(hsc_reduction="sum")
    assert adapted > 10 * pinned, (adapted, pinned)
    # The consistency still restrains: with a weaker entropy term (relatively stronger consistency) they move less.
    assert _osuda_affine_shift(hsc_reduction="mean", lambda_entropy=0.01) < 0.5 * adapted


# ----------------------------------------------------------------------- reference optimisers by default
def test_method_reference_optimiser_fills_only_unset_fields():
    base = ["data.card=data_cards/phantom_site_a.yaml", "method.name=entropy_prior"]
    cfg = load_config(None, base)
    optim = _method_optim(cfg)
    assert (optim.name, optim.lr, optim.weight_decay, optim.schedule) == ("adam", 1e-6, 1e-4, "constant")
    cfg = load_config(None, [*base, "optim.lr=0.0001"])
    optim = _method_optim(cfg)
    assert (optim.name, optim.lr, optim.weight_decay) == ("adam", 1e-4, 1e-4)
    assert _method_optim(load_config(None, ["data.card=x.yaml", "method.name=shot_im"])).name == "sgd"
    supervised = _method_optim(load_config(None, ["data.card=x.yaml", "method.name=supervised"]))
    assert supervised == load_config(None, ["data.card=x.yaml"]).optim  # no recipe: the config defaults


# ----------------------------------------------------------------------- SHOT-IM
def test_shot_im_loss_is_entropy_plus_diversity_and_head_stays_frozen():
    net = tiny_net()
    m = make("shot_im", net)
    params = m.configure()
    head = {id(p) for p in head_parameters(net, K)}
    assert head == {id(net[3].weight), id(net[3].bias)} and not head & {id(p) for p in params}
    batch = image_batch()
    res = m.step(batch, 0)
    with torch.no_grad():
        probs = torch.softmax(net(batch["unlabeled"]["image"]), 1)
    pbar = probs.mean(dim=(0, 2, 3))
    entropy = -(probs * torch.log(probs + 1e-10)).sum(1).mean()
    assert res.loss.item() == pytest.approx(float(entropy + (pbar * torch.log(pbar + 1e-10)).sum()), rel=1e-4)
    head_before = net[3].weight.detach().clone()
    opt = torch.optim.SGD(params, lr=0.1)
    res.loss.backward()
    opt.step()
    assert torch.equal(net[3].weight, head_before) and net[3].weight.grad is None


def test_shot_im_prior_diversity_target_is_kl_to_the_marginal_prior():
    prior, presence = torch.tensor([0.8, 0.1, 0.1]), torch.tensor([1.0, 1.0, 0.5])
    m = make("shot_im", tiny_net(), prior, presence, diversity_target="prior", lambda_div=2.0)
    m.configure()
    batch = image_batch()
    res = m.step(batch, 0)
    with torch.no_grad():
        probs = torch.softmax(m.model(batch["unlabeled"]["image"]), 1)
    expected = L.entropy(probs) + 2 * L.kl_divergence(L.class_ratios(probs, pooled=True),
                                                      torch.tensor([0.85, 0.1, 0.05]))
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-4)


# ----------------------------------------------------------------------- DPL
def test_prototype_labels_by_hand():
    # Four pixels, 1-D features; class 0 confident at f=0, class 1 confident at f=10; a pixel labelled 1 sits at
    # f=1 (nearer prototype 0): prototype denoising must relabel it 0.
    features = torch.tensor([0.0, 10.0, 1.0, 9.0]).view(1, 1, 2, 2)
    labels = torch.tensor([[0, 1], [1, 1]])
    probs = torch.zeros(1, 2, 2, 2)
    probs[0, 0] = torch.tensor([[0.9, 0.1], [0.4, 0.2]])
    probs[0, 1] = 1 - probs[0, 0]
    confident = torch.tensor([[[True, True], [False, True]]])
    proto = prototype_labels(features, probs, labels[None], confident, 2)
    # prototype 1 = (10 * 0.9 + 9 * 0.8) / (0.9 + 0.8) = 9.53; prototype 0 = 0
    assert proto.tolist() == [[[0, 1], [0, 1]]]


def test_dpl_trains_only_on_certain_pixels_whose_prototype_agrees():
    net = tiny_net(dropout=0.3)
    m = make("dpl", net, passes=6, uncertainty_threshold=0.05)
    assert m.mode == "mc_dropout"
    m.configure()
    batch = image_batch()
    labels, keep = m.pseudo_labels(batch["unlabeled"]["image"])
    assert labels.shape == keep.shape == (4, 8, 8) and 0 < keep.float().mean() < 1
    with torch.no_grad():  # the labeller: BN on the batch's statistics, dropout off
        labeller = m.source.train()
        for mod in labeller.modules():
            if isinstance(mod, nn.Dropout2d):
                mod.eval()
        source_labels = labeller(batch["unlabeled"]["image"]).argmax(1)
    assert (labels[keep] == source_labels[keep]).float().mean() > 0.9
    res = m.step(batch, 0)
    logits = net(batch["unlabeled"]["image"]).float()
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    # The loss is the CE averaged over the kept pixels only (dropout makes the student pass stochastic).
    assert math.isfinite(res.loss.item()) and 0 < res.logs["kept_fraction"] < 1
    assert float(((ce * keep).sum() / keep.sum()).detach()) == pytest.approx(res.loss.item(), rel=0.5)


def test_dpl_without_dropout_uses_flip_passes_and_refuses_mc_dropout():
    from medda.errors import MeddaError

    m = make("dpl", tiny_net(), passes=4)
    assert m.mode == "augmentation"
    with pytest.raises(MeddaError, match="dropout"):
        make("dpl", tiny_net(), uncertainty="mc_dropout")
    m.configure()
    before = {k: v.clone() for k, v in m.source.state_dict().items()}
    res = m.step(image_batch(), 0)
    res.loss.backward()
    assert all(torch.equal(before[k], v) for k, v in m.source.state_dict().items())  # the labeller never changes
    assert get_method("dpl").default_optim == {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "constant"}
