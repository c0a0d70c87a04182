"""The public API as README shows it, the tabular example, and the CLI's error contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastif
from fastif.cli import run
from fastif.errors import DataError, ModelError, SolverError
from fastif.recipes.tabular import TabularConfig, run_tabular

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (4, 200)
    top = namespace["top"]
    assert top.helpful_indices.shape == (4, 5)
    assert bool((top.helpful_scores[:, :-1] >= top.helpful_scores[:, 1:]).all())
    assert bool((top.harmful_scores[:, :-1] <= top.harmful_scores[:, 1:]).all())
    torch.testing.assert_close(top.helpful_scores[:, 0], namespace["scores"].max(dim=1).values)


def test_readme_candidate_scores_example_runs(tmp_path, monkeypatch):
    """The second API snippet (FastIF kNN, the gradient store and its recall) runs after the first one."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text().split("## Python API", 1)[1], re.S)
    namespace: dict = {}
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    for code in blocks[:2]:
        exec(compile(code, "README.md", "exec"), namespace)
    exact, found = namespace["exact"], namespace["found"]
    assert exact.indices.shape == (4, 200) and namespace["fastif_knn"].indices.shape == (4, 100)
    assert torch.equal(exact.top_k(5).helpful_indices, namespace["top"].helpful_indices)
    assert torch.equal(found.top_k(5).helpful_indices, namespace["top"].helpful_indices)  # the store keeps all dims
    assert 0.95 <= found.recall[0]["helpful"].estimate <= 1.0
    quick = namespace["quick"]  # the fast solver's queries, through the same facade method
    assert quick.indices.shape == (4, 100) and quick.solve.info["eigenpairs_found"] == 20


def test_readme_test_command_is_what_ci_runs():
    command = re.search(r"test command, verbatim:\n\n```bash\n(.*?)\n```", README.read_text(), re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command


def test_tabular_example_explains_with_sorted_helpful_and_harmful_points():
    report = run_tabular(TabularConfig(explain=2, k=3))
    assert report["num_params"] == 62 and len(report["explained"]) == 2
    for item in report["explained"]:
        helpful = [row["score"] for row in item["helpful"]]
        harmful = [row["score"] for row in item["harmful"]]
        assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful)
        assert helpful[0] > 0 > harmful[0]


def test_cli_user_errors_exit_2_with_one_line(capsys):
    assert run(["example", "--dataset", "nope"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastif: error:") and "\n" not in error and "Traceback" not in error


def test_cli_bad_argument_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "fastif.cli", "example", "-k", "x"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "-k/--top-k" in result.stderr


def _mlp():
    return fastif.TorchAdapter(nn.Sequential(nn.Linear(3, 2)), nn.CrossEntropyLoss(reduction="none"))


def test_a_loss_that_is_not_per_example_is_refused():
    adapter = fastif.TorchAdapter(nn.Linear(3, 2), nn.CrossEntropyLoss())
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(ModelError, match="one value per example"):
        fastif.Influence(adapter, data).scores(data)


def test_a_parameter_selection_that_matches_nothing_is_refused():
    with pytest.raises(ModelError, match="matches no parameter"):
        fastif.TorchAdapter(
            nn.Linear(3, 2), nn.CrossEntropyLoss(reduction="none"), fastif.AdapterConfig(include=("encoder",))
        )


def test_the_exact_solver_refuses_too_many_parameters():
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(SolverError, match="use CG, LiSSA or Arnoldi"):
        fastif.Influence(_mlp(), data, fastif.Exact(max_params=4)).fit()


def test_empty_sets_and_bad_k_are_refused():
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(DataError, match="empty"):
        fastif.Influence(_mlp(), (torch.randn(0, 3), torch.randint(0, 2, (0,))))
    influence = fastif.Influence(_mlp(), data, fastif.Exact(damping=1.0))
    with pytest.raises(DataError, match="empty"):
        influence.scores((torch.randn(0, 3), torch.randint(0, 2, (0,))))
    for k in (0, 6):
        with pytest.raises(DataError, match=r"k must lie in \[1, 5\]"):
            influence.top_k(data, k=k)


def test_nan_inputs_are_refused():
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fastif.Influence(_mlp(), (x, torch.randint(0, 2, (5,))), fastif.Exact(damping=1.0)).fit()


def test_lissa_divergence_is_caught_with_a_fix():
    torch.manual_seed(0)
    data = (torch.randn(30, 3) * 10, torch.randint(0, 2, (30,)))
    influence = fastif.Influence(_mlp(), data, fastif.LiSSA(scale=1e-3, depth=200))
    with pytest.raises(SolverError, match="Increase scale"):
        influence.s_test(data)


def test_every_application_is_a_subcommand_of_the_main_cli():
    from fastif.cli import build_parser

    parser = build_parser()
    for argv in (
        ["experiment", "correct", "--quick"],
        ["experiment", "simulatability", "--quick"],
        ["experiment", "influence-graph", "--quick"],
        ["report", "some-run"],
    ):
        assert callable(parser.parse_args(argv).handler)
