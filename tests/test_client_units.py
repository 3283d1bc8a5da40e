"""Client units without a server: the budget plan, the artifact, the feature cache and store,
augmented views, and the prompt steppers' contract with the tuning loop."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from client.adapters import ResidualAdapter, TipAdapter, adapter_state
from client.api import QueryCounter
from client.artifact import CONFIG_FILE, TENSORS_FILE, Artifact, load_artifact, save_artifact
from client.data import Example
from client.estimators import EstimatorConfig
from client.features import FeatureCache, FeatureStore, augmented_view, content_hash, image_hash, view_bytes
from client.plan import BudgetTooSmall, make_plan
from client.steppers import (
    Baseline,
    EstimatedGradient,
    StepOutcome,
    cosine_with_warmup,
    make_stepper,
    points_per_step,
)
from client.tune_config import TuneConfig

# -- the plan -------------------------------------------------------------------------------

PLAN_ARGS = {
    "feature_items": 200,
    "num_classes": 10,
    "points_per_step": 9,  # 1 + q with q = 8
    "train_images": 160,  # 16 shots x 10 classes
    "batch_size": 32,  # 5 steps per epoch
    "epochs": 40,  # 200 faithful steps
    "adapter_start_epoch": 10,
    "tunes_prompt": True,
}


def test_plan_without_a_budget_is_the_faithful_schedule() -> None:
    plan = make_plan(**PLAN_ARGS, budget=None)  # type: ignore[arg-type]
    assert plan.steps_per_epoch == 5
    assert plan.steps == plan.faithful_steps == 200
    assert plan.warmup_steps == 5  # one epoch
    assert plan.adapter_start_step == 50  # epoch 10
    assert plan.items_per_step == 90 and plan.init_items == 11
    assert plan.total_items == 200 + 11 + 200 * 90
    assert not plan.scaled
    assert plan.as_dict()["total_items"] == plan.total_items


def test_plan_with_a_large_budget_is_not_scaled() -> None:
    exact = 200 + 11 + 200 * 90
    plan = make_plan(**PLAN_ARGS, budget=exact)  # type: ignore[arg-type]
    assert plan.steps == 200 and not plan.scaled and plan.total_items == exact


def test_plan_scales_the_steps_down_to_the_budget_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    budget = 200 + 11 + 50 * 90 + 89  # 50 affordable steps, and some change
    with caplog.at_level(logging.WARNING, logger="client.plan"):
        plan = make_plan(**PLAN_ARGS, budget=budget)  # type: ignore[arg-type]
    assert plan.scaled and plan.steps == 50 and plan.faithful_steps == 200
    assert plan.total_items <= budget
    assert budget - plan.total_items < plan.items_per_step  # no affordable step is left out
    # The schedule keeps its shape: warm-up and the adapter's start at the same fractions.
    assert plan.adapter_start_step == round(50 * 10 / 40)
    assert plan.warmup_steps == round(5 * 50 / 200)
    assert "scaled down" in plan.describe() and "50" in plan.describe()
    assert any("scaled down" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("budget", [211, 300, 1000, 5000, 9000, 17_000, 18_210, 18_211, 10**6])
@pytest.mark.parametrize("adapter_start_epoch", [0, 1, 10, 39])
def test_plan_fits_every_budget_and_keeps_the_adapter_start_fraction(
    budget: int, adapter_start_epoch: int
) -> None:
    args = {**PLAN_ARGS, "adapter_start_epoch": adapter_start_epoch}
    plan = make_plan(**args, budget=budget)  # type: ignore[arg-type]
    assert plan.total_items <= budget
    assert 0 <= plan.warmup_steps <= plan.steps
    assert 0 <= plan.adapter_start_step <= plan.steps
    if plan.steps:
        fraction = adapter_start_epoch / PLAN_ARGS["epochs"]  # type: ignore[operator]
        assert abs(plan.adapter_start_step / plan.steps - fraction) <= 1 / plan.steps
    if plan.steps < plan.faithful_steps:
        assert plan.scaled and budget - plan.total_items < plan.items_per_step


def test_plan_refuses_a_budget_that_cannot_pay_for_the_features() -> None:
    with pytest.raises(BudgetTooSmall, match=r"budget of 210 items.*200 \+ 11 = 211"):
        make_plan(**PLAN_ARGS, budget=210)  # type: ignore[arg-type]
    plan = make_plan(**PLAN_ARGS, budget=211)  # exactly the features: no prompt step, still a plan
    assert plan.steps == 0 and plan.scaled and plan.adapter_start_step == 0


def test_plan_of_a_method_that_does_not_tune_the_prompt() -> None:
    plan = make_plan(**{**PLAN_ARGS, "tunes_prompt": False}, budget=500)  # type: ignore[arg-type]
    assert plan.steps == plan.faithful_steps == 0 and not plan.scaled
    assert plan.total_items == 211


def test_cosine_schedule_with_warmup() -> None:
    lr_at = cosine_with_warmup(steps=10, warmup=2, lr=1.0, warmup_lr=0.01)
    assert lr_at(0) == lr_at(1) == 0.01
    assert lr_at(2) == pytest.approx(1.0)
    assert lr_at(6) == pytest.approx(0.5)
    values = [lr_at(s) for s in range(2, 10)]
    assert values == sorted(values, reverse=True)


# -- the artifact ---------------------------------------------------------------------------

CARD = {"id": "m", "logit_scale": 50.0, "feature_dim": 16, "token_width": 8}


def _artifact(kind: str) -> Artifact:
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] | None = None
    if kind == "residual":
        torch.manual_seed(0)
        state = adapter_state(ResidualAdapter(16, ratio=0.3))
    elif kind == "tip":
        keys = torch.randn(6, 16, generator=g)
        state = adapter_state(TipAdapter(keys, torch.tensor([0, 1, 2, 0, 1, 2]), 3, trainable_keys=True))
    return Artifact(
        context=torch.randn(1, 8, generator=g),
        class_names=["a cat", "dog", "bird_x"],
        class_text_features=torch.randn(3, 16, generator=g),
        adapter_kind=kind,
        adapter_state=state,
        model_card=CARD,
        config={"adapter_ratio": 0.3, "seed": 7},
    )


@pytest.mark.parametrize("kind", ["residual", "tip", "none"])
def test_artifact_round_trip(tmp_path: Path, kind: str) -> None:
    original = _artifact(kind)
    save_artifact(original, tmp_path / "artifact")
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    loaded = load_artifact(tmp_path / "artifact")
    torch.testing.assert_close(loaded.context, original.context)
    torch.testing.assert_close(loaded.class_text_features, original.class_text_features)
    assert loaded.class_names == original.class_names
    assert loaded.model_card == CARD and loaded.logit_scale == 50.0
    assert loaded.config == original.config and loaded.adapter_kind == kind
    if original.adapter_state is None:
        assert loaded.adapter_state is None and loaded.build_adapter() is None
        return
    assert loaded.adapter_state is not None
    assert loaded.adapter_state.keys() == original.adapter_state.keys()
    for name, value in original.adapter_state.items():
        torch.testing.assert_close(loaded.adapter_state[name], value)
    # The rebuilt adapter computes what the saved one did.
    adapter = loaded.build_adapter()
    assert adapter is not None and not adapter.training
    feats = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    if kind == "residual":
        reference = ResidualAdapter(16, ratio=0.3)
        reference.load_state_dict(original.adapter_state)
        torch.testing.assert_close(adapter(feats), reference(feats))
    else:
        reference_tip = TipAdapter.from_state_dict(original.adapter_state)
        logits = torch.randn(4, 3)
        torch.testing.assert_close(adapter(feats, logits), reference_tip(feats, logits))


def test_artifact_files_are_json_and_safetensors_not_pickle(tmp_path: Path) -> None:
    save_artifact(_artifact("residual"), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["class_names"] == ["a cat", "dog", "bird_x"]
    raw = (tmp_path / TENSORS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert {"context", "class_text_features", "adapter.mlp.0.weight", "adapter.mlp.2.weight"} <= set(header)
    assert not raw.startswith(b"\x80")  # no pickle protocol marker
    assert b"PK\x03\x04" not in raw[:4]  # not a torch.save zip


def test_artifact_missing_files_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a cbbt artifact"):
        load_artifact(tmp_path)
    save_artifact(_artifact("none"), tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path)
    save_artifact(_artifact("none"), tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path)


def test_artifact_tampered_files_are_an_error(tmp_path: Path) -> None:
    save_artifact(_artifact("residual"), tmp_path)
    config_path, tensors_path = tmp_path / CONFIG_FILE, tmp_path / TENSORS_FILE
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="unsupported artifact format"):
        load_artifact(tmp_path)

    config_path.write_text("{not json")
    with pytest.raises(ValueError):
        load_artifact(tmp_path)

    config_path.write_text(json.dumps(config))
    raw = tensors_path.read_bytes()
    tensors_path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        load_artifact(tmp_path)

    tensors_path.write_bytes(b"\x80\x04garbage, e.g. a pickle")
    with pytest.raises(Exception):  # noqa: B017
        load_artifact(tmp_path)


def test_artifact_with_a_mismatched_adapter_fails_to_build(tmp_path: Path) -> None:
    artifact = _artifact("residual")
    assert artifact.adapter_state is not None
    artifact.adapter_state = {"mlp.0.weight": torch.zeros(3, 3)}  # wrong shape, a missing weight
    save_artifact(artifact, tmp_path)
    with pytest.raises(RuntimeError):
        load_artifact(tmp_path).build_adapter()


# -- the feature cache and store ------------------------------------------------------------

DIM = 8


def _vector(payload: bytes) -> npt.NDArray[np.float32]:
    digest = hashlib.sha256(payload).digest()
    return np.frombuffer(digest[: DIM * 4], dtype="<u4").astype(np.float32) / 2**32


@dataclass
class _Card:
    id: str
    feature_dim: int = DIM


@dataclass
class FakeClient:
    """What FeatureStore needs of CbbtClient; each image's feature is a hash of its bytes."""

    model_id: str = "model-a"
    calls: list[tuple[int, str | None]] = field(default_factory=list)
    counter: QueryCounter = field(default_factory=QueryCounter)  # api.ImageEmbedder has one

    def model_card(self) -> _Card:
        return _Card(self.model_id)

    def embed_images(self, images: list[bytes], *, idempotency_key: str | None = None) -> np.ndarray:
        self.calls.append((len(images), idempotency_key))
        return np.stack([_vector(b) for b in images])

    @property
    def items(self) -> int:
        return sum(n for n, _ in self.calls)


