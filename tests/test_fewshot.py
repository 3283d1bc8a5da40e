"""Unit tests of the few-shot numerics (client/fewshot): shapes, known answers, honest folds."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from client.adapters import LinearProbe, RowSpace, power_features
from client.fewshot.gda import covariance_basis, fit_gda, fusion_scale
from client.fewshot.methods import (
    AnchoredLinearProbe,
    Classifier,
    FitContext,
    Gda,
    Params,
    PlainLinearProbe,
    SpacedClassifier,
    TipCache,
    ZeroShot,
    default_methods,
)
from client.fewshot.probes import class_anchor_weights, fit_anchored_probe
from client.fewshot.select import (
    NO_PRIOR,
    calibrate,
    choose,
    cross_validate,
    ensemble_of,
    refit,
    select_and_fit,
)
from client.fewshot.shots import Shots, default_folds, stratified_folds
from client.fewshot.templates import class_texts, ensemble, template_set

SCALE = 30.0


def gaussians(
    n_per_class: int, classes: int = 3, dim: int = 16, separation: float = 4.0, seed: int = 0, views: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) samples of classes with distinct means and one shared covariance."""
    g = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(classes, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    noise = torch.randn(labels.numel(), views, dim, generator=g) @ mix.T
    return means[labels].unsqueeze(1) + noise, labels, means


# -- shots and folds ----------------------------------------------------------------------------


def test_shots_shapes_and_views() -> None:
    feats, labels, _ = gaussians(4, views=3)
    shots = Shots.of(feats, labels, 3)
    x, y = shots.flat()
    assert x.shape == (36, 16) and y.tolist() == labels.repeat_interleave(3).tolist()
    assert torch.allclose(shots.features.norm(dim=-1), torch.ones(12, 3))
    assert shots.with_views(1).features.shape == (12, 1, 16)
    assert Shots.of(feats[:, 0], labels, 3).views == 1
    with pytest.raises(ValueError):
        Shots.of(feats, labels, 2)  # label 2 out of range
    with pytest.raises(ValueError):
        shots.with_views(4)


def test_stratified_folds_partition_each_class() -> None:
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=1)
    joined = torch.cat(folds)
    assert sorted(joined.tolist()) == list(range(15))  # a partition: every image exactly once
    for fold in folds:
        counts = torch.bincount(labels[fold], minlength=3).tolist()
        for count, n_k in zip(counts, (7, 5, 3), strict=True):
            assert n_k // 3 <= count <= -(-n_k // 3)  # ⌊n_k/3⌋ or ⌈n_k/3⌉ of each class
    assert [f.tolist() for f in stratified_folds(labels, 3, seed=1)] == [f.tolist() for f in folds]
    assert default_folds(Shots.of(torch.randn(15, 4), labels, 3)) == 3
    with pytest.raises(ValueError):
        stratified_folds(labels, 1, seed=0)


# -- GDA ------------------------------------------------------------------------------------------


def test_gda_separates_gaussians_on_fresh_samples() -> None:
    feats, labels, _ = gaussians(40, seed=1)
    model = fit_gda(Shots.of(feats, labels, 3), shrinkage=0.1)
    fresh, fresh_labels, _ = gaussians(200, seed=1)  # same means and covariance, more draws
    predictions = model.logits(F.normalize(fresh[:, 0], dim=-1)).argmax(dim=1)
    assert float((predictions == fresh_labels).float().mean()) > 0.95


def test_gda_full_shrinkage_is_the_nearest_class_mean() -> None:
    """With Σ replaced by (tr Σ / d)·I, GDA's logits rank classes by Euclidean distance to μ_k."""
    feats, labels, _ = gaussians(10, seed=2)
    shots = Shots.of(feats, labels, 3)
    basis = covariance_basis(shots)
    x, _ = shots.flat()
    distances = torch.cdist(x.double(), basis.means)
    gda = basis.model(1.0).logits(x)
    assert torch.equal(gda.argmax(dim=1), distances.argmin(dim=1))


