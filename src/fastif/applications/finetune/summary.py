"""Summaries of an experiment's results: accuracy change against the original model (mean ± sd over seeds),
a markdown table and a plot, written beside the results JSON and the config."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...files import atomic_write, atomic_write_json, atomic_write_text

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
TABLE_FILE = "table.md"
PLOT_FILE = "plot.png"


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value) and count, in accuracy points."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def metric_changes(results: dict[str, Any], metric: str = "accuracy") -> dict[tuple[str, str, str], list[list[float]]]:
    """Per (anchor group, mode, evaluated group): one curve per seed of the change of ``metric`` on the evaluated
    group's test part, step 0..S; accuracy in points, loss (mean cross-entropy) as it is."""
    original, unit = results["original"], 100.0 if metric == "accuracy" else 1.0
    curves: dict[tuple[str, str, str], list[list[float]]] = defaultdict(list)
    for run in results["runs"]:
        for target, base in original.items():
            curve = [0.0] + [unit * (s["eval"][target][metric] - base[metric]) for s in run["steps"]]
            curves[(run["group"], run["mode"], target)].append(curve)
    return curves


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Final accuracy change per anchor group and mode (on the anchors' own group, and averaged over all groups),
    the final test-loss change on the own group, and the anchors' own loss change per step."""
    curves, losses = metric_changes(results), metric_changes(results, "loss")
    groups = list(results["config"]["groups"])
    modes = list(results["config"]["modes"])
    summary: dict[str, Any] = {"own_group": {}, "all_groups": {}, "own_group_loss": {}, "anchor_loss_change": {}}
    for group in groups:
        summary["own_group_loss"][group] = {
            mode: _mean_sd([c[-1] for c in losses[(group, mode, group)]]) for mode in modes
        }
        own = {mode: _mean_sd([c[-1] for c in curves[(group, mode, group)]]) for mode in modes}
        mean_all = {
            mode: _mean_sd([statistics.fmean(c) for c in zip(*(
                [curve[-1] for curve in curves[(group, mode, target)]] for target in groups), strict=True)])
            for mode in modes
        }  # fmt: skip
        summary["own_group"][group] = own
        summary["all_groups"][group] = mean_all
    for mode in modes:
        own_means = [summary["own_group"][group][mode]["mean"] for group in groups]
        summary["own_group"].setdefault("mean", {})[mode] = {"mean": statistics.fmean(own_means), "n": len(groups)}
    summary["anchor_loss_change"] = _anchor_loss_changes(results)
    if results.get("published") and {"helpful", "random"} <= set(modes):
        summary["published_comparison"] = published_comparison(curves, groups, results)
    return summary


def per_seed_gains(curves: dict[tuple[str, str, str], list[list[float]]], groups: list[str], mode: str) -> list[float]:
    """Per seed, the final accuracy change (points) on each group's own test part, averaged over the groups."""
    finals = [[curve[-1] for curve in curves[(group, mode, group)]] for group in groups]
    return [statistics.fmean(values) for values in zip(*finals, strict=True)]


def published_comparison(
    curves: dict[tuple[str, str, str], list[list[float]]], groups: list[str], results: dict[str, Any]
) -> dict[str, Any]:
    """The helpful mode's per-seed gain against random (paired t-test over seeds) and against the published gain
    (one-sample t-test); p-values are two-sided, ``None`` where fewer than two seeds ran or the values tested do
    not vary over seeds (a t-test is undefined there)."""
    from scipy import stats

    helpful, random = per_seed_gains(curves, groups, "helpful"), per_seed_gains(curves, groups, "random")
    published = float(results["published"]["gain_points"])
    differences = [h - r for h, r in zip(helpful, random, strict=True)]
    paired = len(helpful) > 1 and len(set(differences)) > 1
    spread = len(helpful) > 1 and len(set(helpful)) > 1
    return {
        **results["published"],
        "helpful_per_seed": helpful,
        "random_per_seed": random,
        "helpful_mean": statistics.fmean(helpful),
        "helpful_minus_random_mean": statistics.fmean(differences),
        "p_helpful_vs_random": float(stats.ttest_rel(helpful, random).pvalue) if paired else None,
        "p_helpful_vs_published": float(stats.ttest_1samp(helpful, published).pvalue) if spread else None,
    }


def _anchor_loss_changes(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean change of the anchors' own loss over one step, per mode (the sign check of the influence scores)."""
    changes: dict[str, list[float]] = defaultdict(list)
    for run in results["runs"]:
        changes[run["mode"]] += [s["anchor_loss_after"] - s["anchor_loss_before"] for s in run["steps"]]
    return {mode: _mean_sd(values) for mode, values in changes.items()}


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:+.2f} ± {stats['sd']:.2f}" if "sd" in stats else f"{stats['mean']:+.2f}"


def _loss_cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:+.2e} ± {stats['sd']:.1e}"