def _examples(n: int, *, offset: int = 0) -> list[Example]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n + offset, 12, 12), dtype=np.uint8)
    return [Example.from_array(i % 3, pixels[i], f"ex{i}") for i in range(offset, offset + n)]


def _store(client: FakeClient, cache: FeatureCache, **kwargs: object) -> FeatureStore:
    return FeatureStore(client, cache, **kwargs)  # type: ignore[arg-type]


def test_feature_cache_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "sub" / "features.sqlite")
    vectors = {f"k{i}": np.arange(4, dtype=np.float32) + i for i in range(700)}  # > one IN() chunk
    cache.put_many(vectors)
    assert len(cache) == 700
    found = cache.get_many([*vectors, "absent"])
    assert set(found) == set(vectors)
    for key, value in vectors.items():
        np.testing.assert_array_equal(found[key], value)
        assert found[key].dtype == np.float32
    cache.close()
    reopened = FeatureCache(tmp_path / "sub" / "features.sqlite")
    assert len(reopened) == 700
    reopened.close()


def test_cached_features_are_not_fetched_again(tmp_path: Path) -> None:
    client = FakeClient()
    cache = FeatureCache(tmp_path / "f.sqlite")
    examples = _examples(10)
    store = _store(client, cache, batch_size=4)
    assert store.missing_count(examples, 2) == 20
    first = store.features(examples, views=2)
    assert first.shape == (10, 2, DIM) and first.dtype == np.float32
    assert [n for n, _ in client.calls] == [4, 4, 4, 4, 4]  # 20 features in batches of 4
    assert all(key and key.startswith("features-") for _, key in client.calls)
    np.testing.assert_array_equal(first[3, 0], _vector(examples[3].image_bytes()))
    np.testing.assert_array_equal(first[3, 1], _vector(view_bytes(examples[3], 1)))

    assert store.missing_count(examples, 2) == 0
    np.testing.assert_array_equal(store.features(examples, views=2), first)
    np.testing.assert_array_equal(store.features(examples[::-1], views=1)[:, 0], first[::-1, 0])
    assert client.items == 20  # nothing fetched again

    # More views: only the new view is paid for; a store on the reopened file pays for nothing.
    cache.close()
    cache = FeatureCache(tmp_path / "f.sqlite")
    client2 = FakeClient()
    store2 = _store(client2, cache, batch_size=64)
    assert store2.missing_count(examples, 3) == 10
    third = store2.features(examples, views=3)
    np.testing.assert_array_equal(third[:, :2], first)
    assert client2.items == 10
    assert store2.features(examples + _examples(2, offset=10), views=1).shape == (12, 1, DIM)
    assert client2.items == 12
    cache.close()


