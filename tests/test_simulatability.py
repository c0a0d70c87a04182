"""Simulatability (FastIF application 1) on a tiny random BERT: the whole run, its first-order maths, and its CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bert, token_batch

from fastif import AdapterConfig, HFClassifierAdapter, TensorData
from fastif.applications.simulatability import (
    KINDS,
    SimulatabilityConfig,
    format_headline,
    line_losses,
    random_explanations,
    run_simulatability,
    write_simulatability,
)
from fastif.cli.applications import add_experiment_commands
from fastif.cli.applications import simulatability_config_from_args as config_from_args
from fastif.errors import ConfigError

TOP = ("bert.encoder.layer.1", "bert.pooler", "classifier")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: tiny models run many times faster without thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> SimulatabilityConfig:
    """Sizes for a run of a few seconds on the tiny BERT."""
    sizes = dict(n_correct=2, n_wrong=2, test_pool=40, candidates=12, n_explain=3, n_lr=5, params=TOP)
    sizes.update(lissa_depth=8, lissa_batch_size=2, lissa_scale_samples=1, lissa_power_iterations=5)
    sizes.update(simulator_train_size=24, simulator_batch_size=8, batch_size=16)
    return SimulatabilityConfig(**{**sizes, **overrides})


def tiny_data(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, TensorData, TensorData]:
    """The tiny 3-class BERT, 60 training and 40 test examples of random tokens."""
    return tiny_bert(dtype), TensorData(token_batch(60, seed=1)), TensorData(token_batch(40, seed=2))


def test_smoke_run_on_tiny_bert(tmp_path: Path) -> None:
    """A full LiSSA run yields well-formed records, summaries, a figure and standard JSON."""
    model, train, test = tiny_data()
    config = tiny_config()
    result = run_simulatability(model, train, test, config)
    records = result["records"]
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert all((r["gold"] == r["predicted"]) == r["correct"] for r in records)
    for record in records:
        kinds = [e["kind"] for e in record["explanations"]]
        assert kinds == [kind for kind in KINDS for _ in range(config.n_explain)]
        helpful = [e["score"] for e in record["explanations"] if e["kind"] == "helpful"]
        harmful = [e["score"] for e in record["explanations"] if e["kind"] == "harmful"]
        assert helpful == sorted(helpful, reverse=True) and min(helpful) >= max(harmful)
        for explanation in record["explanations"]:
            for mode in ("gold", "predicted"):
                assert len(explanation["loss"][mode]) == config.n_lr
                assert np.isfinite(explanation["loss"][mode]).all()
    cells = result["summary"].values()
    assert len(cells) == 12 and all(cell["n"] == 2 * config.n_explain for cell in cells)
    assert result["simulator"]["steps"] == 3 and "loadavg_1_5_15" in result["machine"]["start"]
    assert "lr=" in format_headline(result)
    paths = write_simulatability(result, tmp_path, config)
    assert paths["figure"].read_bytes().startswith(b"\x89PNG")
    stored = json.loads(paths["results"].read_text(), parse_constant=lambda name: pytest.fail(name))
    assert stored["config"]["n_lr"] == config.n_lr and len(stored["learning_rates"]) == config.n_lr


def test_first_step_matches_influence_to_first_order() -> None:
    """Simulator = model, identity solver, gold labels: Δloss(lr) / lr → -score for correctly predicted points."""
    model, train, test = tiny_data(torch.float64)
    config = tiny_config(solver="identity", simulator_train_size=0, n_wrong=0, n_lr=2, lr_min_log10=-7, lr_max_log10=-6)
    result = run_simulatability(model, train, test, config)
    for record in result["records"]:
        for explanation in record["explanations"]:
            if explanation["kind"] == "random":
                continue
            slope = (explanation["loss"]["gold"][0] - record["base_loss"]) / result["learning_rates"][0]
            assert slope == pytest.approx(-explanation["score"], rel=1e-3, abs=1e-9)


def test_line_losses_equal_a_loop() -> None:
    """The lr-vmapped loss curve equals evaluating each stepped parameter vector one by one."""
    model = tiny_bert(torch.float64)
    adapter = HFClassifierAdapter(model, AdapterConfig(include=TOP))
    flat = adapter.flat_params().detach()
    batch = token_batch(1, seed=3)
    direction = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lrs = torch.logspace(-4, -1, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([adapter.per_example_loss(flat - lr * direction, batch)[0] for lr in lrs])
    torch.testing.assert_close(line_losses(adapter, flat, batch, direction, lrs, chunk=3), expected)


def test_random_explanations_are_stratified() -> None:
    """n random points spread over the classes as evenly as possible, without repeats."""
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    picked = random_explanations(labels, 7, np.random.default_rng(0))
    assert len(set(picked)) == 7
    assert sorted(labels[picked].tolist()) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "bad", [dict(n_correct=0, n_wrong=0), dict(candidates=2, n_explain=3), dict(n_lr=1), dict(solver="exact")]
)
def test_config_refuses_bad_values(bad: dict) -> None:
    """Sizes and choices that cannot run are refused with a ConfigError naming them."""
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SimulatabilityConfig(**bad)


def test_cli_registration_on_own_parser() -> None:
    """``experiment simulatability`` registers on a fresh parser, beside the other experiments of its group."""
    parser = argparse.ArgumentParser(prog="fastif")
    add_experiment_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["experiment", "simulatability", "--quick", "--candidates", "50", "--output", "x"])
    assert args.handler.__name__ == "_simulatability_command" and args.output == Path("x")
    config = config_from_args(args)
    assert config == SimulatabilityConfig.quick(candidates=50)

    other = argparse.ArgumentParser(prog="fastif")
    add_experiment_commands(other.add_subparsers(dest="command", required=True))
    args = other.parse_args(["experiment", "simulatability", "--n-test", "4", "--solver", "identity"])
    assert config_from_args(args) == SimulatabilityConfig(n_correct=4, n_wrong=4, solver="identity")
    assert other.parse_args(["experiment", "correct"]).experiment == "correct"