def markdown_table(results: dict[str, Any], command: str | None = None) -> str:
    """The results as markdown: original accuracy, final accuracy change per group and mode, timing and load."""
    config, summary = results["config"], summarise(results)
    modes, groups = list(config["modes"]), list(results["config"]["groups"])
    environment = results["environment"]
    lines = [
        f"# experiment {config['experiment']} ({config['task']})",
        "",
        f"Accuracy change (points) after {config['steps']} SGD steps (lr {config['lr']:g}) on the anchors' group's "
        f"held-out test sample, mean ± sd over seeds {list(config['seeds'])}.",
        "",
        "| anchors from | original acc | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for group in groups:
        cells = [_cell(summary["own_group"][group][mode]) for mode in modes]
        lines.append(f"| {group} | {100 * results['original'][group]['accuracy']:.2f} | " + " | ".join(cells) + " |")
    lines.append("| mean | | " + " | ".join(_cell(summary["own_group"]["mean"][m]) for m in modes) + " |")
    lines += ["", "Accuracy change averaged over all groups' test samples (same runs):", ""]
    lines += ["| anchors from | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for group in groups:
        lines.append(f"| {group} | " + " | ".join(_cell(summary["all_groups"][group][m]) for m in modes) + " |")
    lines += ["", "Test-loss change (mean cross-entropy) on the anchors' group's held-out test sample (same runs):", ""]
    lines += ["| anchors from | original loss | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for group in groups:
        cells = [_loss_cell(summary["own_group_loss"][group][mode]) for mode in modes]
        lines.append(f"| {group} | {results['original'][group]['loss']:.4f} | " + " | ".join(cells) + " |")
    loss = summary["anchor_loss_change"]
    lines += ["", "Change of the anchors' own mean loss over one step (all steps, groups and seeds):", ""]
    lines += ["| " + " | ".join(modes) + " |", "|" + "---|" * len(modes)]
    lines.append("| " + " | ".join(_loss_cell(loss[m]) for m in modes) + " |")
    if "published_comparison" in summary:
        lines += ["", *_published_lines(summary["published_comparison"])]
    solves = [s["solver"] for run in results["runs"] for s in run["steps"] if s["solver"]]
    if solves:
        settled = sum(bool(solve.get("converged")) for solve in solves)
        growth = sorted(float(solve.get("late_growth", 0.0)) for solve in solves)
        lines += [
            "",
            f"LiSSA: {settled}/{len(solves)} s_test chains settled by the library's check (late-quarter growth of "
            f"‖h‖ < 5%); median late growth {100 * growth[len(growth) // 2]:.1f}%, max {100 * growth[-1]:.1f}%.",
        ]
    lines += [
        "",
        f"Wall time {environment['wall_seconds'] / 60:.1f} min (setup {results['setup']['setup_seconds']:.0f} s) "
        f"on {environment['start']['cpu_count']} CPU cores, {environment['start']['torch_threads']} torch threads; "
        f"load average at start {_load(environment['start'])}, at end {_load(environment['end'])}.",
    ]
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def _published_lines(comparison: dict[str, Any]) -> list[str]:
    """The paired comparison with the published gain, as a sentence per test."""

    def p(value: float | None) -> str:
        return "n/a (under two seeds, or the same value in every seed)" if value is None else f"{value:.3g}"

    seeds = ", ".join(f"{value:+.2f}" for value in comparison["helpful_per_seed"])
    return [
        f"Against {comparison['source']}'s published gain of {comparison['gain_points']:+.1f} points: helpful's "
        f"per-seed gain (mean over groups) {seeds}, mean {comparison['helpful_mean']:+.2f}; helpful − random "
        f"{comparison['helpful_minus_random_mean']:+.2f} (paired t-test over seeds, p = "
        f"{p(comparison['p_helpful_vs_random'])}); helpful against {comparison['gain_points']:+.1f} (one-sample "
        f"t-test, p = {p(comparison['p_helpful_vs_published'])})."
    ]


def _load(env: dict[str, Any]) -> str:
    return "/".join(f"{value:.1f}" for value in env["loadavg"])


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Accuracy change on the anchors' own group against the step, one panel per group, mean ± sd per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = metric_changes(results)
    groups, modes = list(results["config"]["groups"]), list(results["config"]["modes"])
    figure, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for axis, group in zip(axes[0], groups, strict=True):
        for mode in modes:
            runs = curves[(group, mode, group)]
            steps = range(len(runs[0]))
            mean = [statistics.fmean(values) for values in zip(*runs, strict=True)]
            sd = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in zip(*runs, strict=True)]
            axis.plot(steps, mean, label=mode, marker="o", markersize=3)
            axis.fill_between(steps, [m - s for m, s in zip(mean, sd, strict=True)],
                              [m + s for m, s in zip(mean, sd, strict=True)], alpha=0.15)  # fmt: skip
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"anchors: {group}")
        axis.set_xlabel("SGD step")
    axes[0][0].set_ylabel("accuracy change (points)")
    axes[0][-1].legend(fontsize=8)
    config = results["config"]
    figure.suptitle(f"fastif experiment {config['experiment']} ({config['task']}), mean ± sd over seeds")
    figure.tight_layout()
    target = atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return target


def write_results(results: dict[str, Any], config: Any, folder: str | Path, command: str | None = None) -> Path:
    """Write results.json (with its summary), config.json, table.md and plot.png into ``folder``."""
    from ...config import save_config

    folder = Path(folder)
    atomic_write_json(folder / RESULTS_FILE, {**results, "summary": summarise(results)})
    save_config(config, folder / CONFIG_FILE)
    atomic_write_text(folder / TABLE_FILE, markdown_table(results, command))
    plot(results, folder / PLOT_FILE)
    return folder