def test_features_are_keyed_by_model_and_content(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "f.sqlite")
    examples = _examples(3)
    twin = Example.from_array(2, np.asarray(examples[0].image()), "a copy elsewhere")
    a = FakeClient("model-a")
    _store(a, cache).features([*examples, twin], views=1)
    assert a.items == 3  # the same content is fetched once, whatever its source or label
    b = FakeClient("model-b")
    _store(b, cache).features(examples, views=1)
    assert b.items == 3  # another model: its own features
    no_flip = FakeClient("model-a")
    _store(no_flip, cache, flip=False).features(examples, views=2)
    # Views >= 1 depend on the flip setting, so they are never reused across it (the key has
    # the flag for every view, so view 0 is fetched again too: a harmless over-fetch).
    assert no_flip.items in (3, 6)
    cache.close()


def test_a_files_hash_is_its_upload_bytes_and_follows_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(path)
    example = Example.from_file(0, path, "a.png")
    first = image_hash(example)
    assert first == content_hash(example.image_bytes()) == image_hash(example)
    Image.new("RGB", (9, 9), "blue").save(path)  # rewritten in place: new size, new mtime
    assert image_hash(example) == content_hash(example.image_bytes()) != first


def test_feature_requests_have_deterministic_idempotency_keys(tmp_path: Path) -> None:
    examples = _examples(5)
    keys = []
    for run in range(2):
        client = FakeClient()
        cache = FeatureCache(tmp_path / f"run{run}.sqlite")
        _store(client, cache, batch_size=2).features(examples, views=1)
        keys.append([k for _, k in client.calls])
        cache.close()
    assert keys[0] == keys[1] and len(set(keys[0])) == 3  # a killed fetch replays when redone


