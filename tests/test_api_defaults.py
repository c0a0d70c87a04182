"""Python API defaults that explain themselves (issue 17, item 6): CG and Exact on an indefinite Hessian say which
damping would do, Exact refuses cheaply, self-influence with an iterative solver warns, an unsettled pipeline
solve warns, and the pipeline and CLI solve with the API's LiSSA defaults."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from test_pipeline import tiny, tiny_config  # noqa: F401 (tiny is a fixture)
from torch import nn

import fastif
from fastif.errors import SolverError
from fastif.hvp import Hessian
from fastif.pipeline import Pipeline, PipelineConfig, solver_config
from fastif.pipeline.config import SolverStageConfig
from fastif.solvers import LiSSAConfig


def _mlp(inputs: int, hidden: int, n: int, seed: int) -> tuple[fastif.TorchAdapter, tuple[torch.Tensor, torch.Tensor]]:
    """A random tanh MLP (non-convex loss: its Hessian has negative eigenvalues) and n random points, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 2)).double()
    data = torch.randn(n, inputs, dtype=torch.float64), torch.randint(0, 2, (n,))
    return fastif.TorchAdapter(model, nn.CrossEntropyLoss(reduction="none")), data


def _smallest_eigenvalue(influence: fastif.Influence) -> float:
    return float(torch.linalg.eigvalsh(influence.hessian.dense()).min())


def _suggested_damping(message: str) -> float:
    return float(re.search(r"set damping above ([0-9.e+-]+)", message).group(1))


def test_cg_on_a_non_convex_mlp_names_a_damping_that_works():
    adapter, data = _mlp(3, 8, 20, seed=1)
    influence = fastif.Influence(adapter, data, fastif.CG())  # the default: no damping
    with pytest.raises(SolverError, match=r"CG met non-positive curvature at iteration \d+: .* = -") as error:
        influence.s_test(data)
    suggested, needed = _suggested_damping(str(error.value)), -_smallest_eigenvalue(influence)
    assert needed > 0 and 0.9 * needed <= suggested <= needed * 1.005  # a lower bound (to 3 digits), tight here
    damped = fastif.Influence(adapter, data, fastif.CG(damping=1.5 * suggested))
    assert bool(torch.isfinite(damped.s_test(data)).all()) and damped.solver.config.damping > needed


def test_exact_refuses_an_indefinite_hessian_after_a_few_lanczos_steps(monkeypatch):
    adapter, data = _mlp(20, 16, 30, seed=0)  # P = 370: the dense Hessian takes two passes of 256 products
    needed = -_smallest_eigenvalue(fastif.Influence(adapter, data, fastif.Exact()))

    def no_dense(*_args, **_kwargs):
        raise AssertionError("the dense Hessian was formed")

    with monkeypatch.context() as patch:
        patch.setattr(Hessian, "dense", no_dense)
        with pytest.raises(
            SolverError, match=r"30 Lanczos steps found an eigenvalue of H at most -.* 370 x 370"
        ) as error:
            fastif.Influence(adapter, data, fastif.Exact()).fit()
    assert 0.9 * needed <= _suggested_damping(str(error.value)) <= needed * 1.005
    damped = fastif.Influence(adapter, data, fastif.Exact(damping=needed + 0.1))  # positive definite: no refusal
    vectors = damped.test_grads(data)[:2]
    matrix = damped.hessian.dense() + (needed + 0.1) * torch.eye(370, dtype=torch.float64)
    torch.testing.assert_close(damped.fit().solver.solve(vectors).x, torch.linalg.solve(matrix, vectors.T).T)


def test_exact_refuses_too_many_parameters_up_front_stating_the_cost():
    adapter, data = _mlp(20, 16, 30, seed=0)
    with pytest.raises(SolverError) as error:
        fastif.Influence(adapter, data, fastif.Exact(damping=1.0, max_params=100)).fit()
    message = str(error.value)
    assert "dense 370 x 370 Hessian (~0.0011 GB, built from 370 Hessian-vector products over the 30" in message
    assert "max_params is 100; use CG, LiSSA or Arnoldi" in message


