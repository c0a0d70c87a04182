"""The ``fastif`` command line: help for every subcommand, one-line errors with exit code 2, ``influence`` / ``demo``
/ ``index`` on a user's own tiny checkpoint and JSONL files, config files, and ``train`` / ``bench`` on MiniLM."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import make_checkpoint, write_jsonl
from test_report_run import _pipeline_report

from fastif.cli import run, run_command, stop_on_sigterm
from fastif.config import config_from_dict
from fastif.errors import OutputError
from fastif.files import cache_dir, check_writable
from fastif.pipeline import PipelineConfig, SolverStageConfig, solver_config
from fastif.recipes.nli import load_embedded

SUBCOMMANDS = ("demo", "train", "index", "influence", "bench", "example")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and JSONL train (30 pairs) / test (8 pairs) files."""
    root = tmp_path_factory.mktemp("cli")
    records = load_embedded("mnli_train")
    return {
        "model": make_checkpoint(root / "model"),
        "train": write_jsonl(root / "train.jsonl", records[:30]),
        "test": write_jsonl(root / "test.jsonl", records[30:38]),
    }


def tiny_args(tiny, output) -> list[str]:
    """Fast options on the tiny checkpoint (FastIF's kNN candidates, fixed-mode LiSSA with a tail average)."""
    return [
        *("--model", str(tiny["model"]), "--train", str(tiny["train"]), "--test", str(tiny["test"])),
        *(
            "--max-length",
            "48",
            "--candidates",
            "8",
            "--candidate-method",
            "features",
            "-k",
            "2",
            "--depth",
            "10",
            "--tail-average",
            "0.5",
            "--damping",
            "0.1",
        ),
        *("--workers", "1", "--output", str(output), "--no-progress"),
    ]


