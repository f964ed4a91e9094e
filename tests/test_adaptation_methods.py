"""Source-free adaptation methods: hand-computed losses and parameter/statistic invariants on a tiny BN net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from medda.errors import MeddaError
from medda.methods import entropy_prior as ep
from medda.methods import losses as L
from medda.methods import osuda as os_
from medda.methods.base import MethodContext, batchnorm_layers
from medda.registry import get_method

torch.set_num_threads(1)
K = 3


def tiny_net(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    layers += [nn.BatchNorm2d(4)] if norm else []
    layers += [nn.ReLU(), nn.Conv2d(4, K, 1)]
    net = nn.Sequential(*layers)
    if norm:  # non-trivial "source" statistics and affine parameters
        bn = net[1]
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([0.5, -0.2, 0.1, 0.0]))
            bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 1.0]))
            bn.weight.copy_(torch.tensor([1.2, 0.8, 1.0, 0.9]))
            bn.bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.2]))
    return net


def ctx(prior=None) -> MethodContext:
    return MethodContext(
        num_classes=K, spatial_dims=2, patch_size=(8, 8), total_iterations=10, class_ratio_prior=prior
    )


def batches(n: int = 3, b: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"unlabeled": {"image": torch.randn(b, 1, 8, 8, generator=g) * 2 + 1}} for _ in range(n)]


def make(name: str, net: nn.Module, prior=None, **options):
    cls = get_method(name)
    return cls(net, cls.Config(**options), ctx(prior))


def run(method, data, lr: float = 1e-2) -> list[dict]:
    """What the engine does: configure, optimiser over the returned params, step/backward/after_step, finalize."""
    params = method.configure()
    opt = torch.optim.Adam(params, lr=lr) if params else None
    logs = []
    for i, batch in enumerate(data):
        res = method.step(batch, i)
        logs.append(res.logs)
        if res.loss is not None:
            opt.zero_grad()
            res.loss.backward()
            opt.step()
        method.after_step(i)
    method.finalize()
    return logs


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def changed(before: dict, net: nn.Module) -> set[str]:
    after = net.state_dict()
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


# ---------------------------------------------------------------- hand-computed losses (AdaMI)

P1 = np.array([0.9, 0.2, 0.5, 0.7])  # class-1 probability of the four pixels of one 2x2 image
PROBS = torch.tensor(np.stack([1 - P1, P1]).reshape(1, 2, 2, 2), dtype=torch.float32)


def test_weighted_entropy_matches_hand_computation():
    nu = np.array([0.1, 0.9])
    p = np.stack([1 - P1, P1])
    expected = -(nu[:, None] * p * np.log(p + 1e-10)).sum() / 4
    got = L.entropy(PROBS, torch.tensor(nu, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    unweighted = -(p * np.log(p + 1e-10)).sum() / 4
    assert L.entropy(PROBS).item() == pytest.approx(unweighted, rel=1e-5)


def test_class_ratio_modes():
    mean = L.class_ratios(PROBS, "mean_softmax")
    np.testing.assert_allclose(mean.numpy(), [[1 - P1.mean(), P1.mean()]], rtol=1e-6)
    p = np.stack([1 - P1, P1])
    s = (p / p.max(axis=0)).sum(axis=1)  # [0.1/0.9+1+1+0.3/0.7, 1+0.25+1+1]
    np.testing.assert_allclose(L.class_ratios(PROBS, "max_normalised").numpy(), [s / s.sum()], rtol=1e-6)
    assert L.class_ratios(PROBS, "max_normalised")[0, 1].item() == pytest.approx(
        3.25 / (3.25 + 2.5396825), rel=1e-6
    )


def test_kl_to_prior_and_zero_at_prior():
    ratios = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    prior = torch.tensor([0.5, 0.5])
    expected = (0.3 * math.log(0.3 / 0.5) + 0.7 * math.log(0.7 / 0.5) + 0.0) / 2
    assert L.kl_divergence(ratios, prior).item() == pytest.approx(expected, rel=1e-5)
    assert L.kl_divergence(torch.tensor([[0.2, 0.8]]), torch.tensor([0.2, 0.8])).item() == pytest.approx(
        0, abs=1e-7
    )
    # a zero prior makes the class' ratio expensive: r (log r - log 1e-10)
    kl0 = L.kl_divergence(torch.tensor([[0.9, 0.1]]), torch.tensor([1.0, 0.0])).item()
    assert kl0 == pytest.approx(0.9 * math.log(0.9) + 0.1 * (math.log(0.1) - math.log(1e-10)), rel=1e-5)


def test_predicted_tags_renormalisation_and_batch_pooling():
    # image 0: argmax class 0 on 3 pixels, class 1 on 1 pixel, class 2 never; image 1: all three present
    p = torch.zeros(2, 3, 2, 2)
    hard0 = torch.tensor([[0, 0], [0, 1]])
    hard1 = torch.tensor([[0, 1], [2, 2]])
    for i, h in enumerate((hard0, hard1)):
        p[i] = 0.1
        p[i].scatter_(0, h[None], 0.8)
    present = ep.presence_tags(p, threshold=0.2)
    assert present.tolist() == [[True, True, False], [True, True, True]]
    prior = torch.tensor([0.7, 0.2, 0.1])
    bg = ep.tagged_prior(prior, present, "background")
    np.testing.assert_allclose(bg.numpy(), [[0.8, 0.2, 0.0], [0.7, 0.2, 0.1]], rtol=1e-6)
    prop = ep.tagged_prior(prior, present, "proportional")
    np.testing.assert_allclose(prop.numpy(), [[0.7 / 0.9, 0.2 / 0.9, 0.0], [0.7, 0.2, 0.1]], rtol=1e-6)
    # threshold above class 1's share (1/4) in image 0 drops it too
    assert ep.presence_tags(p, threshold=0.3)[0].tolist() == [True, False, False]
    pooled = L.class_ratios(p, "mean_softmax", pooled=True)
    np.testing.assert_allclose(pooled.numpy(), L.class_ratios(p).mean(0, keepdim=True).numpy(), rtol=1e-6)


def test_entropy_prior_loss_is_entropy_plus_kl_and_ratios_logged():
    prior = torch.tensor([0.6, 0.3, 0.1])
    m = make("entropy_prior", tiny_net(), prior, class_weights=[0.2, 0.5, 0.3], lambda_kl=2.0)
    m.configure()
    batch = batches(1)[0]
    res = m.step(batch, 0)
    with torch.no_grad():
        probs = torch.softmax(m.model(batch["unlabeled"]["image"]), 1)
    expected = L.entropy(probs, torch.tensor([0.2, 0.5, 0.3])) + 2 * L.kl_divergence(
        L.class_ratios(probs), prior
    )
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert {"loss", "entropy", "prior_kl", "ratio/0", "ratio/1", "ratio/2"} <= set(res.logs)
    assert sum(res.logs[f"ratio/{k}"] for k in range(K)) == pytest.approx(1.0, abs=1e-5)


def test_entropy_prior_refuses_bad_setup():
    with pytest.raises(MeddaError, match="class-ratio prior"):
        make("entropy_prior", tiny_net(), None)
    with pytest.raises(MeddaError, match="2 values but the model predicts 3"):
        make("entropy_prior", tiny_net(), torch.tensor([0.5, 0.5]))
    with pytest.raises(MeddaError, match="class_weights"):
        make("entropy_prior", tiny_net(), torch.tensor([0.5, 0.3, 0.2]), class_weights=[1.0, 1.0])
    with pytest.raises(ValidationError):
        get_method("entropy_prior").Config(ratio_mode="max")
    with pytest.raises(ValidationError):
        get_method("entropy_prior").Config(unknown=1)


# ---------------------------------------------------------------- hand-computed OSUDA pieces


def test_momentum_schedule():
    assert os_.bn_momentum_schedule(0, 0.1, 100.0) == pytest.approx(0.1)
    assert os_.bn_momentum_schedule(3, 0.1, 1.0) == pytest.approx(0.1 * math.exp(-3))
    assert os_.bn_momentum_schedule(100, 0.2, 100.0) == pytest.approx(0.2 / math.e)


def test_transferability_and_alpha_normalisations():
    t1 = os_.channel_transferability(
        torch.tensor([0.0, 1.0]),
        torch.tensor([1.0, 3.0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([1.0, 1.0]),
        eps=0.0,
    )
    np.testing.assert_allclose(t1.numpy(), [1.0, 1 - 1 / math.sqrt(3)], rtol=1e-6)
    t2 = torch.tensor([0.0, 0.5, 3.0])
    inv = np.concatenate([1 / (1 + t1.numpy()), 1 / (1 + t2.numpy())])
    glob = os_.transferability_weights([t1, t2], "global")
    np.testing.assert_allclose(torch.cat(glob).numpy(), 5 * inv / inv.sum(), rtol=1e-6)
    assert torch.cat(glob).sum().item() == pytest.approx(5.0)
    layer = os_.transferability_weights([t1, t2], "layer")
    np.testing.assert_allclose(layer[1].numpy(), 3 * inv[2:] / inv[2:].sum(), rtol=1e-6)
    assert layer[0].sum().item() == pytest.approx(2.0) and layer[1].sum().item() == pytest.approx(3.0)
    # the more a channel's statistics moved, the lower its weight
    assert glob[1][0] > glob[1][1] > glob[1][2]


def test_high_order_consistency_l1_l2():
    a = [torch.tensor([1.0, 2.0])]
    g, b = [torch.tensor([1.5, 1.0])], [torch.tensor([0.0, -1.0])]
    gs, bs = [torch.tensor([1.0, 1.0])], [torch.tensor([0.5, 1.0])]
    l1 = os_.high_order_consistency(a, g, b, gs, bs, "l1", "sum").item()
    l2 = os_.high_order_consistency(a, g, b, gs, bs, "l2", "sum").item()
    assert l1 == pytest.approx(1 * (0.5 + 0.5) + 2 * (0 + 2))
    assert l2 == pytest.approx(1 * (0.25 + 0.25) + 2 * (0 + 4))
    # the default averages over the N = 2 channels
    assert os_.high_order_consistency(a, g, b, gs, bs, "l1").item() == pytest.approx(l1 / 2)


# ---------------------------------------------------------------- invariants on a tiny BN net


def test_none_changes_nothing():
    net = tiny_net()
    before = snapshot(net)
    m = make("none", net)
    assert m.one_pass
    logs = run(m, batches())
    assert not changed(before, net) and not net.training
    assert all(np.isfinite(entry["entropy"]) for entry in logs)


def test_adabn_changes_only_statistics_and_mixes_exactly():
    net = tiny_net()
    before = snapshot(net)
    data = batches(2)
    m = make("adabn", net, w_test=0.25)
    assert m.configure() == [] and m.one_pass
    for i, batch in enumerate(data):
        assert m.step(batch, i).loss is None
    bn = net[1]
    # cumulative average of the per-batch statistics of the (frozen) first conv's output
    with torch.no_grad():
        feats = [net[0](b["unlabeled"]["image"]) for b in data]
    mean_t = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var_t = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var_t, rtol=1e-5, atol=1e-6)
    target_mean, target_var = bn.running_mean.clone(), bn.running_var.clone()
    m.finalize()
    torch.testing.assert_close(bn.running_mean, 0.75 * before["1.running_mean"] + 0.25 * target_mean)
    torch.testing.assert_close(bn.running_var, 0.75 * before["1.running_var"] + 0.25 * target_var)
    assert changed(before, net) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert not net.training and bn.momentum == 0.1
    assert torch.equal(m.source_statistics()[0]["mean"], before["1.running_mean"])


def test_adabn_pure_target_and_empty_stream():
    net = tiny_net()
    m = make("adabn", net)  # w_test = 1: pure AdaBN
    run(m, batches(1))
    with torch.no_grad():
        f = net[0](batches(1)[0]["unlabeled"]["image"])
    torch.testing.assert_close(net[1].running_mean, f.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    empty = make("adabn", tiny_net())
    empty.configure()
    with pytest.raises(MeddaError, match="no target batch"):
        empty.finalize()
    with pytest.raises(ValidationError):
        get_method("adabn").Config(w_test=1.5)


def test_tent_changes_only_bn_affine_and_uses_batch_statistics():
    net = tiny_net()
    before = snapshot(net)
    m = make("tent", net)
    params = m.configure()
    assert {id(p) for p in params} == {id(net[1].weight), id(net[1].bias)}
    opt = torch.optim.Adam(params, lr=1e-2)
    for i, batch in enumerate(batches()):
        res = m.step(batch, i)
        assert {"loss", "entropy", "ratio/0"} <= set(res.logs)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert changed(before, net) == {"1.weight", "1.bias"}
    assert net[1].running_mean is None and not net[1].track_running_stats
    x = batches(1)[0]["unlabeled"]["image"]
    with torch.no_grad():
        train_out = net(x)
        net.eval()
        torch.testing.assert_close(net(x), train_out)  # batch statistics in eval mode too


def test_tent_has_no_episodic_option_and_reference_optimiser():
    # Episodic resets would deliver the model adapted on the last batch only (issue 11, bug 6): refused.
    with pytest.raises(ValidationError):
        get_method("tent").Config(episodic=True)
    assert get_method("tent").default_optim == {"name": "adam", "lr": 1e-3, "weight_decay": 0.0,
                                                "schedule": "constant"}


def test_osuda_schedule_source_copy_and_bn_affine_only():
    net = tiny_net()
    before = snapshot(net)
    m = make("osuda", net, tau=2.0, eta0=0.3)
    seen, inputs = [], []

    def record(mod, args):
        seen.append(mod.momentum)
        inputs.append(args[0].detach())

    net[1].register_forward_pre_hook(record)
    params = m.configure()
    assert {id(p) for p in params} == {id(net[1].weight), id(net[1].bias)}
    source = [{k: v.clone() for k, v in layer.items()} for layer in m.source_copy()]
    opt = torch.optim.Adam(params, lr=1e-2)
    mean = before["1.running_mean"].clone()
    for i, batch in enumerate(batches(4)):
        res = m.step(batch, i)
        eta = seen[-1]
        mean = (1 - eta) * mean + eta * inputs[-1].mean((0, 2, 3))
        torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
        assert {"loss", "entropy", "hsc", "bn_momentum"} <= set(res.logs)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert seen == pytest.approx([0.3 * math.exp(-n / 2.0) for n in range(4)])
    for now, then in zip(m.source_copy(), source, strict=True):
        assert all(torch.equal(now[k], then[k]) for k in then)
    assert torch.equal(source[0]["weight"], before["1.weight"]) and torch.equal(
        source[0]["mean"], before["1.running_mean"]
    )
    assert changed(before, net) == {
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert m.source_copy()[0]["weight"] is not net[1].weight


def test_osuda_hsc_pulls_towards_source():
    net = tiny_net()
    m = make("osuda", net, lambda_entropy=0.0)
    m.configure()
    with torch.no_grad():
        net[1].weight.add_(0.5)
    res = m.step(batches(1)[0], 0)
    assert res.logs["hsc"] == pytest.approx(0.5, rel=1e-5)  # alpha sums to N=4 over one layer, then / N
    summed = make("osuda", tiny_net(), lambda_entropy=0.0, hsc_reduction="sum")
    summed.configure()
    with torch.no_grad():
        summed.model[1].weight.add_(0.5)
    assert summed.step(batches(1)[0], 0).logs["hsc"] == pytest.approx(0.5 * 4, rel=1e-5)
    res.loss.backward()
    assert (net[1].weight.grad > 0).all()


def test_osuda_all_trains_convolutions():
    net = tiny_net()
    before = snapshot(net)
    run(make("osuda", net, trainable="all"), batches(2))
    assert "0.weight" in changed(before, net) and "3.weight" in changed(before, net)


@pytest.mark.parametrize(
    ("trainable", "must_change", "must_keep"),
    [
        ("bn_affine", {"1.weight", "1.running_mean"}, {"0.weight", "3.weight"}),
        ("bn_affine_batch_stats", {"1.weight"}, {"0.weight", "3.weight"}),
        ("all", {"0.weight", "3.weight"}, set()),
    ],
)
def test_entropy_prior_trainable_scopes(trainable, must_change, must_keep):
    net = tiny_net()
    before = snapshot(net)
    logs = run(
        make(
            "entropy_prior",
            net,
            torch.tensor([0.5, 0.3, 0.2]),
            trainable=trainable,
            absent_classes="predicted_tags",
        ),
        batches(2),
    )
    diff = changed(before, net)
    assert must_change <= diff and not (must_keep & diff)
    if trainable == "bn_affine_batch_stats":  # Tent-style: no running statistics left to change
        assert diff == {"1.weight", "1.bias"} and net[1].running_mean is None
    if trainable == "bn_affine":
        assert diff == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert all(np.isfinite(entry["prior_kl"]) for entry in logs)


def test_entropy_prior_batch_mode_runs():
    logs = run(
        make(
            "entropy_prior",
            tiny_net(),
            torch.tensor([0.5, 0.3, 0.2]),
            absent_classes="batch",
            ratio_mode="max_normalised",
        ),
        batches(1),
    )
    assert np.isfinite(logs[0]["loss"])


@pytest.mark.parametrize("name", ["adabn", "tent", "osuda"])
def test_bn_methods_refuse_models_without_batchnorm(name):
    with pytest.raises(MeddaError, match="batch-norm"):
        make(name, tiny_net(norm=False))


def test_finetune_fewshot_supervised_step():
    cls = get_method("finetune_fewshot")
    assert cls.reads_target_labels and cls.streams == ("labeled",)
    net = tiny_net()
    before = snapshot(net)
    g = torch.Generator().manual_seed(2)
    batch = {
        "labeled": {
            "image": torch.randn(2, 1, 8, 8, generator=g),
            "label": torch.randint(0, K, (2, 1, 8, 8), generator=g),
        }
    }
    m = make("finetune_fewshot", net)
    params = m.configure()
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for i in range(3):
        res = m.step(batch, i)
        losses.append(res.loss.item())
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    assert losses[-1] < losses[0] and "0.weight" in changed(before, net)
    m2 = make("finetune_fewshot", tiny_net(), trainable="bn_affine")
    assert len(m2.configure()) == 2
    with pytest.raises(MeddaError, match="batch-norm"):
        make("finetune_fewshot", tiny_net(norm=False), trainable="bn_affine").configure()


def test_registry_classes_and_docs():
    for name in ("none", "adabn", "tent", "entropy_prior", "osuda", "dpl", "shot_im", "finetune_fewshot"):
        cls = get_method(name)
        assert cls.name == name and cls.__module__.startswith("medda.methods.")
        for field in cls.Config.model_fields.values():
            assert field.description
    assert batchnorm_layers(tiny_net()) and not batchnorm_layers(tiny_net(norm=False))