def test_self_influence_with_cg_batches_its_solves_equal_to_one_by_one_and_warns():
    torch.manual_seed(0)
    adapter = fastif.TorchAdapter(nn.Linear(4, 3).double(), nn.CrossEntropyLoss(reduction="none"))
    data = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    influence = fastif.Influence(adapter, data, fastif.CG(damping=0.1, tolerance=1e-12))
    with pytest.warns(
        RuntimeWarning, match=r"self_influence with CG runs one iterative solve .* 12 chunks of 1 .* Arnoldi"
    ):
        one_by_one = influence.self_influence(chunk=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one chunk: no warning
        batched = influence.self_influence(chunk=12)
        exact = fastif.Influence(adapter, data, fastif.Exact(damping=0.1)).self_influence(chunk=5)  # not iterative
    torch.testing.assert_close(batched, one_by_one, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batched, exact, rtol=1e-8, atol=1e-12)


def test_a_pipeline_solve_that_did_not_settle_warns(tiny, tmp_path):  # noqa: F811 (the fixture)
    settings = {"solver.method": "cg", "solver.damping": 5.0, "scoring.test_indices": [0], "candidates.count": None}
    unsettled = Pipeline(tiny_config(tiny, tmp_path / "a", **settings, **{"solver.max_iterations": 1}))
    with pytest.warns(RuntimeWarning, match=r"s_test \(cg\) did not settle, .*: CG stopped after 1 iterations"):
        report = unsettled.explain()
    assert report["s_test"]["converged"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a settled solve: no warning
        assert Pipeline(tiny_config(tiny, tmp_path / "b", **settings)).explain()["s_test"]["converged"] is True


def _cli_lissa(*argv: str) -> LiSSAConfig:
    """The LiSSAConfig ``fastif influence ARGV`` would solve with (through the pipeline's own mapping)."""
    from fastif.cli import build_parser
    from fastif.cli.options import _pipeline_config

    pipeline = Pipeline(_pipeline_config(build_parser().parse_args(["influence", *argv])))
    _, repeats = pipeline.parallelism()
    return solver_config(pipeline.config.solver, pipeline.config.seed, repeats)


def test_the_pipeline_and_cli_lissa_default_is_the_apis_automatic_mode():
    """One set of LiSSA defaults: ``Pipeline`` (and so ``fastif demo`` / ``influence``) solves with ``LiSSAConfig()``
    (automatic depth, batch, tail, chains and residual target), only the recipe's damping set."""
    stage = SolverStageConfig(damping=0.3)
    assert solver_config(stage, seed=0, repeats=None) == LiSSAConfig(damping=0.3)
    default = Pipeline(PipelineConfig())
    _, repeats = default.parallelism()
    solved = solver_config(default.config.solver, default.config.seed, repeats)
    assert solved == LiSSAConfig(damping=default.config.solver.damping) and solved.adaptive
    assert _cli_lissa() == solved
    assert (solved.depth, solved.batch_size, solved.tail_average, solved.repeats) == (None, None, None, None)
    assert solved.target_residual == LiSSAConfig().target_residual  # the chain count: test_cli's automatic run


def test_the_cli_flags_give_fastifs_fixed_mode_and_the_automatic_mode_its_options():
    fixed = _cli_lissa("--depth", "500", "--lissa-batch", "1", "--tail-average", "0.5", "--workers", "2")
    assert not fixed.adaptive and (fixed.depth, fixed.batch_size, fixed.tail_average, fixed.repeats) == (500, 1, 0.5, 2)
    tuned = _cli_lissa("--target-residual", "0.05", "--max-steps", "900", "--repeats", "3")
    assert tuned == LiSSAConfig(damping=tuned.damping, target_residual=0.05, max_steps=900, repeats=3)


@pytest.mark.parametrize("seed", [1, 2])
def test_automatic_lissa_stops_early_on_an_indefinite_hessian_and_names_a_damping_that_works(seed):
    adapter, data = _mlp(3, 8, 40, seed=seed)
    needed = -_smallest_eigenvalue(fastif.Influence(adapter, data, fastif.Exact(damping=100.0)))
    just_below = fastif.Influence(adapter, data, fastif.LiSSA(damping=0.99 * needed))  # slow divergence: no blow-up
    with pytest.raises(SolverError, match=r"LiSSA stalled: .* over attempt (\d+) .* not positive definite") as error:
        just_below.s_test(data)
    attempt = int(re.search(r"over attempt (\d+)", str(error.value)).group(1))
    assert attempt <= 4  # stopped after a few hundred steps, not at the 20,000-step budget
    suggested = _suggested_damping(str(error.value))
    assert 0.9 * needed <= suggested <= needed * 1.005
    above = fastif.Influence(adapter, data, fastif.LiSSA(damping=1.5 * suggested))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settles: no budget warning, no stall refusal
        assert bool(torch.isfinite(above.s_test(data)).all())
