"""Every solver reports its relative residual ‖(H + damping·I)s − v‖ / ‖v‖: on the full H where that is affordable,
else on the Hessian's fixed sample, and says which (``residual_scope``)."""

from __future__ import annotations

import pytest
import torch
from helpers import squared_error

from fastif import CG, AdapterConfig, Arnoldi, Exact, Hessian, LiSSA, TensorData, TorchAdapter
from fastif.cli.pipeline import _describe_s_test


def _closed_form_residuals(x: torch.Tensor, l2: float, damping: float, s: torch.Tensor, v: torch.Tensor) -> list[float]:
    shifted = x.T @ x / x.shape[0] + (l2 + damping) * torch.eye(x.shape[1], dtype=x.dtype)
    return ((s @ shifted - v).norm(dim=1) / v.norm(dim=1)).tolist()


@pytest.mark.filterwarnings("ignore:CG stopped")
@pytest.mark.parametrize(
    "solver",
    [Exact(damping=0.1), CG(damping=0.1, max_iterations=3), Arnoldi(rank=3, damping=0.1), LiSSA(damping=0.1)],
    ids=["exact", "cg", "arnoldi", "lissa"],
)
def test_reported_residual_is_the_closed_form_one(ridge, solver):
    adapter, train, _, x, l2 = ridge
    vectors = torch.randn(2, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = solver.fit(Hessian(adapter, train)).solve(vectors)
    truth = _closed_form_residuals(x, l2, 0.1, result.x, vectors)
    assert (result.info["residual_scope"], result.info["residual_examples"]) == ("full", 100)
    assert result.info["relative_residuals"] == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert result.info["relative_residual"] == pytest.approx(max(truth), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "solver", [Exact(), CG(), Arnoldi(rank=10), LiSSA(target_residual=1e-3)], ids=["exact", "cg", "arnoldi", "lissa"]
)
def test_a_converged_solve_on_a_large_set_reports_a_small_full_residual(ridge, solver):
    """The set outgrows the sample (100 > 30); the solvers' own work covers a full pass, so H itself is checked."""
    adapter, train, _, x, l2 = ridge
    hessian = Hessian(adapter, train, sample_size=30)
    vectors = torch.randn(1, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = solver.fit(hessian).solve(vectors)
    full = _closed_form_residuals(x, l2, 0.0, result.x, vectors)[0]
    assert (result.info["residual_scope"], result.info["residual_examples"]) == ("full", 100)
    assert result.info["relative_residual"] == pytest.approx(full, rel=1e-9, abs=1e-14)
    assert result.info["relative_residual"] < (1e-3 if isinstance(solver, LiSSA) else 1e-7)
    sampled = x[torch.tensor(hessian.sample)]
    assert _closed_form_residuals(sampled, l2, 0.0, result.x, vectors)[0] > 0.05  # what the sample would have said


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")
def test_a_solve_cheaper_than_a_full_pass_measures_on_the_labelled_fixed_seeded_sample(ridge):
    """FastIF's literal LiSSA touches 20 examples of 100, so a full check would cost 5x the solve: the sample's."""
    adapter, train, _, x, l2 = ridge
    hessian = Hessian(adapter, train, sample_size=30, sample_seed=7)
    assert hessian.sample == Hessian(adapter, train, sample_size=30, sample_seed=7).sample
    assert len(set(hessian.sample)) == 30
    vectors = torch.randn(1, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solver = LiSSA(depth=20, batch_size=1, repeats=1, scale=20.0)
    result = solver.fit(hessian).solve(vectors)
    sampled = x[torch.tensor(hessian.sample)]
    assert (result.info["residual_scope"], result.info["residual_examples"]) == ("sample", 30)
    assert result.info["relative_residual"] == pytest.approx(
        _closed_form_residuals(sampled, l2, 0.0, result.x, vectors)[0], rel=1e-9
    )
    assert result.info["relative_residual"] != pytest.approx(_closed_form_residuals(x, l2, 0.0, result.x, vectors)[0])


def test_small_sets_measure_on_every_example(ridge):
    adapter, train, *_ = ridge
    assert Hessian(adapter, train, sample_size=100).sample == list(range(100))
    assert Hessian(adapter, train).sample_examples == 100


def test_the_cli_line_names_the_matrix_the_residual_was_measured_on():
    sample = {"method": "lissa", "repeats": 2, "workers": 1, "scale": 3.0, "converged": True}
    sample |= {"relative_residual": 0.044, "residual_scope": "sample", "residual_examples": 1024}
    assert "relative residual 0.044 on a 1,024-example sample of H (not the full H solved)" in _describe_s_test(sample)
    full = {"method": "cg", "relative_residual": 3e-9, "residual_scope": "full", "residual_examples": 8000}
    assert _describe_s_test(full) == "s_test: cg; relative residual 3e-09 on the full H (8,000 examples)"


def test_automatic_lissa_is_settled_by_the_full_h_only_never_by_the_sample():
    """5,000 examples, a 30-example sample: the first attempts touch fewer examples than the set holds, so they are
    checked on the sample; though one of them meets the target there, only the full-H check may stop the solve."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 10, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(10, generator=generator, dtype=torch.float64)
    model = torch.nn.Linear(10, 1, bias=False).double()
    adapter = TorchAdapter(model, squared_error, AdapterConfig(l2=1e-2))
    hessian = Hessian(adapter, TensorData((x, y)), batch_size=5000, sample_size=30)
    vectors = torch.randn(1, 10, dtype=torch.float64, generator=generator)
    result = LiSSA(batch_size=1, target_residual=0.5).fit(hessian).solve(vectors)
    attempts = result.info["attempts"]
    *sampled, last = attempts
    assert {attempt["residual_scope"] for attempt in sampled} == {"sample"} and last["residual_scope"] == "full"
    assert min(attempt["relative_residual"] for attempt in sampled) <= 0.5  # the sample alone would have stopped it
    assert result.info["converged"] and (result.info["residual_scope"], result.info["residual_examples"]) == (
        "full",
        5000,
    )
    assert result.info["relative_residual"] == pytest.approx(_closed_form_residuals(x, 1e-2, 0.0, result.x, vectors)[0])
