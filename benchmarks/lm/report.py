"""The fact-tracing results as a short markdown table, with the goals marked met or missed."""

from __future__ import annotations

from typing import Any

from .metrics import summary

GOAL_RECALL = 0.8
BASELINES = ("bm25", "random")


def goals(payload: dict[str, Any]) -> dict[str, Any]:
    """The brief's goals against the measured numbers: the best influence solver's Recall@10 >= 0.8, and its
    tail-patch gain above BM25's and random's (means over queries)."""
    methods = payload["methods"]
    influence = {name: m for name, m in methods.items() if name.startswith("influence-")}
    best_recall = max(influence, key=lambda name: influence[name]["recall@10"])
    best_patch = max(influence, key=lambda name: influence[name]["tail_patch"]["mean"])
    patch = influence[best_patch]["tail_patch"]["mean"]
    return {
        "influence_recall@10": {
            "method": best_recall,
            "value": influence[best_recall]["recall@10"],
            "goal": GOAL_RECALL,
            "met": influence[best_recall]["recall@10"] >= GOAL_RECALL,
        },
        "influence_tail_patch_above_baselines": {
            "method": best_patch,
            "value": patch,
            **{name: methods[name]["tail_patch"]["mean"] for name in BASELINES},
            "met": all(patch > methods[name]["tail_patch"]["mean"] for name in BASELINES),
        },
        "recall_met_by": sorted(name for name, m in influence.items() if m["recall@10"] >= GOAL_RECALL),
        "tail_patch_above_baselines_by": sorted(
            name
            for name, m in influence.items()
            if all(m["tail_patch"]["mean"] > methods[base]["tail_patch"]["mean"] for base in BASELINES)
        ),
        "best_attribution": max(methods, key=lambda name: methods[name]["mrr"]),
        "best_tail_patch": max(methods, key=lambda name: methods[name]["tail_patch"]["mean"]),
    }


def paired(payload: dict[str, Any], method: str, baseline: str) -> dict[str, float]:
    """``method``'s tail-patch gain minus ``baseline``'s on the same queries: mean ± s.e.m., how often larger."""
    ours = payload["methods"][method]["tail_patch_per_query"]
    theirs = payload["methods"][baseline]["tail_patch_per_query"]
    found = summary([a - b for a, b in zip(ours, theirs, strict=True)])
    return {"mean": found["mean"], "sem": found["sem"], "fraction_larger": found["fraction_positive"]}


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def markdown_report(payload: dict[str, Any]) -> str:
    """One row per method (MRR, Recall@10, tail-patch mean ± s.e.m., fraction positive, seconds) and the goals."""
    model, setup = payload["model"], payload["influence_setup"]
    lines = [
        "# Fact tracing on a small GPT-2 trained here",
        "",
        f"`{payload['command']}` — {payload['date']}, load {payload['load_before']} → {payload['load_after']}, "
        f"{payload['wall_seconds']} s wall.",
        "",
        f"Corpus: {payload['corpus']['documents']} documents, {payload['corpus']['facts']} planted facts, vocabulary "
        f"{payload['corpus']['vocabulary']}. Model: {model['parameters']} parameters, {model['epochs']} epochs "
        f"({model['train_seconds']} s when trained), final loss {model['final_loss']}, facts completed "
        f"{sum(payload['facts_completed'])}/{len(payload['facts_completed'])}. Influence over {setup['parameters']} "
        f"parameters (frozen path: {setup['frozen_path']}), damping {_number(setup['damping'])}.",
        "",
        f"Tail-patch: one SGD step (lr {payload['settings']['tail_patch_lr']}, all parameters) on a method's top "
        f"{payload['settings']['top_k']} documents, then the change of the completion's log-probability; per query, "
        "mean ± s.e.m. over queries. Columns in brackets: only the facts the model completes.",
        "",
        "| method | MRR | Recall@10 | tail-patch Δlog p | tail-patch > 0 | [MRR] | [Recall@10] | [tail-patch] "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in payload["methods"].items():
        patch, learned = m["tail_patch"], m["learned_facts"] or {"mrr": None, "recall@10": None, "tail_patch": {}}
        lines.append(
            f"| {name} | {_number(m['mrr'])} | {_number(m['recall@10'])} | {_number(patch['mean'])} ± "
            f"{_number(patch['sem'])} | {_number(patch['fraction_positive'])} | {_number(learned['mrr'])} | "
            f"{_number(learned['recall@10'])} | {_number(learned['tail_patch'].get('mean'))} | {m['seconds']:.1f} |"
        )
    found = goals(payload)
    recall, patch = found["influence_recall@10"], found["influence_tail_patch_above_baselines"]
    lines += [
        "",
        f"- Goal influence Recall@10 ≥ {recall['goal']}: **{'met' if recall['met'] else 'missed'}** "
        f"(best {recall['method']}: {_number(recall['value'])}; met by {', '.join(found['recall_met_by']) or 'none'}).",
        f"- Goal influence tail-patch above BM25 and random: **{'met' if patch['met'] else 'missed'}** "
        f"({patch['method']}: {_number(patch['value'])}; bm25 {_number(patch['bm25'])}, random "
        f"{_number(patch['random'])}; above both: {', '.join(found['tail_patch_above_baselines_by']) or 'none'}).",
        f"- Best attribution (MRR): {found['best_attribution']}; best tail-patch: {found['best_tail_patch']}.",
        "",
        "Paired tail-patch differences (same queries), mean ± s.e.m. and the fraction of queries where the method's "
        "gain is larger:",
        "",
        "| method | − bm25 | larger than bm25 | − random | larger than random |",
        "|---|---|---|---|---|",
    ]
    for name in payload["methods"]:
        if name in BASELINES:
            continue
        cells = []
        for base in BASELINES:
            diff = paired(payload, name, base)
            cells += [f"{_number(diff['mean'])} ± {_number(diff['sem'])}", _number(diff["fraction_larger"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