def test_gda_with_one_image_per_class_is_the_nearest_class_mean() -> None:
    """Σ = 0 (one shot per class, as in a 1-shot fold): finite logits, nearest-mean ranking."""
    feats, labels, _ = gaussians(1, seed=12)
    shots = Shots.of(feats, labels, 3)
    model = fit_gda(shots, 0.5)
    queries = F.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    logits = model.logits(queries)
    assert torch.isfinite(logits).all()
    nearest = torch.cdist(queries, shots.features[:, 0]).argmin(dim=1)
    assert torch.equal(logits.argmax(dim=1), nearest)


def _gda_by_solve(shots: Shots, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GDA's weight Σ_λ⁻¹μ, and the class means μ, by a direct d×d solve (the reference)."""
    x, y = shots.flat()
    x = x.double()
    means = torch.stack([x[y == k].mean(dim=0) for k in range(shots.num_classes)])
    centred = x - means[y]
    cov = centred.T @ centred / x.shape[0]
    eye = torch.eye(shots.dim, dtype=torch.float64)
    shrunk = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / shots.dim * eye
    return torch.linalg.solve(shrunk, means.T), means


def test_gda_weight_solves_the_shrunk_covariance() -> None:
    feats, labels, _ = gaussians(50, dim=8, seed=3, views=2)
    shots = Shots.of(feats, labels, 3)
    expected_w, means = _gda_by_solve(shots, 0.3)
    model = fit_gda(shots, 0.3)
    assert torch.allclose(model.weight.double(), expected_w, rtol=1e-4, atol=1e-4)
    expected_b = -0.5 * (means.T * expected_w).sum(dim=0)
    assert torch.allclose(model.bias.double(), expected_b, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError):
        covariance_basis(shots).model(0.0)


def test_gda_with_fewer_images_than_dimensions_solves_the_shrunk_covariance() -> None:
    # n = 12 < d = 40: the eigenbasis comes from the n×n Gram matrix, rank n − C.
    feats, labels, _ = gaussians(4, dim=40, seed=8)
    shots = Shots.of(feats, labels, 3)
    expected_w, _ = _gda_by_solve(shots, 0.2)
    basis = covariance_basis(shots)
    assert basis.eigenvectors.shape == (40, 12 - 3)
    assert torch.allclose(basis.model(0.2).weight.double(), expected_w, rtol=1e-4, atol=1e-3)


def test_fusion_scale_matches_spreads() -> None:
    a = torch.randn(50, 4)
    assert fusion_scale(3 * a, a) == pytest.approx(3.0, rel=1e-5)


# -- probes ---------------------------------------------------------------------------------------


def test_anchored_probe_stays_at_the_prior_when_strongly_anchored() -> None:
    feats, labels, _ = gaussians(20, seed=4)
    shots = Shots.of(feats, labels, 3)
    prior = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    stiff = fit_anchored_probe(shots, prior, SCALE, strength=1e6, adaptive=False)
    assert torch.allclose(stiff.weight, prior, atol=1e-3)
    free = fit_anchored_probe(shots, prior, SCALE, strength=1e-4, adaptive=False)
    x, y = shots.flat()
    assert float((free.logits(x).argmax(dim=1) == y).float().mean()) == 1.0  # separable: fits
    assert float((stiff.weight - prior).norm()) < float((free.weight - prior).norm())


def test_probes_fitted_in_the_span_of_the_shots_are_the_full_space_fits() -> None:
    # 24 images in 64 dimensions: the optimum lies in their 24-d span (RowSpace), so solving
    # there must give the classifier the full-space solve gives (to L-BFGS's stopping tolerance).
    feats, labels, _ = gaussians(8, dim=64, seed=9, separation=1.0)
    shots = Shots.of(feats, labels, 3)
    x, y = shots.flat()
    full, auto = RowSpace(None), RowSpace.of(x)
    assert auto.basis is not None and auto.basis.shape == (64, 24)
    probe_full = LinearProbe(64, 3, weight_decay=1e-2).fit(x, y, full)
    probe_span = LinearProbe(64, 3, weight_decay=1e-2).fit(x, y)
    assert torch.allclose(probe_span.linear.weight, probe_full.linear.weight, atol=1e-4)
    prior = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(10)), dim=-1)
    clap_full = fit_anchored_probe(shots, prior, SCALE, strength=0.1, space=full)
    clap_span = fit_anchored_probe(shots, prior, SCALE, strength=0.1)
    assert torch.allclose(clap_span.weight, clap_full.weight, atol=1e-3)
    assert torch.allclose(clap_span.bias, clap_full.bias, atol=5e-3)
    # Warm starts (the stronger strength's solution, as the CLAP grid runs) stay in the span.
    stronger = fit_anchored_probe(shots, prior, SCALE, strength=1.0)
    warm_span = fit_anchored_probe(shots, prior, SCALE, strength=0.1, start=stronger)
    stronger_full = fit_anchored_probe(shots, prior, SCALE, strength=1.0, space=full)
    warm_full = fit_anchored_probe(shots, prior, SCALE, strength=0.1, start=stronger_full, space=full)
    assert torch.allclose(warm_span.weight, warm_full.weight, atol=1e-3)
    assert torch.allclose(warm_span.bias, warm_full.bias, atol=5e-3)


