"""The default `cbbt` method (client/collab.py): stacking numerics, and whole runs through the
real CLI against real server processes (the tiny random-init model for counts, budgets, tiers
and artifacts; the real default model for the one accuracy claim)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client.adapters import LinearHead, TipAdapter, clip_logits
from client.cli import main as cbbt
from client.collab import PromptResult, affordable_template_set, final_head, held_out_gain_z
from client.data import load_dataset
from client.fewshot.methods import default_methods
from client.fewshot.select import Selection, calibrate, cross_validate, ensemble_of, refit
from client.fewshot.shots import Shots
from client.fewshot.stack import as_linear_head, best_weight, holdout_split, pick_classes
from tests.helpers import ServerProcess, noise_image
from tests.test_client_e2e import TINY_DATA, Key, assert_ledger_matches, ledger, new_key, read_report

# 4 shots x 10 classes, 1 view + 40 validation + 50 test images; 80 templates x 10 classes;
# the initial prompt's token vectors; then 9 prompts x 10 classes a step (4 antithetic directions).
IMAGES = 40 + 40 + 50
TEXTS = 80 * 10
PER_STEP = 9 * 10


# -- numerics -----------------------------------------------------------------------------------
def test_calibration_undoes_a_known_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=generator)
    labels = torch.distributions.Categorical(logits=logits).sample()
    # Labels drawn at temperature 1; the same logits handed over 4x too sharp.
    assert calibrate(4.0 * logits, labels) == pytest.approx(0.25, rel=0.2)


def test_the_prompt_weight_is_zero_for_noise_and_positive_for_signal() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (300,), generator=generator)
    base = torch.randn(300, 4, generator=generator)  # a feature method that knows nothing
    noise = torch.randn(300, 4, generator=generator) * 5
    signal = F.one_hot(labels, 4).float() * 3
    assert best_weight(base, noise, labels).weight == 0.0
    helped = best_weight(base, signal, labels)
    assert helped.weight > 0 and helped.loss < F.cross_entropy(base, labels).item()


def test_a_prompt_is_kept_only_for_a_held_out_gain_beyond_one_standard_error() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (60,), generator=generator)
    base = torch.randn(60, 4, generator=generator)
    helpful = F.one_hot(labels, 4).float() * 2
    noise = torch.randn(60, 4, generator=generator) * 0.05
    assert held_out_gain_z(base, helpful, labels, 1.0) > 3
    assert abs(held_out_gain_z(base, noise, labels, 1.0)) < 3
    result = PromptResult(None, torch.zeros(4, 8), 0.5, 1.0, 0.9, 0.5, 1.0, 0.5, 5, 3, "patience", 60)
    for z, kept in ((0.5, False), (1.5, True)):
        result.gain_z = z
        assert result.accepted is kept  # the held-out loss is lower in both; only z decides


def test_the_holdout_is_one_stratified_fold_disjoint_from_the_prompts_images() -> None:
    labels = torch.arange(10).repeat_interleave(8)
    split = holdout_split(labels, 4, seed=3)
    assert set(split.train.tolist()).isdisjoint(split.held.tolist())
    assert sorted(split.train.tolist() + split.held.tolist()) == list(range(80))
    assert torch.bincount(labels[split.held], minlength=10).tolist() == [2] * 10


def test_a_linear_classifier_becomes_an_exact_head_and_a_cache_model_does_not() -> None:
    generator = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(50, 16, generator=generator), dim=-1)
    text = torch.randn(3, 16, generator=generator)
    weight, bias = torch.randn(3, 16, generator=generator), torch.randn(3, generator=generator)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return 0.7 * (x @ weight.T + bias) + 0.3 * clip_logits(x, text, 20.0)

    head = as_linear_head(linear, 16, feats)
    assert head is not None
    torch.testing.assert_close(head(feats), linear(feats), atol=1e-4, rtol=1e-4)
    cache = TipAdapter(feats[:12], torch.arange(12) % 3, 3)
    cache.alpha, cache.beta = 1.0, 5.0

    def tip(x: torch.Tensor) -> torch.Tensor:
        return cache(x, clip_logits(x, text, 20.0))

    assert as_linear_head(tip, 16, feats) is None


def test_an_ensemble_across_feature_spaces_with_a_prompt_is_saved_as_one_exact_head() -> None:
    generator = torch.Generator().manual_seed(5)
    classes, dim = 3, 16
    centres = 3 * torch.rand(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(10)
    # Non-negative, sparse features, as a ReLU image tower gives.
    raw = torch.relu(centres[labels] + torch.randn(labels.numel(), dim, generator=generator))
    shots = Shots.of(raw, labels, classes)
    prior = torch.randn(classes, dim, generator=generator)
    priors = {"p": prior}
    methods = {m: default_methods()[m] for m in ("gda", "linear-probe", "clap")}
    cv = cross_validate(shots, priors, 20.0, list(methods.values()))
    best = cv.best_per_method()
    # Force members from two power spaces and the served one, plus a GDA fused with the prior.
    fused = {"alpha": 1.0, "power": 0.5, "shrinkage": 0.5}
    gda_fused = next(c for c in cv.oof if c.method == "gda" and dict(c.params) == fused)
    probe = next(c for c in cv.oof if c.method == "linear-probe" and dict(c.params).get("power") == 0.25)
    choice = ensemble_of(cv, [gda_fused, probe, best["clap"]])
    selection = Selection(choice, refit(choice, shots, priors, 20.0, methods), cv)
    texts = torch.randn(classes, dim, generator=generator)
    prompt = PromptResult(None, texts, 0.4, 1.7, 0.1, 1.0, 0.2, 1.0, 3, 2, "patience", 6, gain_z=2.0)
    assert prompt.accepted
    head = final_head(selection, prompt, shots, 20.0)
    assert head.powers == [0.5, 0.25]
    fresh = torch.relu(centres[labels] + torch.randn(labels.numel(), dim, generator=generator))
    expected = 1.7 * selection.classifier(fresh) + 0.4 * clip_logits(fresh, texts, 20.0)
    torch.testing.assert_close(head(fresh), expected, atol=1e-3, rtol=1e-3)
    again = LinearHead.from_state(head.state())
    torch.testing.assert_close(again(fresh), head(fresh))
    for bad in (1.0, 0.0, 1.5, -0.5):  # β = 1 is `weight`; others are not a power space
        with pytest.raises(ValueError):
            LinearHead(head.weight, head.bias, {bad: head.weight})


def test_the_template_set_falls_back_along_the_chain_only_as_far_as_the_budget_needs() -> None:
    def bought(asked: str, budget: int | None) -> str:
        return affordable_template_set(asked, feature_items=100, classes=10, budget=budget)

    assert bought("openai80", None) == bought("openai80", 100 + 800) == "openai80"
    assert bought("openai80", 100 + 799) == bought("openai80", 100 + 70) == "simple7"
    assert bought("openai80", 100 + 69) == bought("simple7", 100 + 69) == "single"
    assert bought("single", 100 + 9) == "single"  # nothing fits: the plan refuses it (below)
    assert bought("simple7", 10_000) == "simple7"  # never a larger set than asked


# -- whole runs -----------------------------------------------------------------------------------
def _tune(server: ServerProcess, key: Key, tmp: Path, *extra: str, data: list[str] = TINY_DATA) -> int:
    connection = ["--server", server.url, "--api-key", key.secret, "--cache-dir", str(tmp / "cache")]
    small = ["--shots", "4", "--seed", "1", "--no-progress", "--out", str(tmp / "run")]
    return cbbt(["tune", *connection, *small, *data, *extra])


def test_the_default_runs_features_selection_and_a_prompt_on_top_within_its_budget(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    budget = IMAGES + TEXTS + 1 + 5 * PER_STEP  # room for at most 5 prompt steps
    assert _tune(tiny_server, key, tmp_path, "--budget", str(budget)) == 0
    report = read_report(tmp_path / "run")
    assert report["method"] == "cbbt"
    steps = report["prompt_steps"]
    assert 1 <= steps <= 5 and report["stopped_reason"] in ("budget", "patience", "max steps")
    queries = report["queries"]
    # Exactly the plan's arithmetic: features, templates, the token call, then the steps.
    assert queries["items"] == IMAGES + TEXTS + 1 + steps * PER_STEP <= budget
    assert queries["loss_evaluations"] == 80 + 9 * steps
    assert report["plan"]["steps"] == 5 and report["plan"]["total_items"] == budget
    assert report["items_not_needed"] == budget - queries["items"]
    selected = report["selected"]
    assert set(selected["cv_accuracy_by_method"]) == {"zero-shot", "gda", "clap", "linear-probe"}
    assert "prompt_kept" in selected and selected["held_out_images"] == 80 // selected["cv_folds"] == 16
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_a_folder_with_a_small_class_trains_it_on_what_it_has(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    # A user's class-per-folder tree: two classes of 12 images and one of 3 (7 + 2 after the
    # 70/30 train/test split). 4 shots + 4 validation images do not fit the small one.
    folder = tmp_path / "photos"
    for k, (name, count) in enumerate((("cat", 12), ("dog", 12), ("rare_bird", 3))):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            noise_image(32, 32, seed=100 * k + i).save(folder / name / f"{i}.png")
    key = new_key(tiny_server)
    assert (
        _tune(tiny_server, key, tmp_path, "--budget", "5000", data=["--data", f"imagefolder:{folder}"]) == 0
    )
    report = read_report(tmp_path / "run")
    assert report["short_classes"] == {"rare bird": 1}  # 2 images: 1 trains, 1 validates
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_many_classes_are_scored_on_a_subset_with_one_all_class_call_per_step(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    per_step = 9 * 4 + 10  # 9 prompts x 4 classes, then the current prompt on all 10
    budget = IMAGES + TEXTS + 1 + 3 * per_step
    assert _tune(tiny_server, key, tmp_path, "--class-subset", "4", "--budget", str(budget)) == 0
    report = read_report(tmp_path / "run")
    steps = report["prompt_steps"]
    assert 1 <= steps <= 3 and report["plan"]["items_per_step"] == per_step
    assert report["queries"]["items"] == IMAGES + TEXTS + 1 + steps * per_step
    assert report["queries"]["loss_evaluations"] == 80 + 10 * steps
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_the_subset_holds_random_classes_and_their_hardest_negatives() -> None:
    labels = torch.arange(8).repeat_interleave(5)
    logits = torch.zeros(40, 8)
    logits[:, 7] = 5.0  # class 7 is every image's most confusable class
    picked = pick_classes(logits, labels, 4, torch.Generator().manual_seed(0))
    assert picked.numel() == 4 and 7 in picked.tolist() and picked.tolist() == sorted(picked.tolist())
    assert pick_classes(logits, labels, 8, torch.Generator()).tolist() == list(range(8))


def test_the_artifact_is_the_whole_classifier_and_eval_reproduces_the_test_accuracy(
    tiny_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = new_key(tiny_server)
    assert _tune(tiny_server, key, tmp_path, "--budget", str(IMAGES + TEXTS + 1 + 2 * PER_STEP)) == 0
    report = read_report(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "artifact" / "config.json").read_text())
    assert config["adapter_kind"] == "linear"
    capsys.readouterr()
    argv = [
        "eval",
        "--server",
        tiny_server.url,
        "--api-key",
        key.secret,
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert cbbt([*argv, "--artifact", str(tmp_path / "run" / "artifact"), *TINY_DATA]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_images"] == report["test_images"]
    assert evaluated["test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)


def test_a_budget_short_of_features_and_one_template_is_refused_before_spending(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    assert _tune(tiny_server, key, tmp_path, "--budget", str(IMAGES + 10 - 1)) == 2
    assert ledger(tiny_server, key).spent_items == 0


@pytest.mark.parametrize(
    ("budget", "bought"), [(IMAGES + 7 * 10, "simple7"), (IMAGES + 7 * 10 - 1, "single")]
)
def test_a_budget_short_of_the_80_templates_buys_the_largest_smaller_set_that_fits(
    tiny_server: ServerProcess, tmp_path: Path, budget: int, bought: str
) -> None:
    key = new_key(tiny_server)
    assert _tune(tiny_server, key, tmp_path, "--budget", str(budget)) == 0
    report = read_report(tmp_path / "run")
    templates = {"simple7": 7, "single": 1}[bought]
    assert report["plan"]["template_set"] == bought and report["plan"]["template_set_asked"] == "openai80"
    assert report["queries"]["items"] == IMAGES + templates * 10 <= budget  # no room left for a step
    assert report["prompt_steps"] == 0 and report["test_accuracy"] is not None
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_a_budget_for_the_features_only_skips_the_prompt(tiny_server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(tiny_server)
    assert _tune(tiny_server, key, tmp_path, "--budget", str(IMAGES + TEXTS + PER_STEP)) == 0
    report = read_report(tmp_path / "run")
    assert report["prompt_steps"] == 0 and report["queries"]["items"] == IMAGES + TEXTS
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_estimator_faithful_runs_the_papers_recipe_unchanged(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    key = new_key(tiny_server)
    extra = ["--estimator", "faithful", "--directions", "4", "--epochs", "1", "--adapter-epochs", "1"]
    assert _tune(tiny_server, key, tmp_path, *extra, "--budget", "2000") == 0
    report = read_report(tmp_path / "run")
    assert report["method"] == "cbbt-paper"
    assert report["config"]["estimator"] == "faithful" and report["config"]["adapter"] == "residual"
    assert report["adapter_epochs"] == 1
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_a_flag_the_default_does_not_have_is_refused(tiny_server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(tiny_server)
    assert _tune(tiny_server, key, tmp_path, "--adapter-epochs", "3") == 2
    assert ledger(tiny_server, key).spent_items == 0


def test_an_embeddings_tier_key_gets_the_feature_stages(tiny_server: ServerProcess, tmp_path: Path) -> None:
    secret = tiny_server.create_key("collab-embeddings", scopes=["embed"], default=False)
    key = Key("collab-embeddings", secret)
    assert _tune(tiny_server, key, tmp_path) == 0
    report = read_report(tmp_path / "run")
    assert report["prompt_steps"] == 0 and report["queries"]["items"] == IMAGES + TEXTS
    assert_ledger_matches(report, ledger(tiny_server, key))


def test_the_default_beats_zero_shot_by_far_with_the_real_model(
    devise_server: ServerProcess, tmp_path: Path
) -> None:
    try:
        load_dataset("fashion-mnist")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    key = new_key(devise_server)
    data = ["--data", "fashion-mnist", "--test-per-class", "20"]
    assert _tune(devise_server, key, tmp_path, "--budget", "3000", data=data) == 0
    report = read_report(tmp_path / "run")
    # 4 shots: zero-shot is ~37 % on this model, a 4-shot feature method ~75 % (docs/benchmarks/default.md).
    assert report["test_accuracy"] > report["zero_shot_test_accuracy"] + 0.15, report
    assert report["queries"]["items"] <= 3000
    assert_ledger_matches(report, ledger(devise_server, key))
