"""Bad inputs get clear errors (docs/reliability.md lists each case and the test that covers it)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_bert, token_batch
from torch import nn

import fastif
from fastif.candidates import CandidateConfig
from fastif.cli import run
from fastif.errors import ConfigError, DataError, SolverError
from fastif.pipeline import PipelineConfig
from fastif.pipeline.config import ScoringConfig, SolverStageConfig
from fastif.recipes.nli.model import NLITrainConfig


def _linear(features: int = 3, classes: int = 2) -> fastif.TorchAdapter:
    torch.manual_seed(0)
    return fastif.TorchAdapter(nn.Linear(features, classes), nn.CrossEntropyLoss(reduction="none"))


def _data(n: int = 6, features: int = 3, classes: int = 2):
    return torch.randn(n, features), torch.randint(0, classes, (n,))


def test_inputs_whose_shape_does_not_fit_the_model():
    with pytest.raises(DataError, match="model failed on this batch"):
        fastif.Influence(_linear(), _data(features=5), fastif.Exact(damping=1.0)).fit()


def test_labels_out_of_range_for_a_torch_model():
    x, _ = _data()
    with pytest.raises(DataError, match="label range"):
        fastif.Influence(_linear(), (x, torch.full((6,), 7)), fastif.Exact(damping=1.0)).fit()


def test_labels_out_of_range_for_a_huggingface_model():
    adapter = fastif.HFClassifierAdapter(tiny_bert(num_labels=3))
    batch = token_batch(4)
    batch["labels"][0] = 3
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\]"):
        fastif.Influence(adapter, fastif.TensorData(batch), fastif.Identity()).scores(fastif.TensorData(batch))


def test_float_inputs_of_another_dtype_are_cast_to_the_model_dtype():
    x, y = _data()
    influence = fastif.Influence(_linear(), (x.double(), y), fastif.Exact(damping=1.0))
    assert influence.scores((x[:2].double(), y[:2])).dtype == torch.float32


def test_a_loss_that_turns_nan_is_reported_with_its_rows():
    x, y = _data()
    train = (x, y)
    test_x = x[:3].clone()
    test_x[1] = 1e30  # finite input, but exp overflows to NaN in this loss
    adapter = fastif.TorchAdapter(nn.Linear(3, 2), lambda out, t: torch.exp(out).sum(1) * torch.exp(-out).sum(1))
    with pytest.raises(DataError, match=r"non-finite test-loss gradient for test row\(s\) \[1\]"):
        fastif.Influence(adapter, train, fastif.Identity()).s_test((test_x, y[:3]))


def test_a_training_point_with_non_finite_gradient_is_named():
    x, y = _data()
    x[4] = 1e30
    adapter = fastif.TorchAdapter(nn.Linear(3, 2), lambda out, t: torch.exp(out).sum(1) * torch.exp(-out).sum(1))
    influence = fastif.Influence(adapter, (x, y), fastif.Identity())
    with pytest.raises(DataError, match=r"training example\(s\) \[4\]"):
        influence.scores((x[:2], y[:2]))


def test_negative_damping_is_refused():
    with pytest.raises(ConfigError, match=r"^solver\.damping must be a finite number >= 0, got -1\.0$"):
        fastif.CG(damping=-1.0)


def test_cg_on_an_indefinite_hessian_names_the_fix():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    adapter = fastif.TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"))
    data = _data(n=20)
    with pytest.raises(SolverError, match=r"non-positive curvature .* set damping above \d"):
        fastif.Influence(adapter, data, fastif.CG()).s_test(data)


def test_cg_that_runs_out_of_iterations_warns_and_reports_non_convergence():
    data = _data(n=20)
    influence = fastif.Influence(_linear(), data, fastif.CG(damping=1e-3, max_iterations=1, tolerance=1e-14))
    with pytest.warns(RuntimeWarning, match="raise max_iterations"):
        info = influence.solve(data).info
    assert info["converged"] is False and info["iterations"] == len(info["residual_trace"]) == 1
    assert info["residual_trace"][0] > 1e-14


def test_cg_whose_hessian_products_turn_nan_stops_at_once_with_the_fix():
    x, y = _data()
    x[4] = 1e30  # a finite input whose loss curvature overflows to NaN
    adapter = fastif.TorchAdapter(nn.Linear(3, 2), lambda out, t: torch.exp(out).sum(1) * torch.exp(-out).sum(1))
    influence = fastif.Influence(adapter, (x, y), fastif.CG(damping=1.0))
    with pytest.raises(SolverError, match=r"CG diverged at iteration 1: the residual is nan.*increase damping"):
        influence.s_test((x[:2], y[:2]))


def test_cg_without_iterations_is_refused():
    with pytest.raises(ConfigError, match=r"solver\.max_iterations must be a positive integer, got 0"):
        fastif.CG(max_iterations=0)


def test_lissa_that_has_not_settled_warns_and_reports_its_norm_traces():
    adapter = _linear()  # seeds the data too
    data = _data(n=20)
    influence = fastif.Influence(adapter, data, fastif.LiSSA(depth=8, repeats=2, damping=1e-3))
    with pytest.warns(RuntimeWarning, match="LiSSA has not settled.*Raise depth"):
        info = influence.solve(data).info
    assert info["converged"] is False and max(info["late_growth"]) >= 0.05
    assert info["norm_trace"].shape == (2, 8) and bool(torch.isfinite(info["norm_trace"]).all())


def test_lissa_reports_nan_as_divergence():
    data = _data(n=20)
    influence = fastif.Influence(_linear(), data, fastif.LiSSA(scale=1e-30, depth=50))
    with pytest.raises(SolverError, match="diverged"):
        influence.s_test(data)


def test_a_batch_that_is_not_a_pair_is_refused():
    with pytest.raises(DataError, match=r"\(inputs, targets\) pairs"):
        fastif.Influence(_linear(), {"x": torch.randn(4, 3)}, fastif.Identity()).scores({"x": torch.randn(2, 3)})


def test_tensors_with_different_example_counts_are_refused():
    with pytest.raises(DataError, match="leading"):
        fastif.TensorData((torch.randn(4, 3), torch.randint(0, 2, (5,))))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: fastif.AdapterConfig(l2=math.inf), "parameters.l2 must be a finite number >= 0, got inf"),
        (lambda: fastif.Exact(damping=math.inf), "solver.damping must be a finite number >= 0, got inf"),
        (lambda: fastif.CG(tolerance=math.nan), "solver.tolerance must be a finite number > 0, got nan"),
        (lambda: fastif.LiSSA(depth=-1), "solver.depth must be a positive integer (or unset), got -1"),
        (lambda: fastif.Arnoldi(rank=0), "solver.rank must be a positive integer, got 0"),
        (lambda: fastif.KFAC(damping=math.inf), "solver.damping must be a finite number >= 0, got inf"),
    ],
    ids=["adapter-l2-inf", "exact-damping-inf", "cg-tolerance-nan", "lissa-depth", "arnoldi-rank", "kfac-damping"],
)  # fmt: skip
def test_bad_solver_and_adapter_options_are_refused_at_construction(make, needle):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value) == needle


def test_a_non_integer_k_is_refused_by_the_facade():
    data = _data()
    influence = fastif.Influence(_linear(), data, fastif.Exact(damping=1.0))
    with pytest.raises(DataError, match=r"k must be a whole number of training points, got 2\.5"):
        influence.top_k(data, k=2.5)


@pytest.mark.parametrize(
    ("make", "key", "needle"),
    [
        (lambda: SolverStageConfig(damping=math.inf), "solver.damping", "a finite number >= 0 (or unset), got inf"),
        (
            lambda: SolverStageConfig(tail_average=1.0),
            "solver.tail_average",
            "a finite number >= 0 and < 1 (or unset), got 1.0",
        ),
        (lambda: ScoringConfig(top_k=True), "scoring.top_k", "a positive integer, got True"),
        (lambda: PipelineConfig(seed=2**32), "seed", "an integer >= 0 and < 4294967296, got 4294967296"),
        (lambda: NLITrainConfig(lr=math.nan), "model.recipe.lr", "a finite number > 0, got nan"),
        (lambda: CandidateConfig(nlist=0), "candidates.faiss.nlist", "a positive integer, got 0"),
    ],
)
def test_typed_configs_check_their_numbers_in_one_place(make, key, needle):
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.key == key and str(error.value) == f"{key} must be {needle}"


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"solver": {"depth": "ten"}}, "--depth (solver.depth) must be an integer or unset, got str 'ten'"),
        ({"solver": {"damping": [1]}}, "--damping (solver.damping) must be a number or unset, got list [1]"),
        ({"scoring": {"top_k": 2.5}}, "-k/--top-k (scoring.top_k) must be an integer, got float 2.5"),
    ],
    ids=["depth-ten", "damping-list", "top-k-fraction"],
)
def test_a_config_file_value_of_the_wrong_type_names_the_flag_and_key(table, needle, tmp_path, capsys):
    config = tmp_path / "fastif.json"
    config.write_text(json.dumps(table), encoding="utf-8")
    assert run(["influence", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"fastif: error: {config}: {needle}"]
    assert not (tmp_path / "out").exists()