def test_class_anchor_weights_trust_the_classes_the_prior_gets_right() -> None:
    feats, labels, means = gaussians(20, seed=6, separation=8.0)
    shots = Shots.of(feats, labels, 3)
    good = F.normalize(means, dim=-1)
    prior = good.clone()
    prior[2] = -good[2]  # class 2's text feature points away from its images
    trust = class_anchor_weights(shots, prior, SCALE)
    assert trust.shape == (3,)
    assert float(trust[2]) < float(trust[0]) and float(trust[2]) < float(trust[1])


# -- templates ------------------------------------------------------------------------------------


def test_template_sets_and_texts() -> None:
    openai = template_set("openai80")
    assert len(openai) == 80 and all(t.count("{}") == 1 for t in openai)
    assert len(template_set("simple7")) == 7
    assert template_set("single") == ["a photo of a {}."]
    assert class_texts(["a {}.", "the {}."], ["cat", "dog"]) == ["a cat.", "a dog.", "the cat.", "the dog."]
    with pytest.raises(ValueError):
        template_set("data-set-tuned")


def test_ensemble_is_the_normalised_mean() -> None:
    feats = torch.randn(5, 3, 8)
    out = ensemble(feats)
    assert out.shape == (3, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3))
    expected = F.normalize(F.normalize(feats, dim=-1).mean(dim=0), dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    one_hot = ensemble(feats, weights=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(one_hot, F.normalize(feats[1], dim=-1), atol=1e-6)


# -- methods, cross-validation and selection -------------------------------------------------------


def test_every_method_gives_logits_of_the_right_shape() -> None:
    feats, labels, means = gaussians(6, views=2, seed=7)
    shots = Shots.of(feats, labels, 3)
    ctx = FitContext(shots, F.normalize(means, dim=-1), SCALE)
    queries = F.normalize(torch.randn(9, 16), dim=-1)
    for method in default_methods().values():
        fitted = method.fit(ctx)
        assert fitted, method.name
        for grid, classify in fitted.items():
            out = classify(queries)
            assert out.shape == (9, 3), (method.name, grid)
            assert torch.isfinite(out).all(), (method.name, grid)


@dataclass
class Spy:
    """A method that records which labelled rows each fit trained on."""

    seen: list[set[int]] = field(default_factory=list)
    name: str = "spy"
    uses_prior: bool = True

    def fit(self, ctx: FitContext) -> dict[Params, Classifier]:
        # Row identity via the first feature coordinate (set to the row index below).
        self.seen.append({int(v) for v in ctx.shots.features[:, 0, 0].round().tolist()})
        return {(): ctx.zero_shot}


def test_cross_validation_never_trains_on_the_images_it_scores() -> None:
    n = 24
    feats = torch.zeros(n, 2, 4)
    feats[:, :, 0] = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    feats[:, :, 1] = 1.0
    labels = torch.arange(3).repeat(8)
    shots = Shots(feats, labels, 3)  # deliberately unnormalised: row ids stay readable
    spy = Spy()
    cv = cross_validate(shots, {"p": torch.randn(3, 4)}, SCALE, [spy], folds=4)
    folds = stratified_folds(labels, 4, seed=0)
    assert cv.folds == 4 and len(spy.seen) == 4
    for trained, held in zip(spy.seen, folds, strict=True):
        assert trained.isdisjoint(set(held.tolist()))
        assert trained | set(held.tolist()) == set(range(n))


def test_selection_prefers_a_learned_method_over_a_useless_prior() -> None:
    feats, labels, _ = gaussians(12, views=2, seed=8)
    shots = Shots.of(feats, labels, 3)
    useless = {"noise": F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)}
    selection = select_and_fit(shots, useless, SCALE)
    assert selection.choice.members[0].method != "zero-shot"
    assert 0.9 <= selection.cv_accuracy <= 1.0
    fresh, fresh_labels, _ = gaussians(50, seed=8)
    predictions = selection.classifier(F.normalize(fresh[:, 0], dim=-1)).argmax(dim=1)
    assert float((predictions == fresh_labels).float().mean()) > 0.9
    scores = selection.method_scores()
    assert set(scores) == set(default_methods())
    assert scores["zero-shot"] < 0.7


def test_methods_that_ignore_the_prior_are_fitted_once_per_fold() -> None:
    feats, labels, means = gaussians(6, seed=9)
    shots = Shots.of(feats, labels, 3)
    priors = {"a": F.normalize(means, dim=-1), "b": F.normalize(-means, dim=-1)}
    cv = cross_validate(shots, priors, SCALE, [PlainLinearProbe(weight_decays=(1e-3,)), ZeroShot()], folds=3)
    assert {c.prior for c in cv.oof if c.method == "linear-probe"} == {NO_PRIOR}
    assert {c.prior for c in cv.oof if c.method == "zero-shot"} == {"a", "b"}
    assert cv.scores[next(c for c in cv.oof if c.prior == "a")].accuracy > 0.9  # the right prior
    best = choose(cv, ensembles=False)
    assert best.members[0].prior in {"a", NO_PRIOR}


def test_an_ensemble_is_the_mean_of_its_members_calibrated_logits() -> None:
    feats, labels, means = gaussians(12, seed=11)
    shots = Shots.of(feats, labels, 3)
    priors = {"p": F.normalize(means, dim=-1)}
    methods = default_methods()
    cv = cross_validate(shots, priors, SCALE, list(methods.values()))
    best = cv.best_per_method()
    members = [best["gda"], best["linear-probe"]]
    choice = ensemble_of(cv, members)
    temps = [calibrate(cv.oof[c], cv.labels) for c in members]
    assert choice.temperatures == pytest.approx(temps)
    # Scored on the averaged calibrated OOF logits, like any candidate.
    mean_oof = (temps[0] * cv.oof[members[0]] + temps[1] * cv.oof[members[1]]) / 2
    assert choice.score.accuracy == pytest.approx(float((mean_oof.argmax(1) == cv.labels).float().mean()))
    # Refitted: the same combination of the members refitted on all shots.
    fresh, _, _ = gaussians(5, seed=12)
    fresh = fresh[:, 0]
    ensemble = refit(choice, shots, priors, SCALE, methods)
    singles = [methods[c.method].fit(FitContext(shots, priors["p"], SCALE))[c.params] for c in members]
    expected = (temps[0] * singles[0](fresh) + temps[1] * singles[1](fresh)) / 2
    torch.testing.assert_close(ensemble(fresh), expected, atol=1e-4, rtol=1e-4)


def test_power_features_keep_sign_and_unit_norm_and_invert() -> None:
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(power_features(x, 1.0), F.normalize(x, dim=-1))
    t = power_features(x, 0.5)
    assert torch.equal(t.sign(), x.sign())
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(20))
    torch.testing.assert_close(power_features(t, 2.0), F.normalize(x, dim=-1))  # no information lost


