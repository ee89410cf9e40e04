"""Transport plans: marginals, partial discarding, Sinkhorn vs exact, and failures that are detected."""

from dataclasses import replace

import pytest
import torch

from lightning_intrafusion.ot import (OTConfig, TransportError, cost_from_inner_products, feature_cost, marginal,
                                     transport_map, transport_plan, unit_inner_products)


def _points():
    g = torch.Generator().manual_seed(0)
    kept = torch.randn(3, 5, generator=g, dtype=torch.float64)
    near = kept + 0.01 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    far = -kept[:1] * 3 + 0.5
    return torch.cat([kept, near, far]), kept  # 7 sources, 3 targets


def test_balanced_map_moves_every_channel_whole_and_duplicates_to_their_twin():
    sources, targets = _points()
    cost = feature_cost(sources, targets, p=2)
    a, b = marginal(7, like=cost), marginal(3, like=cost)
    plan = transport_plan(cost, a, b, OTConfig(formulation="balanced"))
    assert torch.allclose(plan.sum(1), a) and torch.allclose(plan.sum(0), b)
    t = transport_map(plan, a)
    assert torch.allclose(t.sum(0), torch.ones(7, dtype=t.dtype))
    for i in range(3):  # kept channel i and its near twin 3+i go to target i
        assert t[i, i] > 0.99 and t[i, 3 + i] > 0.3


def test_partial_discards_a_channel_far_from_every_kept_one():
    sources, targets = _points()
    cost = feature_cost(sources, targets, p=2)
    a, b = marginal(7, like=cost), marginal(3, like=cost)
    t = transport_map(transport_plan(cost, a, b, OTConfig(formulation="partial", max_cost=0.5)), a)
    assert t[:, 6].sum() == pytest.approx(0.0, abs=1e-9)  # the far channel is dropped, as plain pruning would
    assert all(t[i, 3 + i] == pytest.approx(1.0) for i in range(3))  # near twins are merged


