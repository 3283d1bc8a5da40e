"""results.md: the bench's table (mean ± std over seeds per method and shot count)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from client.grouping import groups, mean_std, ordered_methods
from client.methods import METHODS


class GridSummary(Protocol):
    """What the table's header says about the grid (a BenchConfig)."""

    @property
    def data(self) -> str: ...
    @property
    def seeds(self) -> tuple[int, ...]: ...
    @property
    def budget(self) -> int | None: ...
    @property
    def views(self) -> int: ...
    @property
    def test_per_class(self) -> int | None: ...


def _pm(values: Sequence[float]) -> str:
    mean, std = mean_std(values, 100.0)
    return "–" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def _num(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:,.0f}" if mean >= 10 else f"{mean:.1f}"


def _prompt_only(method: str) -> bool:
    spec = METHODS.get(method)
    return spec is not None and spec.prompt_only


def _tiers(runs: Sequence[Mapping[str, Any]]) -> str:
    """The tier(s) a group's runs used, from their reports (several if they differed)."""
    found = sorted({str(r["report"].get("tier")) for r in runs if r["report"].get("tier")})
    return " / ".join(found) or "–"


def results_markdown(
    cfg: GridSummary, records: Sequence[Mapping[str, Any]], passes: Sequence[Mapping[str, Any]]
) -> str:
    table = groups(records, list(METHODS))
    # White-box references per (shots, prompt-only?): prompt-only methods are measured against
    # CoOp alone when it ran, everything else against CoOp + adapter.
    ceilings = {
        (g.shots, g.method == "coop-prompt-whitebox"): statistics.fmean(g.values("test_accuracy"))
        for g in table
        if g.method in ("coop-whitebox", "coop-prompt-whitebox") and g.values("test_accuracy")
    }
    lines = [
        f"# Benchmark: {cfg.data}",
        "",
        f"Seeds {', '.join(map(str, cfg.seeds))}; per-run budget "
        f"{cfg.budget if cfg.budget is not None else 'none'} items (image features included); "
        f"{cfg.views} cached view(s) per training image; test images per class: "
        f"{cfg.test_per_class or 'all'}. Accuracies in %, mean ± sample std over seeds; selection on "
        "validation only; the test split is scored once per run.",
        "",
        "- **items charged**: items (images + text sequences encoded) the run's own key paid for. All "
        "runs share one feature cache, and each split's image features are fetched once before its "
        "runs (the feature pass below), so this is ≈ the run's text/prompt cost only.",
        "- **items incl. features**: items charged + the image features the run used but found cached "
        "(train × views + val + test): what it would cost alone, from a cold cache. `--budget` caps this.",
        "- **API tier**: the narrowest API tier offering every route the run called (embeddings: "
        "`/v1/embeddings`; predictions: `/v1/classify` + `/v1/token-embeddings`; full: soft prompts' "
        "`/v1/prompt-embeddings` too); – for in-process runs.",
        "- **calls**: HTTP requests; **loss evals**: prompt evaluations (each = C class texts, or on "
        "the predictions tier one classify call of the batch's images + C prompts).",
        "- **% of white-box**: mean test accuracy as a fraction of white-box CoOp's (exact gradients, "
        "in-process, NOT black-box; its items count in-process encodings, not API calls): of "
        "`coop-prompt-whitebox` (CoOp alone) for prompt-only methods when it ran, else of "
        "`coop-whitebox` (CoOp + the same adapter).",
        "",
        "| method | API tier | shots | runs | test acc | val acc | zero-shot test | items charged "
        "| items incl. features | calls | loss evals | wall s | % of white-box |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in table:
        tests = g.values("test_accuracy")
        ceiling = ceilings.get((g.shots, _prompt_only(g.method)), ceilings.get((g.shots, False)))
        share = f"{100 * statistics.fmean(tests) / ceiling:.0f}" if tests and ceiling else "–"
        name = g.method + ("" if METHODS.get(g.method) is None or METHODS[g.method].black_box else " †")
        budget_note = "" if g.budget in (None, cfg.budget) else f" (budget {g.budget})"
        lines.append(
            f"| {name}{budget_note} | {_tiers(g.runs)} | {g.shots} | {len(g.runs)} | {_pm(tests)} "
            f"| {_pm(g.values('val_accuracy'))} "
            f"| {_pm(g.values('zero_shot_test_accuracy'))} | {_num(g.values('items_charged'))} "
            f"| {_num(g.values('items_including_features'))} | {_num(g.values('calls'))} "
            f"| {_num(g.values('loss_evaluations'))} | {_num(g.values('wall_seconds'))} | {share} |"
        )
    lines.append("")
    if any(g.method in METHODS and not METHODS[g.method].black_box for g in table):
        lines += ["† not black-box (a reference ceiling).", ""]
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["Failed runs:", ""]
        lines += [f"- {r['method']} {r['shots']}-shot seed {r['seed']}: {r.get('error')}" for r in failed]
        lines.append("")
    if passes:
        total = sum(int(p["queries"]["items"]) for p in passes)
        lines += [
            f"Feature passes (shared, charged to no run): {len(passes)} split(s), {total:,} image items, "
            f"{sum(float(p['wall_seconds']) for p in passes):.0f} s.",
            "",
        ]
    lines += ["What each method needs from the API:", "", "| method | needs | what it is |", "|---|---|---|"]
    for name in ordered_methods(records, list(METHODS)):
        spec = METHODS.get(name)
        if spec is not None:
            lines.append(f"| {name} | {spec.needs} | {spec.description} |")
    return "\n".join(lines) + "\n"