def test_the_power_space_is_a_grid_axis_of_gda_and_the_probe() -> None:
    feats, labels, means = gaussians(6, seed=13)
    ctx = FitContext(Shots.of(feats, labels, 3), F.normalize(means, dim=-1), SCALE)
    x = feats[:, 0]
    for method in (Gda(), PlainLinearProbe()):
        fitted = method.fit(ctx)
        powers = {dict(p).get("power", 1.0) for p in fitted}
        assert powers == {1.0, 0.5, 0.25}
        for grid, classify in fitted.items():
            power = dict(grid).get("power", 1.0)
            if power == 1.0:
                continue
            assert isinstance(classify, SpacedClassifier) and power in classify.powers
            assert classify(x).shape == (x.shape[0], 3)
    # GDA alone in the power space is GDA fitted on the transformed shots.
    only = Gda(shrinkages=(0.5,), alphas=(float("inf"),), powers=(0.5,)).fit(ctx)
    (classify,) = only.values()
    transformed = Shots.of(power_features(feats, 0.5), labels, 3)
    model = fit_gda(transformed, 0.5)
    flat, _ = ctx.flat
    s = fusion_scale(ctx.zero_shot(flat), model.logits(power_features(flat, 0.5)))
    torch.testing.assert_close(classify(x), s * model.logits(power_features(x, 0.5)), atol=1e-4, rtol=1e-4)