def test_feature_progress_reports_fetched_images(tmp_path: Path) -> None:
    seen: list[int] = []
    cache = FeatureCache(tmp_path / "f.sqlite")
    _store(FakeClient(), cache, batch_size=3, progress=seen.append).features(_examples(7), views=1)
    assert seen == [3, 3, 1]
    cache.close()


# -- augmented views ------------------------------------------------------------------------


def _photo() -> Image.Image:
    x, y = np.meshgrid(np.arange(40), np.arange(32))
    pixels = np.stack([x * 6, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_augmented_view_is_deterministic_per_seed() -> None:
    image = _photo()
    a = np.asarray(augmented_view(image, 123))
    b = np.asarray(augmented_view(image, 123))
    np.testing.assert_array_equal(a, b)
    assert a.shape == np.asarray(image).shape  # same size as the original
    others = [np.asarray(augmented_view(image, seed)) for seed in range(124, 130)]
    assert any(not np.array_equal(a, o) for o in others)


def test_view_bytes_view_zero_is_the_image_and_others_are_stable() -> None:
    example = _examples(1)[0]
    assert view_bytes(example, 0) == example.image_bytes()
    one, two = view_bytes(example, 1), view_bytes(example, 2)
    assert one == view_bytes(example, 1) and one != two
    assert Image.open(io.BytesIO(one)).size == example.image().size
    assert content_hash(one) != content_hash(example.image_bytes())


def test_augmented_view_without_flip_never_mirrors() -> None:
    # A horizontally symmetric crop is impossible to tell from its mirror, so use asymmetric content.
    image = _photo()
    for seed in range(20):
        flipped = augmented_view(image, seed, flip=True)
        plain = augmented_view(image, seed, flip=False)
        same = np.array_equal(np.asarray(flipped), np.asarray(plain))
        mirrored = np.array_equal(
            np.asarray(flipped), np.asarray(plain.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        )
        assert same or mirrored


# -- steppers -------------------------------------------------------------------------------

SHAPE = (2, 3)
CLASSES, TEXT_DIM = 4, 5


@dataclass
class QuadraticOracle:
    """ℓ(θ) = |θ − target|²; text features at point p encode p, so `base_text` can be checked."""

    target: torch.Tensor
    calls: list[int] = field(default_factory=list)
    text_features: torch.Tensor | None = None  # the last call's, as client.oracle.LossOracle

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self.calls.append(points.shape[0])
        flat = points.reshape(points.shape[0], -1).float()
        self.text_features = self.texts(flat)
        return ((flat - self.target.reshape(1, -1)) ** 2).sum(dim=1)

    @staticmethod
    def texts(flat: torch.Tensor) -> torch.Tensor:
        # [P, C, D]: each class row holds the point's first D coordinates (padded) plus the class.
        padded = torch.nn.functional.pad(flat, (0, max(0, TEXT_DIM - flat.shape[1])))[:, :TEXT_DIM]
        return padded[:, None, :] + torch.arange(CLASSES, dtype=torch.float32)[None, :, None]


def _stepper(name: str, theta: torch.Tensor, seed: int = 0, lr: float = 0.05) -> EstimatedGradient | Baseline:
    stepper = make_stepper(
        name,
        theta,
        torch.Generator().manual_seed(seed),
        estimator=EstimatorConfig(directions=6),
        lr=lr,
        weight_decay=0.0,
        lr_at=lambda _: lr,
    )
    assert isinstance(stepper, EstimatedGradient | Baseline)
    return stepper


@pytest.mark.parametrize("name", ["estimator", "cmaes", "spsa-gc", "zip"])
def test_each_step_calls_the_oracle_once_and_returns_the_base_text(name: str) -> None:
    theta = torch.linspace(-1, 1, 6).reshape(SHAPE)
    oracle = QuadraticOracle(target=torch.full((6,), 0.5))
    stepper = _stepper(name, theta)
    expected_points = points_per_step(name, 6, EstimatorConfig(directions=6))
    assert stepper.points_per_step == expected_points
    assert isinstance(stepper, EstimatedGradient if name == "estimator" else Baseline)
    for index in range(4):
        outcome = stepper.step(index, theta, oracle)
        assert isinstance(outcome, StepOutcome)
        assert oracle.calls == [expected_points] * (index + 1)  # one call per step, all points in it
        # base_text: the text features at θ *before* the update.
        torch.testing.assert_close(outcome.base_text, QuadraticOracle.texts(theta.reshape(1, -1))[0])
        assert outcome.theta.numel() == theta.numel() and math.isfinite(outcome.loss)
        theta = outcome.theta.reshape(SHAPE).float()


def test_estimated_gradient_descends_a_quadratic() -> None:
    theta = torch.zeros(SHAPE)
    target = torch.linspace(-1, 1, 6)
    oracle = QuadraticOracle(target=target)
    stepper = _stepper("estimator", theta, lr=0.05)
    start = float(((theta.reshape(-1) - target) ** 2).sum())
    losses = []
    for index in range(60):
        outcome = stepper.step(index, theta, oracle)
        losses.append(outcome.loss)
        theta = outcome.theta.reshape(SHAPE)
    assert losses[0] == pytest.approx(start)
    assert float(((theta.reshape(-1) - target) ** 2).sum()) < 0.2 * start


def test_stepper_state_dict_resumes_to_the_same_steps() -> None:
    target = torch.linspace(-1, 1, 6)
    theta0 = torch.zeros(SHAPE)
    reference = _stepper("estimator", theta0, seed=3)
    thetas = []
    theta = theta0
    for index in range(6):
        theta = reference.step(index, theta, QuadraticOracle(target)).theta.reshape(SHAPE)
        thetas.append(theta)

    first = _stepper("estimator", theta0, seed=3)
    theta = theta0
    for index in range(3):
        theta = first.step(index, theta, QuadraticOracle(target)).theta.reshape(SHAPE)
    state = first.state_dict()
    resumed = _stepper("estimator", theta0, seed=99)  # a different seed: the state must override it
    resumed.load_state_dict(state)
    for index in range(3, 6):
        theta = resumed.step(index, theta, QuadraticOracle(target)).theta.reshape(SHAPE)
        torch.testing.assert_close(theta, thetas[index])


def test_baseline_appends_the_base_point_last_and_hides_it_from_the_optimiser() -> None:
    theta = torch.linspace(-1, 1, 6).reshape(SHAPE)
    seen: list[torch.Tensor] = []

    class Recording(QuadraticOracle):
        def __call__(self, points: torch.Tensor) -> torch.Tensor:
            seen.append(points.clone())
            return super().__call__(points)

    oracle = Recording(torch.zeros(6))
    stepper = _stepper("spsa-gc", theta)
    stepper.step(0, theta, oracle)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][-1], theta.reshape(-1))
    assert seen[0].shape[0] == stepper.points_per_step


def test_each_method_gets_its_benchmarked_default_estimator() -> None:
    from client.methods import method, tune_config_for

    def config(name: str = "cbbt-paper", **flags: object) -> TuneConfig:
        return tune_config_for(method(name), flags, {"shots": 4, "seed": 1})

    assert config().estimator == "faithful"
    prompt_only = config("cbbt-prompt")
    assert prompt_only.estimator == "surrogate" and prompt_only.optimizer == "surrogate"
    assert prompt_only.batch_size == 0
    scalar = config("cbbt-fast-prompt")
    assert scalar.estimator == "fast" and scalar.optimizer == "estimator" and scalar.batch_size == 0
    explicit = config("cbbt-prompt", estimator="faithful", directions=8)
    assert explicit.estimator == "faithful" and explicit.directions == 8 and explicit.batch_size == 32
    assert config("cbbt-faithful-prompt").estimator == "faithful"
    # A method's own settings beat its preset's; the flags the user typed beat both.
    residual = config("cbbt-fast-residual")
    assert residual.adapter == "residual" and residual.directions == 4
    assert config("cmaes-prompt", optimizer="zip").optimizer == "zip"


def test_tune_and_bench_resolve_a_method_name_to_the_same_config(tmp_path: Path) -> None:
    """`cbbt tune --method X` and `cbbt bench --methods X` build X's config in one place."""
    from client.cli import _flags, build_parser
    from client.methods import method, tune_config_for

    argv = ["--data", "digits", "--directions", "8", "--views", "1", "--budget", "900"]
    tune_args = build_parser().parse_args(["tune", "--out", "x", "--method", "cbbt-prompt", *argv])
    bench_args = build_parser().parse_args(["bench", "--methods", "cbbt-prompt", *argv])
    run = {"shots": 16, "seed": 1, "views": 1, "budget": 900}
    from_tune = tune_config_for(method(tune_args.method), _flags(tune_args), run)
    from_bench = tune_config_for(method(bench_args.methods[0]), _flags(bench_args), run)
    assert from_tune == from_bench and from_tune.estimator == "surrogate" and from_tune.directions == 8


def test_the_cli_reports_bad_input_in_one_line_and_exits_2(tmp_path: Path) -> None:
    from client.cli import main

    assert main(["tune", "--data", "nope", "--out", str(tmp_path / "run")]) == 2
    assert main(["tune", "--data", f"coop:{tmp_path}/missing.json:{tmp_path}", "--out", str(tmp_path)]) == 2
    assert main(["eval", "--artifact", str(tmp_path / "missing"), "--data", "digits"]) == 2
    assert not (tmp_path / "run").exists()  # refused before any output (or query)


def test_a_bench_runs_the_default_and_the_cv_methods_at_one_view_and_the_tuners_at_its_views() -> None:
    """`cbbt bench --views 2 --methods cbbt` measures the default as `cbbt tune` runs it."""
    from dataclasses import replace

    from client.grid import BenchConfig, views_for
    from client.methods import method

    bench = BenchConfig(data="digits", out=Path("unused"), views=2)
    assert [views_for(method(m), bench) for m in ("cbbt", "fewshot-cv", "gda", "clap")] == [1, 1, 1, 1]
    assert views_for(method("cbbt-paper"), bench) == views_for(method("cbbt-fast"), bench) == 2
    faithful = BenchConfig(data="digits", out=Path("unused"), views=2, tune_flags={"estimator": "faithful"})
    assert views_for(method("cbbt"), faithful) == 2  # `cbbt --estimator faithful` is cbbt-paper, at 2
    four = replace(method("cbbt"), name="cbbt-v4", settings={**method("cbbt").settings, "views": 4})
    assert views_for(four, bench) == 4  # what `--define cbbt-v4=cbbt:views=4` builds