def test_absolute_discard_cost_does_not_depend_on_the_other_channels():
    # source 0 is a kept channel, 1 lies at distance 0.3 from it, 2 at 0.9: only 1 is within 0.5
    cost = torch.tensor([[0.0], [0.3], [0.9]], dtype=torch.float64)
    a, b = marginal(3, like=cost), marginal(1, like=cost)
    config = OTConfig(formulation="partial", max_cost=0.5, max_cost_scale="absolute")
    t = transport_map(transport_plan(cost, a, b, config), a)
    assert t[0, 1] == pytest.approx(1.0) and t[0, 2] == pytest.approx(0.0, abs=1e-9)
    far = transport_map(transport_plan(cost * 10, a, b, config), a)  # same layout, ten times the distances
    assert far[0, 1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_kept_sources_keep_themselves_and_the_rest_is_solved_alone(solver):
    """With ``identity``, the kept channels' own mass stays on them, channels that cannot be merged
    anywhere are discarded without entering the problem, and the result matches the full problem."""
    sources, targets = _points()  # sources 0-2 are the targets, 3-5 their near twins, 6 far from all
    cost = feature_cost(sources, targets, p=2)
    a, b = marginal(7, like=cost), marginal(3, like=cost)
    config = OTConfig(formulation="partial", max_cost=0.5, solver=solver)
    reduced = transport_plan(cost, a, b, config, identity=torch.arange(3))
    full = transport_plan(cost, a, b, config)
    assert torch.equal(reduced.diagonal(), a[:3])  # exact, not solved
    assert torch.equal(reduced[6], torch.zeros(3, dtype=reduced.dtype))  # never entered the problem
    assert torch.allclose(reduced, full, atol=1e-3 if solver == "sinkhorn" else 1e-12)
    assert (reduced.sum(0) <= b + 1e-12).all() and (reduced.sum(1) <= a + 1e-12).all()


def test_sinkhorn_approximates_exact_transport():
    g = torch.Generator().manual_seed(1)
    sources = torch.randn(12, 4, generator=g, dtype=torch.float64)
    cost = feature_cost(sources, sources[:6], p=2)
    a, b = marginal(12, like=cost), marginal(6, like=cost)
    exact = transport_plan(cost, a, b, OTConfig(formulation="balanced"))
    entropic = transport_plan(cost, a, b, OTConfig(formulation="balanced", solver="sinkhorn", sinkhorn_reg=0.01))
    assert torch.allclose(entropic.sum(1), a, atol=1e-5)
    assert (exact * cost).sum() <= (entropic * cost).sum() + 1e-9
    assert (entropic * cost).sum() == pytest.approx((exact * cost).sum().item(), rel=0.1)


def test_compensated_groups_without_batchnorm_merge_only_channels_computing_nearly_the_same():
    def threshold(config, **kwargs):
        group = config.for_group(batch_normalized=False, **kwargs)
        return group.max_cost, group.max_cost_scale, group.features

    assert threshold(OTConfig()) == (1.3, "absolute", "all")
    assert threshold(OTConfig(), compensated=True) == (0.9, "absolute", "producer")
    assert threshold(OTConfig(max_cost_without_bn_compensated=None), compensated=True) == (1.3, "absolute", "all")
    assert OTConfig(max_cost_without_bn=None).for_group(batch_normalized=False, compensated=True) == OTConfig(max_cost_without_bn=None)
    assert OTConfig().for_group(batch_normalized=True, compensated=True) == OTConfig()
    assert threshold(OTConfig(), heads=True, compensated=True) == (0.5, "absolute", "producer")  # the heads' rule
    # linear compensation on calibration data: near-duplicates only, in every group, with exact plans
    regressed = OTConfig().resolved(True, regressed=True)
    assert (regressed.max_cost, regressed.max_cost_scale, regressed.solver) == (0.5, "absolute", "emd")
    assert threshold(regressed)[0] == threshold(regressed, compensated=True)[0] == 0.5
    assert OTConfig().for_group(batch_normalized=True).resolved(True, True).max_cost == 0.5
    balanced = OTConfig(formulation="balanced")  # merges everything: Sinkhorn after re-estimation, as without regression
    assert balanced.resolved(True, True) == balanced.resolved(True) and balanced.resolved(True, True).solver == "sinkhorn"
    assert balanced.for_group(batch_normalized=False, compensated=True) == balanced
    unlimited = OTConfig(max_cost_regressed=None)
    assert unlimited.resolved(True, True) == unlimited.resolved(True)  # merges as with mean compensation
    paper = OTConfig.paper()
    assert not paper.gaussian_compensation
    assert paper.resolved(True, regressed=True) == replace(paper, solver="emd") == paper
    with pytest.raises(ValueError, match="max_cost_without_bn_compensated"):
        OTConfig(max_cost_without_bn_compensated=0.0)


def test_depthwise_rule_applies_only_where_statistics_are_re_estimated():
    assert OTConfig().resolved(recalibrated=True, regressed=True).depthwise_max_cost == 0.5
    assert OTConfig().resolved(recalibrated=False).depthwise_max_cost is None


def test_auto_solver_is_exact_unless_statistics_are_re_estimated():
    assert OTConfig().solver == "auto"
    assert OTConfig().resolved(recalibrated=False).solver == "emd"
    assert OTConfig().resolved(recalibrated=True).solver == "sinkhorn"
    for explicit in ("emd", "sinkhorn"):  # an explicit choice is kept either way
        assert OTConfig(solver=explicit).resolved(recalibrated=True).solver == explicit
        assert OTConfig(solver=explicit).resolved(recalibrated=False).solver == explicit
    # a plan on its own knows of no re-estimation: "auto" solves exactly
    g = torch.Generator().manual_seed(2)
    sources = torch.randn(10, 3, generator=g, dtype=torch.float64)
    cost = feature_cost(sources, sources[:4], p=2)
    a, b = marginal(10, like=cost), marginal(4, like=cost)
    exact = transport_plan(cost, a, b, OTConfig(solver="emd"), identity=torch.arange(4))
    entropic = transport_plan(cost, a, b, OTConfig(solver="sinkhorn"), identity=torch.arange(4))
    assert torch.equal(transport_plan(cost, a, b, OTConfig(), identity=torch.arange(4)), exact)
    assert not torch.allclose(entropic, exact, atol=1e-6)


def test_failures_are_detected():
    cost = torch.rand(20, 10, dtype=torch.float64)
    a, b = marginal(20, like=cost), marginal(10, like=cost)
    with pytest.raises(TransportError, match="num_iter_max"):
        transport_plan(cost, a, b, OTConfig(formulation="balanced", num_iter_max=3))
    with pytest.raises(TransportError, match="NaN or inf"):
        transport_plan(cost.clone().fill_(float("nan")), a, b, OTConfig())
    # a partial problem Sinkhorn needs a few thousand iterations for: the cap decides
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    slow = feature_cost(x, x[:20], p=2)
    a, b = marginal(40, like=slow), marginal(20, like=slow)
    with pytest.raises(TransportError, match="did not converge within num_iter_max=3500"):
        transport_plan(slow, a, b, OTConfig(solver="sinkhorn", num_iter_max=3500))
    plan = transport_plan(slow, a, b, OTConfig(solver="sinkhorn"))
    assert (plan.sum(0) <= b + 1e-5).all() and (plan.sum(1) <= a + 1e-5).all() and plan.sum() > 0.5


def test_importance_marginals_are_proportional_and_never_zero():
    m = marginal(4, torch.tensor([0.0, 1.0, 1.0, 2.0]), like=torch.zeros(1, dtype=torch.float64))
    assert m.sum() == pytest.approx(1.0) and (m > 0).all() and m[3] > m[1] > m[0]


@pytest.mark.parametrize("field, value", [("solver", "hungarian"), ("formulation", "fuzzy"), ("p", 0.0),
                                          ("max_cost", -1.0), ("max_cost_scale", "mean"), ("head_max_cost", 0.0), ("producer_merge", "max"), ("features", "bias")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        OTConfig(**{field: value})


@pytest.mark.parametrize("normalize", [True, False])
def test_costs_from_inner_products_equal_the_distances_of_the_features(normalize):
    """The p=2 ground cost needs only inner products and norms: equal to the features' own distances (zero
    rows included), also for units of several channels whose features are concatenated."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 7, generator=g, dtype=torch.float64)
    features[5] = 0.0
    targets = torch.tensor([0, 3, 5, 8])
    norms = features.pow(2).sum(1)
    expected = feature_cost(features, features[targets], p=2, normalize=normalize)
    got = cost_from_inner_products(features @ features[targets].T, norms, norms[targets], normalize=normalize)
    assert torch.allclose(got, expected, atol=1e-6)
    units = features.reshape(4, 21)  # units of 3 consecutive channels
    expected = feature_cost(units, units[[1, 2]], p=2, normalize=normalize)
    cross = unit_inner_products(features @ features[3:9].T, 3)  # channels of units 1 and 2
    got = cost_from_inner_products(cross, norms.reshape(4, 3).sum(1), norms[3:9].reshape(2, 3).sum(1), normalize=normalize)
    assert torch.allclose(got, expected, atol=1e-6)


def test_kept_channels_cost_nothing_to_themselves_whatever_the_rounding():
    """Rounding residues on a kept channel's cost to itself (costs from inner products) must not count in
    the median that scales the discard cost: here they would lower it from 1.0 to 0.95 and the removed
    channel 3 (nearest kept channel at 0.95) would be discarded instead of merged."""
    residue = 1e-3
    cost = torch.tensor([[residue, 1.0], [1.0, residue], [0.9, 1.2], [1.1, 0.95]], dtype=torch.float64)
    a, b = marginal(4, like=cost), marginal(2, like=cost)
    plan = transport_plan(cost, a, b, OTConfig(formulation="partial", max_cost=1.0), identity=torch.tensor([0, 1]))
    assert plan[3].sum() > 0 and plan[2].sum() > 0  # both removed channels merged
    assert plan[0, 0] > 0 and plan[1, 1] > 0