def test_grids_are_complete() -> None:
    feats, labels, means = gaussians(5, seed=10)
    ctx = FitContext(Shots.of(feats, labels, 3), F.normalize(means, dim=-1), SCALE)
    assert len(Gda(shrinkages=(0.1, 0.5), alphas=(1.0, float("inf"))).fit(ctx)) == 4 * 3  # x 3 powers
    assert len(Gda(shrinkages=(0.1, 0.5), alphas=(1.0, float("inf")), powers=(1.0,)).fit(ctx)) == 4
    assert len(PlainLinearProbe(weight_decays=(1e-3,), powers=(1.0, 0.5)).fit(ctx)) == 2
    assert len(TipCache(alphas=(1.0,), betas=(1.0, 2.0)).fit(ctx)) == 2
    assert len(AnchoredLinearProbe(strengths=(0.1,)).fit(ctx)) == 1


def test_the_feature_method_never_reads_the_test_split() -> None:
    """fit_fewshot_cv selects and fits on train + val only: NaN test features change nothing."""
    from client.feature_methods import FeatureConfig, FeatureData, fit_fewshot_cv

    feats, labels, means = gaussians(8, views=1, seed=11)
    train_idx = torch.arange(0, 24, 2)
    val_idx = torch.arange(1, 24, 2)
    text = F.normalize(means, dim=-1)

    def data(test: torch.Tensor) -> FeatureData:
        return FeatureData(
            train=F.normalize(feats[train_idx], dim=-1),
            train_labels=labels[train_idx],
            val=F.normalize(feats[val_idx, 0], dim=-1),
            val_labels=labels[val_idx],
            test=test,
            test_labels=torch.zeros(test.shape[0], dtype=torch.long),
            text=text,
            scale=SCALE,
        )

    cfg = FeatureConfig(method="fewshot-cv", views=1)
    real = fit_fewshot_cv(cfg, data(F.normalize(torch.randn(30, 16), dim=-1)))
    poisoned = fit_fewshot_cv(cfg, data(torch.full((30, 16), float("nan"))))
    assert real.selected == poisoned.selected
    probe = F.normalize(torch.randn(5, 16), dim=-1)
    assert torch.equal(real.classifier(probe), poisoned.classifier(probe))
    assert real.selected["labelled_images"] == 24
