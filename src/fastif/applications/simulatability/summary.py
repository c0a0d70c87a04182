"""Summary of a simulatability run: statistics of the loss curves, the figure, the results files and the
headline numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...config import save_config
from ...files import atomic_write, atomic_write_json, jsonable
from .config import CONFIG_FILE, CORRECTNESS, FIGURE_FILE, KINDS, LABEL_MODES, RESULTS_FILE, SimulatabilityConfig


def summarise(records: list[dict[str, Any]], n_lr: int) -> dict[str, Any]:
    """Mean ± sd over (test point, explanation) of the loss change per correctness, label mode and kind.

    Also the mean ± sd of ``log10(loss / base loss)`` (FastIF read the effect in orders of magnitude) and the
    share of explanations that lower the loss, all per learning rate.
    """
    summary: dict[str, Any] = {}
    for correctness in CORRECTNESS:
        chosen = [r for r in records if r["correct"] == (correctness == "correct")]
        for mode in LABEL_MODES:
            for kind in KINDS:
                rows = [
                    (np.asarray(e["loss"][mode]), r["base_loss"])
                    for r in chosen
                    for e in r["explanations"]
                    if e["kind"] == kind
                ]
                summary[f"{correctness}/{mode}/{kind}"] = _curve_stats(rows, n_lr)
    return summary


def _curve_stats(rows: list[tuple[np.ndarray, float]], n_lr: int) -> dict[str, Any]:
    """Per-lr statistics of loss curves against their base losses (NaN-free lists; empty when no rows)."""
    if not rows:
        return {"n": 0}
    losses = np.stack([loss for loss, _ in rows])
    base = np.array([b for _, b in rows])[:, None]
    delta = losses - base
    ratio = np.log10(np.maximum(losses, 1e-30) / np.maximum(base, 1e-30))
    sd = (lambda a: a.std(axis=0, ddof=1)) if len(rows) > 1 else (lambda a: np.zeros(n_lr))
    return {
        "n": len(rows),
        "mean_base_loss": float(base.mean()),
        "delta_mean": delta.mean(axis=0).tolist(),
        "delta_sd": sd(delta).tolist(),
        "log10_ratio_mean": ratio.mean(axis=0).tolist(),
        "log10_ratio_sd": sd(ratio).tolist(),
        "share_lowered": (delta < 0).mean(axis=0).tolist(),
    }


def plot_simulatability(result: dict[str, Any], path: str | Path) -> Path:
    """Loss change vs learning rate, mean ± sd per explanation kind: rows = label mode, columns = correctness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = np.asarray(result["learning_rates"])
    colours = {"helpful": "#1b9e77", "harmful": "#d95f02", "random": "#7570b3"}
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, squeeze=False)
    for row, mode in enumerate(LABEL_MODES):
        for column, correctness in enumerate(CORRECTNESS):
            axis = axes[row][column]
            for kind in KINDS:
                stats = result["summary"][f"{correctness}/{mode}/{kind}"]
                if not stats["n"]:
                    continue
                mean, sd = np.asarray(stats["delta_mean"]), np.asarray(stats["delta_sd"])
                axis.plot(lrs, mean, color=colours[kind], label=f"{kind} (n={stats['n']})")
                axis.fill_between(lrs, mean - sd, mean + sd, color=colours[kind], alpha=0.15)
            axis.axhline(0.0, color="black", linewidth=0.6)
            axis.set_xscale("log")
            axis.set_yscale("symlog", linthresh=_linthresh(result))
            axis.set_title(f"{correctness} predictions, explanation labelled {mode}", fontsize=10)
            axis.legend(fontsize=8)
            if column == 0:
                axis.set_ylabel("Δ simulator loss vs model prediction")
            if row == 1:
                axis.set_xlabel("learning rate of the single SGD step")
    figure.suptitle("Simulatability: one training example as one SGD step (mean ± sd)")
    figure.tight_layout()
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=130))
    plt.close(figure)
    return target


def _linthresh(result: dict[str, Any]) -> float:
    """symlog's linear range: a tenth of the median |mean change| at the largest lr (positive)."""
    ends = [abs(stats["delta_mean"][-1]) for stats in result["summary"].values() if stats.get("n")]
    return max(float(np.median(ends)) / 10, 1e-6) if ends else 1e-3


def write_simulatability(result: dict[str, Any], out_dir: str | Path, config: SimulatabilityConfig) -> dict[str, Path]:
    """Write the results JSON, the figure and the config into ``out_dir``."""
    out = Path(out_dir)
    return {
        "results": atomic_write_json(out / RESULTS_FILE, jsonable(result)),
        "figure": plot_simulatability(result, out / FIGURE_FILE),
        "config": save_config(config, out / CONFIG_FILE),
    }


def format_headline(result: dict[str, Any]) -> str:
    """A few lines: mean log10(loss ratio) at the lr nearest 1e-3 for every correctness/label/kind cell."""
    lrs = np.asarray(result["learning_rates"])
    at = int(np.argmin(np.abs(np.log10(lrs) + 3)))
    lines = [f"mean log10(loss after / before) at lr={lrs[at]:.2g} (negative = the step moved towards the model):"]
    for key, stats in result["summary"].items():
        if stats.get("n"):
            lines.append(
                f"  {key:<26} {stats['log10_ratio_mean'][at]:+.3f} ± {stats['log10_ratio_sd'][at]:.3f}"
                f"  lowered {100 * stats['share_lowered'][at]:.0f}%  (n={stats['n']})"
            )
    return "\n".join(lines)