def one_line_error(capsys) -> str:
    """The captured stderr, checked to be one 'fastif: error:' line without a traceback."""
    error = capsys.readouterr().err.strip()
    assert error.startswith("fastif: error:") and "\n" not in error and "Traceback" not in error
    return error


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: fastif {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["influence", "--depth", "deep"], "--depth"),
        (["influence", "--solver", "newton"], "--solver"),
        (["demo", "--candidates", "many"], "--candidates"),
        (["index", "--colour", "red"], "--colour"),
        (["train", "--labels", "4"], "--labels"),
        (["bench", "--examples", "0"], "--examples"),
        (["nonsense"], "invalid choice"),
        (["experiment", "correct", "--seed", "-1"], "--seed"),
        (["experiment", "augment", "--lr", "nan"], "--lr"),
        (["experiment", "simulatability", "--n-test", "0"], "--n-test"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2 and needle in one_line_error(capsys)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["influence", "--candidates", "0"], "--candidates (candidates.count) must be a positive integer"),
        (["influence", "--depth", "0"], "solver.depth"),
        (["influence", "--device", "gpu7"], "unknown device"),
        (["influence", "--config", "missing.toml"], "cannot read config file"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
    assert run(argv) == 2 and needle in one_line_error(capsys)


def test_missing_data_and_hugging_face_datasets_offline_are_one_line_errors(tiny, tmp_path, capsys):
    base = ["index", "--model", str(tiny["model"]), "--output", str(tmp_path), "--no-progress"]
    assert run([*base, "--train", str(tmp_path / "nope.jsonl")]) == 2
    assert "neither a file nor a bundled set" in one_line_error(capsys)
    assert run([*base, "--train", "hf:nyu-mll/glue:mnli@train"]) == 2
    assert "hf:nyu-mll/glue:mnli@train" in one_line_error(capsys)


def test_errors_in_a_subprocess_print_no_traceback(tmp_path):
    command = [sys.executable, "-m", "fastif.cli", "influence", "--train-size", "-3", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "train_size" in result.stderr


def must_not_run(*args, **kwargs):
    """Stands in for a command's expensive step (training, indexing, a whole experiment)."""
    raise AssertionError("the expensive step ran although the output folder is unwritable")


# command line (BLOCKED: a folder under a regular file), the expensive step it must not reach, the option named
UNWRITABLE = [
    (["demo", "--output", "BLOCKED"], "fastif.pipeline.Pipeline", "--output"),
    (["influence", "--output", "BLOCKED"], "fastif.pipeline.Pipeline", "--output"),
    (["influence", "--output", "OK", "--index-dir", "BLOCKED"], "fastif.pipeline.Pipeline", "--index-dir"),
    (["index", "--output", "BLOCKED"], "fastif.pipeline.Pipeline", "--output"),
    (["train", "--output", "BLOCKED"], "fastif.recipes.nli.train_nli_classifier", "--output"),
    (["bench", "--output", "BLOCKED"], "fastif.pipeline.bench.run_bench", "--output"),
    (["example", "--output", "BLOCKED"], "fastif.recipes.tabular.run_tabular", "--output"),
    (["experiment", "correct", "--quick", "--output", "BLOCKED"], "fastif.recipes.nli.apps.run_nli_experiment",
     "--output"),
    (["experiment", "augment", "--quick", "--output", "OK", "--cache-dir", "BLOCKED"],
     "fastif.recipes.nli.apps.run_nli_experiment", "--cache-dir"),
    (["experiment", "simulatability", "--output", "BLOCKED"], "fastif.recipes.nli.apps.run_nli_simulatability",
     "--output"),
    (["experiment", "influence-graph", "--output", "BLOCKED"], "fastif.recipes.nli.apps.build_nli_run", "--output"),
    (["report", "RUN", "--output", "BLOCKED"], "fastif.report.from_run.write_report", "--output"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expensive", "option"), UNWRITABLE, ids=[" ".join(case[0][:2]) for case in UNWRITABLE]
)
def test_an_unwritable_output_folder_is_refused_before_any_work(argv, expensive, option, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a regular file, not a folder")
    blocked = tmp_path / "file" / "out"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "influence.json").write_text(json.dumps(_pipeline_report()))
    paths = {"BLOCKED": blocked, "OK": tmp_path / "ok", "RUN": tmp_path / "run"}
    monkeypatch.setattr(expensive, must_not_run)
    assert run([str(paths.get(arg, arg)) for arg in argv]) == 2
    error = one_line_error(capsys)
    assert f"cannot create the {option} folder {blocked}: {tmp_path / 'file'} is not a folder" in error
    assert not (tmp_path / "ok").exists()  # nothing was created on the way


# command line, the file that marks its run finished, the expensive step it must not reach
FINISHED = [
    (["demo"], "influence.json", "fastif.pipeline.Pipeline"),
    (["influence"], "influence.json", "fastif.pipeline.Pipeline"),
    (["experiment", "correct", "--quick"], "results.json", "fastif.recipes.nli.apps.run_nli_experiment"),
    (["experiment", "simulatability"], "simulatability.json", "fastif.recipes.nli.apps.run_nli_simulatability"),
    (["experiment", "influence-graph"], "influence_run.json", "fastif.recipes.nli.apps.build_nli_run"),
]


@pytest.mark.parametrize(("argv", "finished", "expensive"), FINISHED, ids=[" ".join(case[0][:2]) for case in FINISHED])
def test_a_finished_run_is_kept_unless_overwrite(argv, finished, expensive, tmp_path, monkeypatch, capsys):
    (tmp_path / finished).write_text("{}")
    monkeypatch.setattr(expensive, must_not_run)
    assert run([*argv, "--output", str(tmp_path)]) == 2
    error = one_line_error(capsys)
    assert f"{tmp_path} holds a finished run ({tmp_path / finished}); pass --overwrite" in error
    with pytest.raises(AssertionError, match="expensive step ran"):
        run([*argv, "--output", str(tmp_path), "--overwrite"])


def test_default_outputs_go_under_fastif_results_per_command():
    from fastif.cli import build_parser
    from fastif.cli.options import config_default
    from fastif.cli.pipeline import DEMO_DEFAULTS

    assert config_default("output.folder") == "fastif-results/influence"
    assert config_default("output.folder", DEMO_DEFAULTS) == "fastif-results/demo"
    parser = build_parser()
    for name in ("simulatability", "influence-graph"):
        assert parser.parse_args(["experiment", name]).output == Path("fastif-results", name)


def help_text(argv, capsys) -> str:
    """The help a command prints, with its line wrapping undone."""
    with pytest.raises(SystemExit) as stop:
        run([*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_each_options_default_from_the_config(capsys):
    influence = help_text(["influence"], capsys)
    for shown in ("LiSSA steps per chain (default: automatic, doubled from 100", "(default: 5) [scoring.top_k]",
                  "(default: fastif-results/influence) [output.folder]", "(default: mnli_test) [data.test]",
                  "-k TOP_K, --top-k TOP_K", "FastIF's fast s_test: --depth 500", "--tail-average 0.5)",
                  "(default: 0.01) [solver.target_residual]"):  # fmt: skip
        assert shown in influence
    assert "(default: )" not in influence and "(default: None)" not in influence
    assert "(default: fastif-results/demo) [output.folder]" in help_text(["demo"], capsys)
    assert "(default: 0.0001) [model.recipe.lr]" in help_text(["train"], capsys)


def test_example_and_report_help_list_choices_defaults_and_files(capsys):
    example = help_text(["example"], capsys)
    from fastif.solvers import SOLVERS

    assert "--solver {" + ",".join(sorted(SOLVERS)) + "}" in example and "-k K, --top-k K" in example
    assert "(default: cg)" in example and "(default: breast_cancer)" in example
    report = help_text(["report"], capsys)
    assert all(name in report for name in ("influence_run.json", "graph.json", "influence.json", "-k TOP, --top-k"))


def test_version_and_a_bare_fastif(capsys):
    with pytest.raises(SystemExit) as stop:
        run(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == "fastif 0.1.0"
    assert run([]) == 2
    printed = capsys.readouterr().out
    assert printed.count("usage: fastif") == 1 and "fastif fastif" not in printed and "influence" in printed


def test_a_nested_commands_error_names_its_own_help(capsys):
    with pytest.raises(SystemExit) as stop:
        run(["experiment", "correct", "--steps", "many"])
    assert stop.value.code == 2 and "(see 'fastif experiment correct --help')" in capsys.readouterr().err


def test_an_unwritable_model_cache_is_refused_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a regular file, not a folder")
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr("fastif.recipes.nli.model._train", must_not_run)
    assert run(["train", "--no-progress"]) == 2
    error = one_line_error(capsys)
    assert f"cannot create the model cache folder {tmp_path / 'file' / 'models'}" in error
    assert error.endswith("set FASTIF_CACHE to a writable folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so chmod cannot block a write")
def test_an_output_folder_under_a_read_only_parent_is_refused(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    monkeypatch.setattr("fastif.recipes.tabular.run_tabular", must_not_run)
    try:
        assert run(["example", "--output", str(parent / "out")]) == 2
    finally:
        parent.chmod(0o755)
    error = one_line_error(capsys)
    assert f"cannot write to the --output folder {parent / 'out'}: {parent} is not writable" in error
    assert error.endswith(f"choose another --output or make {parent} writable")


def test_the_writability_check_creates_nothing_and_refuses_a_file(tmp_path):
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # not even a probe file
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot create the --output folder .*file: .*file is not a folder"):
        check_writable(tmp_path / "file")


def test_sigterm_unwinds_like_ctrl_c_once_then_kills(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        assert run_command(lambda: signal.raise_signal(signal.SIGTERM)) == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM kills at once
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run_command(lambda: signal.raise_signal(signal.SIGINT)) == 130
    message = "fastif: interrupted by {}; finished work is kept, run the same command again to resume"
    assert capsys.readouterr().err.splitlines() == [message.format("SIGTERM"), message.format("SIGINT")]


def test_influence_on_a_users_checkpoint_and_jsonl_files(tiny, tmp_path, capsys):
    output = tmp_path / "out"
    assert run(["influence", *tiny_args(tiny, output), "--test-indices", "0,3"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((output / "influence.json").read_text())
    assert [item["test"]["index"] for item in report["explained"]] == [0, 3]
    assert report["explained"][0]["helpful"][0]["premise"].split()[0] in printed and "most harmful" in printed
    assert re.search(r"plan: frozen-bottom pass over 30 training points, about [\d.]+ s \(estimated", printed)
    assert re.search(r"plan: s_test for 2 test point\(s\) = LiSSA 1 chain\(s\) × 10 steps .* ≈ [\d.]+ s", printed)
    csv_lines = (output / "influence.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("query,test_index") and len(csv_lines) == 1 + 2 * 2 * 2
    saved = json.loads((output / "pipeline_config.json").read_text())
    assert saved["model"]["model"] == str(tiny["model"]) and saved["solver"]["depth"] == 10
    index_folder = Path(report["index"]["folder"])
    assert (index_folder / "faiss" / "index.faiss").is_file() and index_folder.parent == cache_dir("indexes")


def test_influence_on_text_and_the_demo_reuse_one_index(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "out"
    text = ["--premise", "A dog runs in the park.", "--hypothesis", "An animal is outside.", "--label", "entailment"]
    assert run(["influence", *tiny_args(tiny, output), *text]) == 0
    assert "built" in capsys.readouterr().out
    demo = ["demo", *tiny_args(tiny, output), "--correct", "1", "--wrong", "1"]
    assert run(demo) == 2 and "--overwrite" in one_line_error(capsys)  # the finished run is kept
    assert run([*demo, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("fastif demo:") and "reused" in printed and "times:" in printed
    elsewhere = tiny_args(tiny, tmp_path / "elsewhere")  # another command and output folder: the same one index
    assert run(["index", *elsewhere[: elsewhere.index("--candidates")], "--output", str(tmp_path / "other")]) == 0
    assert "reused" in capsys.readouterr().out
    assert [path.name for path in (tmp_path / "cache" / "indexes").iterdir()] == [
        Path(json.loads((output / "influence.json").read_text())["index"]["folder"]).name
    ]


def test_index_subcommand_and_a_mismatched_index(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))  # a cache no other test filled
    output = tmp_path / "out"
    assert run(["index", *tiny_args(tiny, output)[:6], "--max-length", "48", "--output", str(output)]) == 0
    assert "built" in capsys.readouterr().out
    assert run(["index", *tiny_args(tiny, output)[:6], "--max-length", "48", "--output", str(output)]) == 0
    assert "reused" in capsys.readouterr().out
    other = ["--model", str(tiny["model"]), "--train", str(tiny["train"]), "--train-size", "20", "--max-length", "48"]
    assert run(["index", *other, "--output", str(output)]) == 0  # other data: its own folder under the cache root
    assert "20 training points" in capsys.readouterr().out
    given = ["--output", str(output), "--index-dir", str(tmp_path / "index")]
    assert run(["index", *tiny_args(tiny, output)[:6], "--max-length", "48", *given]) == 0
    capsys.readouterr()
    assert run(["index", *other, *given]) == 2  # an --index-dir made for other data is refused ...
    assert "--overwrite" in one_line_error(capsys)
    assert run(["index", *other, *given, "--overwrite"]) == 0  # ... or rebuilt when asked
    assert "20 training points" in capsys.readouterr().out


def test_a_malformed_data_file_reports_its_line(tiny, tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    lines = tiny["train"].read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"premise": "cut off', *lines[2:]]) + "\n")
    argv = tiny_args(tiny, tmp_path / "out")
    argv[argv.index("--train") + 1] = str(bad)
    assert run(["influence", *argv]) == 2
    assert "line 3" in one_line_error(capsys)
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("premise,hypothesis,label\nA cat sat.,A cat is sitting.,entailment\nA dog.,No dog.,maybe\n")
    argv[argv.index("--train") + 1] = str(csv_file)
    assert run(["influence", *argv]) == 2
    assert "line 3" in one_line_error(capsys)


def test_config_file_sets_options_and_the_command_line_wins(tiny, tmp_path):
    config = tmp_path / "fastif.toml"
    config.write_text("[solver]\ndepth = 7\nrepeats = 1\n[scoring]\ntop_k = 1\ntest_indices = [2]\n")
    output = tmp_path / "out"
    assert run(["influence", *tiny_args(tiny, output), "--config", str(config)]) == 0
    saved = json.loads((output / "pipeline_config.json").read_text())
    assert saved["solver"]["depth"] == 10 and saved["solver"]["repeats"] == 1 and saved["scoring"]["top_k"] == 2
    report = json.loads((output / "influence.json").read_text())
    assert report["explained"][0]["test"]["index"] == 2 and len(report["explained"][0]["helpful"]) == 2


@pytest.mark.slow
def test_train_then_explain_with_the_trained_minilm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  recipe:\n    validation_size: 4\n    batch_size: 4\n")
    model = tmp_path / "model"
    argv = ["train", "--config", str(config), "--train-size", "8", "--output", str(model), "--no-progress"]
    assert run(argv) == 0
    assert "trained in" in capsys.readouterr().out and (model / "train_config.json").is_file()
    assert run([*argv[:-3], "--no-progress"]) == 0
    assert "cached" in capsys.readouterr().out
    output = tmp_path / "out"
    explain = ["--model", str(model), "--candidates", "4", "-k", "2", "--depth", "5", "--workers", "1"]
    assert run(["influence", *explain, "--test-indices", "0", "--output", str(output), "--no-progress"]) == 0
    report = json.loads((output / "influence.json").read_text())
    assert report["train"]["size"] == 8 and report["parameters"]["count"] == 148_995


@pytest.mark.slow
def test_bench_prints_stage_times(tmp_path, capsys):
    assert run(["bench", "--examples", "8", "--steps", "2", "--candidates", "4", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "LiSSA steps" in printed and "candidate scores" in printed
    stages = [stage["stage"] for stage in json.loads((tmp_path / "bench.json").read_text())["stages"]]
    assert stages[2:] == [  # the demo's path: the frozen head scores every training pair
        "training pass (frozen bottom)",
        "LiSSA scale (power iteration HVPs)",
        "first query (s_test + scores, with set-up)",
        "LiSSA steps (B=8)",  # automatic LiSSA's first batch: min(32, the 8 examples)
        "candidate scores (1 test point)",
    ]
    knn = ["--candidate-method", "features"]
    assert run(["bench", "--examples", "8", "--steps", "2", "--candidates", "4", "--output", str(tmp_path), *knn]) == 0
    stages = [stage["stage"] for stage in json.loads((tmp_path / "bench.json").read_text())["stages"]]
    assert "FAISS index build" in stages and "kNN search (k=4)" in stages


def test_readme_first_command_runs_the_demo_with_the_stated_defaults():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    assert first.endswith('pip install -e ".[nli]" && fastif demo')
    defaults = PipelineConfig()
    assert (defaults.candidates.method, defaults.parameters.top_layers, defaults.solver.depth) == ("auto", 0, None)
    assert defaults.scoring.top_k == 5 and defaults.parameters.frozen == "auto"
    assert "all 8,000 training pairs" in readme and "LiSSA in its automatic mode" in readme
    assert "pooler + classifier" in readme and "--depth 500 --lissa-batch 1 --tail-average 0.5" in readme


def test_the_demo_replaces_its_own_results_when_rerun(tiny, tmp_path, monkeypatch, capsys):
    """A second ``fastif demo`` in its default folder replaces the first demo's results (it reuses the index);
    only a folder the user named is protected by --overwrite."""
    monkeypatch.chdir(tmp_path)
    options = [arg for arg in tiny_args(tiny, tmp_path) if arg != str(tmp_path)]
    options.remove("--output")
    demo = ["demo", *options, "--correct", "1", "--wrong", "1"]
    assert run(demo) == 0 and run(demo) == 0
    assert "reused" in capsys.readouterr().out
    assert (tmp_path / "fastif-results" / "demo" / "influence.json").is_file()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes, to check a folder is left untouched."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished results folder (results, config and index) of the tiny checkpoint."""
    output = tmp_path_factory.mktemp("finished") / "results"
    assert run(["influence", *tiny_args(tiny, output), "--test-indices", "0"]) == 0
    return output


# issue 14: each bad value exits 2 with one line naming the option (its flag and its config key)
BAD_VALUES = [
    (["--seed", "-1"], "--seed (seed) must be an integer >= 0 and < 4294967296, got -1"),
    (["--l2", "inf"], "--l2 (parameters.l2) must be a finite number >= 0 (or unset), got inf"),
    (["-k", "-1"], "-k/--top-k (scoring.top_k) must be a positive integer, got -1"),
    (["--scale", "inf"], "--scale (solver.scale) must be a finite number > 0 (or unset), got inf"),
    (["--damping", "nan"], "--damping (solver.damping) must be a finite number >= 0 (or unset), got nan"),
    (["--train", "x" * 5000], "File name too long; check the path"),
    (["--max-length", "1000"], "--max-length (data.max_length) is 1000 but the model reads at most 64 tokens"),
    (["--premise", "a", "--hypothesis", "b", "--label", "y" * 30_000], "... (30002 characters) is not one of"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_VALUES, ids=[case[0][-2][:12] for case in BAD_VALUES])
def test_bad_option_values_name_the_option_in_one_short_line(extra, needle, tiny, tmp_path, capsys):
    assert run(["influence", *tiny_args(tiny, tmp_path / "out"), *extra]) == 2
    error = one_line_error(capsys)
    assert needle in error and len(error) < 600
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary file left


def test_example_refuses_a_negative_seed_and_top_level_help_is_not_doubled(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["example", "--seed", "-1"])
    assert exit_info.value.code == 2 and "(see 'fastif example --help')" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        run(["nonsense"])
    assert one_line_error(capsys).endswith("(see 'fastif --help')")


def test_a_utf16_config_file_is_refused_and_a_utf8_bom_is_read(tiny, tmp_path, capsys):
    config = tmp_path / "fastif.toml"
    config.write_text("[solver]\ndepth = 3\n", encoding="utf-16")
    assert run(["influence", *tiny_args(tiny, tmp_path / "out"), "--config", str(config)]) == 2
    assert f"config file {config} is not UTF-8 text" in one_line_error(capsys)
    config.write_text("[solver]\ndepth = -3\n", encoding="utf-8-sig")
    assert run(["influence", *tiny_args(tiny, tmp_path / "out"), "--config", str(config)]) == 2
    assert f"{config}: --depth (solver.depth) must be a positive integer (or unset), got -3" in one_line_error(capsys)


def damaged_checkpoint(tiny, folder: Path, damage: str) -> Path:
    """A copy of the tiny checkpoint with pickled weights, truncated weights or no tokenizer files."""
    shutil.copytree(tiny["model"], folder)
    weights = folder / "model.safetensors"
    if damage == "pickled":
        weights.rename(folder / "pytorch_model.bin")  # never unpickled: refused by its name and the missing safetensors
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    return folder


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("pickled", "pytorch_model.bin is a pickled PyTorch checkpoint, and fastif never unpickles"),
        ("truncated", "model.safetensors is damaged"),
        ("no-tokenizer", "no tokenizer in {folder}"),
    ],
)
def test_a_damaged_checkpoint_folder_is_refused_naming_the_file(damage, needle, tiny, tmp_path, capsys):
    folder = damaged_checkpoint(tiny, tmp_path / "model", damage)
    argv = tiny_args(tiny, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(folder)
    assert run(["influence", *argv]) == 2
    assert needle.format(folder=folder) in one_line_error(capsys)


def test_a_missing_model_folder_is_one_line_saying_fastif_works_offline(tiny, tmp_path, capsys):
    argv = tiny_args(tiny, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(tmp_path / "runs" / "my-bert")
    assert run(["influence", *argv]) == 2
    error = one_line_error(capsys)
    assert "is not a checkpoint folder (no such folder)" in error and "fastif works offline" in error


def test_a_bit_flipped_index_is_rebuilt_with_one_note_naming_it(tiny, finished, tmp_path, capsys):
    output = tmp_path / "results"
    shutil.copytree(finished, output)
    index_file = Path(json.loads((output / "influence.json").read_text())["index"]["folder"]) / "faiss" / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    index_file.write_bytes(bytes(data))
    assert run(["influence", *tiny_args(tiny, output), "--test-indices", "0", "--overwrite"]) == 0
    notes = capsys.readouterr().err.splitlines()
    assert [note for note in notes if "did not settle" not in note] == [
        f"fastif: note: {index_file} is corrupt (checksum mismatch); delete {index_file.parent} and rebuild; "
        "rebuilt the index"
    ]


def test_an_index_dir_at_a_results_folder_is_refused_leaving_it_untouched(tiny, finished, tmp_path, capsys):
    before = folder_bytes(finished)
    assert run(["influence", *tiny_args(tiny, tmp_path / "out"), "--index-dir", str(finished)]) == 2
    error = one_line_error(capsys)
    assert "is not a fastif index store" in error and error.endswith("choose another --index-dir")
    assert folder_bytes(finished) == before  # no .lock left behind


def test_a_store_that_refuses_a_foreign_folder_leaves_no_lock(tmp_path):
    from fastif.errors import StoreError
    from fastif.store import Store

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a fastif store"):
        Store.open(tmp_path, model_fingerprint="m", data_fingerprint="d", config={})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_data_files_excel_bom_csv_is_read_and_txt_gets_a_hint_the_cli_can_follow(tiny, tmp_path, capsys):
    rows = [json.loads(line) for line in tiny["train"].read_text().splitlines()]
    csv_file = tmp_path / "train.csv"
    with csv_file.open("w", encoding="utf-8-sig", newline="") as handle:  # Excel's "CSV UTF-8" starts with a BOM
        writer = csv.writer(handle)
        writer.writerows(
            [("premise", "hypothesis", "label"), *((r["premise"], r["hypothesis"], r["label"]) for r in rows)]
        )
    index = ["index", "--model", str(tiny["model"]), "--max-length", "48", "--no-progress"]
    assert run([*index, "--train", str(csv_file), "--output", str(tmp_path / "out")]) == 0
    text_file = tmp_path / "train.txt"
    shutil.copy(tiny["train"], text_file)
    assert run([*index, "--train", str(text_file), "--output", str(tmp_path / "out2")]) == 2
    error = one_line_error(capsys)
    assert "rename it to end in .jsonl, .csv or .tsv" in error and "format=" not in error


def test_report_errors_point_at_commands_that_exist(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(["report", str(tmp_path / "empty")]) == 2
    error = one_line_error(capsys)
    assert "'fastif influence'" in error and "fastif run" not in error


def test_progress_bars_show_each_long_stage_unless_hidden(tiny, tmp_path, capsys):
    argv = [arg for arg in tiny_args(tiny, tmp_path / "out") if arg != "--no-progress"]
    assert run(["influence", *argv, "--test-indices", "0", "--candidate-method", "all"]) == 0
    bars = capsys.readouterr().err
    assert all(name in bars for name in ("frozen-bottom pass", "s_test: LiSSA chain 0", "scores"))
    assert run(["influence", *argv, "--test-indices", "0", "--output", str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert "LiSSA chain" not in capsys.readouterr().err  # no bar (a "did not settle" note may stand)


def test_an_unsettled_s_test_is_one_note_on_stderr_not_repeated_on_stdout(tiny, tmp_path, capsys):
    argv = [*tiny_args(tiny, tmp_path / "out"), "--test-indices", "0", "--depth", "4", "--workers", "1"]
    assert run(["influence", *argv]) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "did not settle" in line]
    assert len(notes) == 1 and notes[0].startswith("fastif: note: s_test (lissa) did not settle")
    assert "not settled: raise --depth" in out and "note: LiSSA" not in out


def test_automatic_lissa_plans_its_first_attempt_and_reports_its_attempts(tiny, tmp_path, capsys):
    """Without --depth the CLI runs LiSSA's automatic mode: the plan estimates the first attempt, the s_test line
    says how many attempts and steps ran and whether the residual target was met."""
    argv = tiny_args(tiny, tmp_path / "out")
    depth = argv.index("--depth")
    argv = [*argv[:depth], *argv[depth + 2 :], "--test-indices", "0", "--max-steps", "600", "--damping", "1"]
    assert run(["influence", *argv]) == 0
    out = capsys.readouterr().out
    planned = r"automatic depth: a first attempt of 2 chain\(s\) × 100 steps ≈ [\d.]+ s \(one step at batch 30"
    assert re.search(planned, out)
    line = next(line for line in out.splitlines() if line.startswith("s_test: lissa"))
    assert re.search(r"2 chain\(s\) on 1 worker\(s\).*automatic depth: [12] attempt\(s\), [\d,]+ steps \(last", line)
    assert "residual target 0.01 " in line and "relative residual" in line
    report = json.loads((tmp_path / "out" / "influence.json").read_text())["s_test"]
    assert report["steps"] <= 600 and report["attempts"][0] == {**report["attempts"][0], "depth": 100, "batch_size": 30}


def test_a_huge_damping_reports_a_residual_that_is_not_finite_in_one_line(tiny, tmp_path, capsys):
    """Found by the fuzz test: a damping near float32's maximum makes the residual overflow; the run still ends."""
    argv = [*tiny_args(tiny, tmp_path / "out"), "--test-indices", "0", "--damping", "3.4028235677973366e+38"]
    assert run(["influence", *argv]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_more_candidates_than_training_points_is_one_line_after_the_plan(tiny, tmp_path, capsys):
    """Found by the extended fuzz test: the plan's timed sample must not index past the training set."""
    argv = [*tiny_args(tiny, tmp_path / "out"), "--test-indices", "0", "--candidates", "500"]
    assert run(["influence", *argv]) == 2
    assert "candidates.count=500 exceeds the 30 training points" in one_line_error(capsys)


def test_a_max_length_below_the_special_tokens_is_one_line(tiny, tmp_path, capsys):
    """Found by the extended fuzz test: the tokenizer cannot cut a pair to 2 tokens and silently returned it whole."""
    assert run(["influence", *tiny_args(tiny, tmp_path / "out"), "--max-length", "2"]) == 2
    assert "--max-length (data.max_length) is 2 but a pair needs at least 5 tokens" in one_line_error(capsys)


def test_arnoldi_rank_and_complement_reach_the_solver(tiny, tmp_path):
    output = tmp_path / "out"
    extra = ["--solver", "arnoldi", "--rank", "4", "--complement", "--damping", "0.5"]
    assert run(["influence", *tiny_args(tiny, output), *extra]) == 0
    saved = json.loads((output / "pipeline_config.json").read_text())
    assert (saved["solver"]["rank"], saved["solver"]["complement"]) == (4, True)
    solver = solver_config(config_from_dict(SolverStageConfig, saved["solver"]), 0, None)
    assert (type(solver).__name__, solver.rank, solver.complement) == ("ArnoldiConfig", 4, True)
