"""The end-to-end pipeline on a tiny random BERT with the real MiniLM tokenizer: kNN + LiSSA, index reuse and
refusal, group and text queries, parameter selection, the parallel runner, and config files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert

from fastif.errors import ConfigError, DataError, OutputError, SolverError, StoreError
from fastif.files import cache_dir
from fastif.pipeline import (
    ParameterConfig,
    Pipeline,
    PipelineConfig,
    SolverStageConfig,
    load_pipeline_config,
    run_pipeline,
    selected_parameters,
    with_overrides,
    write_results,
)
from fastif.pipeline.output import describe_test
from fastif.recipes.nli import NLI3_LABELS, load_embedded, load_minilm_tokenizer


def write_jsonl(path: Path, records) -> Path:
    """Records as JSONL rows with premise/hypothesis/label/id columns."""
    rows = [{"id": r.id, "premise": r.text, "hypothesis": r.text_pair, "label": r.label_name} for r in records]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny random 3-class BERT with NLI labels and MiniLM's tokenizer, saved as a HF checkpoint folder."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = load_minilm_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label=dict(enumerate(NLI3_LABELS)),
        label2id={name: i for i, name in enumerate(NLI3_LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and JSONL train (40 pairs) / test (12 pairs) files."""
    root = tmp_path_factory.mktemp("tiny")
    records = load_embedded("mnli_train")
    return {
        "model": make_checkpoint(root / "model"),
        "train": write_jsonl(root / "train.jsonl", records[:40]),
        "test": write_jsonl(root / "test.jsonl", records[40:52]),
    }


def tiny_config(tiny, folder: Path, **overrides) -> PipelineConfig:
    """A fast pipeline config on the tiny checkpoint: 10 kNN candidates, top-3, LiSSA 20 steps, one worker."""
    settings = {
        "model.model": str(tiny["model"]),
        "data.train": str(tiny["train"]),
        "data.test": str(tiny["test"]),
        "data.max_length": 48,
        "candidates.count": 10,
        "candidates.method": "features",
        "candidates.batch_size": 16,
        "scoring.top_k": 3,
        "scoring.correct": 1,
        "scoring.wrong": 1,
        "solver.depth": 20,
        "solver.damping": 0.1,
        "solver.workers": 1,
        "output.folder": str(folder),
        "output.progress": False,
        **overrides,
    }
    return with_overrides(PipelineConfig(), settings)


def test_auto_scores_every_point_on_a_first_token_head_and_says_so(tiny, tmp_path):
    """With only the pooler and classifier selected the frozen head reads one cached [CLS] vector per example, so
    ``candidates.method = auto`` scores all 40 training points; the report says so, and the scores equal the
    unfrozen full scan's."""
    settings = {"candidates.method": "auto", "scoring.test_indices": [0], "solver.method": "cg", "solver.damping": 5.0}
    report = Pipeline(tiny_config(tiny, tmp_path / "auto", **settings)).explain()
    assert report["s_test"]["candidates"] == "all" and report["explained"][0]["candidates"] == 40
    assert (report["s_test"]["residual_scope"], report["s_test"]["residual_examples"]) == ("full", 40)
    assert report["frozen"] == {"layers": "bert.encoder.layer", "first_layer": 2, "first_token_only": True}
    off = {**settings, "candidates.method": "all", "parameters.frozen": "off"}
    on_path, off_path = (Pipeline(tiny_config(tiny, tmp_path / name, **c)) for name, c in (("a", settings), ("b", off)))
    test = on_path.test_set.subset([0])
    frozen_scores, full_scores = on_path.candidate_scores(test)[0], off_path.candidate_scores(test)[0]
    assert off_path.influence.split is None and torch.equal(frozen_scores.indices, full_scores.indices)
    torch.testing.assert_close(frozen_scores.scores, full_scores.scores, rtol=1e-4, atol=1e-7)


def test_end_to_end_knn_lissa_writes_json_csv_and_config(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path / "out", **{"scoring.test_indices": [0, 5]})
    report, paths = run_pipeline(config)
    assert [path.name for path in paths] == ["influence.json", "influence.csv", "pipeline_config.json"]
    assert len(report["explained"]) == 2 and report["train"]["size"] == 40
    pipeline = Pipeline(config)
    test = pipeline.test_set.subset([0, 5])
    neighbours = pipeline.index.search(pipeline.features(test), 10)[1]
    for item, near in zip(report["explained"], neighbours, strict=True):
        helpful = [row["score"] for row in item["helpful"]]
        harmful = [row["score"] for row in item["harmful"]]
        assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful)
        assert {row["train_index"] for row in item["helpful"] + item["harmful"]} <= set(near.tolist())
        assert item["helpful"][0]["premise"] and item["test"]["label"] in NLI3_LABELS
    diagnostics = report["s_test"]
    assert diagnostics["method"] == "lissa" and diagnostics["repeats"] == 1
    assert len(diagnostics["norm_trace"]) == 1 and len(diagnostics["norm_trace"][0]) == 20
    assert diagnostics["scale"] > 0 and diagnostics["top_eigenvalue"] > 0
    saved = json.loads(paths[0].read_text())
    assert saved["explained"] == report["explained"]
    with open(paths[1], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3 and {row["kind"] for row in rows} == {"helpful", "harmful"}
    assert load_pipeline_config(paths[2]) == config
    with pytest.raises(OutputError, match=r"holds a finished run .*--overwrite"):
        write_results(report, config, config.output.folder)  # run_pipeline again must not replace it silently
    assert write_results(report, with_overrides(config, {"output.overwrite": True}), config.output.folder) == paths


def test_the_index_is_built_once_then_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))  # a cache no other test filled
    config = tiny_config(tiny, tmp_path)
    first = Pipeline(config)
    first.index  # noqa: B018
    assert not first.index_info["features_loaded"] and not first.index_info["index_loaded"]
    assert first.index_folder.parent == cache_dir("indexes")  # keyed by model, data and settings
    index_file = first.index_folder / "faiss" / "index.faiss"
    stamp = index_file.stat().st_mtime_ns
    second = Pipeline(config)
    second.features = None  # reusing the index must not compute training features again
    assert second.index.n == 40 and second.index_info["features_loaded"] and second.index_info["index_loaded"]
    assert index_file.stat().st_mtime_ns == stamp
    assert second.index_folder == first.index_folder and (index_file.parent / "knn_config.json").is_file()


def test_other_data_or_model_get_their_own_cached_index(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))  # not the session's, where other tests left indexes
    first = Pipeline(tiny_config(tiny, tmp_path))
    smaller = Pipeline(tiny_config(tiny, tmp_path, **{"data.train_size": 30}))
    assert smaller.index.n == 30 and not smaller.index_info["index_loaded"]
    assert first.index_folder != smaller.index_folder and first.index_folder.parent == smaller.index_folder.parent


def test_an_index_dir_for_other_data_or_model_is_refused_then_rebuilt_with_overwrite(tiny, tmp_path):
    given = {"output.index_folder": str(tmp_path / "index")}
    Pipeline(tiny_config(tiny, tmp_path, **given)).index  # noqa: B018
    smaller = tiny_config(tiny, tmp_path, **given, **{"data.train_size": 30})
    with pytest.raises(StoreError, match=r"different dataset.*--overwrite"):
        Pipeline(smaller).index  # noqa: B018
    other = str(make_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(StoreError, match="different model"):
        Pipeline(tiny_config(tiny, tmp_path, **given, **{"model.model": other})).index  # noqa: B018
    rebuilt = Pipeline(with_overrides(smaller, {"output.overwrite": True}))
    assert rebuilt.index.n == 30 and not rebuilt.index_info["features_loaded"]


def test_group_query_uses_the_mean_feature_and_one_s_test(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, **{"scoring.test_indices": [1, 2, 3], "scoring.group": True})
    pipeline = Pipeline(config)
    report = pipeline.explain()
    (item,) = report["explained"]
    assert [test["index"] for test in item["group"]] == [1, 2, 3]
    near = pipeline.index.search_mean(pipeline.features(pipeline.test_set.subset([1, 2, 3])), 10)
    assert {row["train_index"] for row in item["helpful"]} <= set(near.tolist())


def test_text_query_without_label_is_explained_against_the_prediction(tiny, tmp_path):
    settings = {"scoring.text": "A man is playing a guitar.", "scoring.text_pair": "Someone plays music."}
    report = Pipeline(tiny_config(tiny, tmp_path, **settings)).explain()
    test = report["explained"][0]["test"]
    assert test["label"] == test["predicted"] and test["correct"] and test["source"].startswith("text")
    line = describe_test(test)
    assert f"gold {test['label']}" not in line and line.endswith("no gold label given: label = the model's prediction")
    with pytest.raises(DataError, match="label 'maybe'"):
        Pipeline(tiny_config(tiny, tmp_path, **settings, **{"scoring.label": "maybe"})).test_points()


def test_scoring_every_training_point_without_candidates(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, **{"candidates.count": None, "scoring.test_indices": [0]})
    report = Pipeline(config).explain()
    assert report["explained"][0]["candidates"] == 40 and report["index"] == {}


def test_parallel_lissa_chains_match_the_serial_ones(tiny, tmp_path):
    settings = {"scoring.test_indices": [0], "solver.repeats": 2}
    serial = Pipeline(tiny_config(tiny, tmp_path / "a", **settings)).explain()
    parallel = Pipeline(tiny_config(tiny, tmp_path / "b", **settings, **{"solver.workers": 2})).explain()
    assert parallel["s_test"]["workers"] == 2
    assert any("not settled" in text for text in parallel["s_test"]["warnings"])  # 20 steps: kept, not printed
    for kind in ("helpful", "harmful"):
        one, two = serial["explained"][0][kind], parallel["explained"][0][kind]
        assert [row["train_index"] for row in one] == [row["train_index"] for row in two]
        scores = [torch.tensor([row["score"] for row in rows]) for rows in (one, two)]
        torch.testing.assert_close(*scores, rtol=1e-4, atol=1e-6)


def test_a_preconditioned_lissa_runs_through_the_pipeline_and_is_recorded(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, **{"scoring.test_indices": [0], "solver.preconditioner": "ekfac"})
    report, _ = run_pipeline(config)
    assert report["s_test"]["preconditioner"] == "ekfac"
    saved = json.loads((tmp_path / "pipeline_config.json").read_text(encoding="utf-8"))
    assert saved["solver"]["preconditioner"] == "ekfac"


@pytest.mark.parametrize(
    ("method", "preconditioner", "match"),
    [
        ("cg", "ekfac", "applies to lissa and pcg only, not 'cg'"),
        ("pcg", "none", r"must be one of \['ekfac', 'kfac'\]"),
    ],
)
def test_a_preconditioner_the_solver_cannot_take_is_refused(method, preconditioner, match):
    with pytest.raises(ConfigError, match=match):
        SolverStageConfig(method=method, preconditioner=preconditioner)


def test_default_parameters_are_the_top_layers_pooler_and_classifier():
    model = tiny_bert()
    assert selected_parameters(model, ParameterConfig(top_layers=1)) == (
        "bert.encoder.layer.1",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    )
    assert selected_parameters(model, ParameterConfig(top_layers=0))[0] == "bert.pooler.dense.weight"
    assert selected_parameters(model, ParameterConfig(include=("classifier",))) == ("classifier",)
    with pytest.raises(ConfigError, match="exceeds the model's 2 layers"):
        selected_parameters(model, ParameterConfig(top_layers=3))


def test_config_files_toml_and_yaml(tmp_path):
    toml = tmp_path / "fastif.toml"
    toml.write_text('seed = 3\n[solver]\ndepth = 50\n[candidates]\ncount = 30\n[candidates.faiss]\nindex = "hnsw"\n')
    yaml = tmp_path / "fastif.yaml"
    yaml.write_text("data:\n  train: my.jsonl\n  label_names: [pos, neg]\nmodel:\n  recipe:\n    num_labels: 2\n")
    from_toml, from_yaml = load_pipeline_config(toml), load_pipeline_config(yaml)
    assert (from_toml.seed, from_toml.solver.depth, from_toml.candidates.count) == (3, 50, 30)
    assert from_toml.candidates.faiss.index == "hnsw" and from_toml.solver.damping == PipelineConfig().solver.damping
    assert from_yaml.data.train == "my.jsonl" and from_yaml.data.label_names == ("pos", "neg")
    assert from_yaml.model.recipe.num_labels == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[solver]\ndept = 5\n", r"fastif.toml: \[solver\] unknown option 'dept'"),
        ("colour = 1\n", "unknown option 'colour'"),
        ("[candidates.faiss]\nmetrix = 'l2'\n", r"\[candidates.faiss\] unknown option 'metrix'"),
        ("[solver]\ndepth = 'deep'\n", "depth"),
        ("[solver]\ndepth = -1\n", "solver.depth must be a positive integer"),
        ("[solver\n", "malformed"),
    ],
)
def test_bad_config_files_are_refused_naming_the_key(tmp_path, text, match):
    path = tmp_path / "fastif.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_pipeline_config(path)


def test_yaml_unknown_key_and_unknown_format_are_refused(tmp_path):
    yaml = tmp_path / "fastif.yml"
    yaml.write_text("scoring:\n  topk: 3\n")
    with pytest.raises(ConfigError, match=r"\[scoring\] unknown option 'topk'"):
        load_pipeline_config(yaml)
    with pytest.raises(ConfigError, match="unknown format"):
        load_pipeline_config(tmp_path / "fastif.ini")


def test_another_feature_layer_and_a_diverging_lissa(tiny, tmp_path):
    given = {"output.index_folder": str(tmp_path / "index")}
    layer = tiny_config(tiny, tmp_path, **given, **{"candidates.feature_module": "bert.encoder.layer.1"})
    pipeline = Pipeline(layer)
    assert pipeline.index.d == 16 and pipeline.index_info["feature_module"] == "bert.encoder.layer.1"
    default = Pipeline(tiny_config(tiny, tmp_path / "default"))
    assert not torch.equal(pipeline.features(pipeline.train), default.features(default.train))
    with pytest.raises(StoreError, match="different config"):
        Pipeline(tiny_config(tiny, tmp_path, **given)).index  # noqa: B018
    diverging = tiny_config(
        tiny, tmp_path / "diverging", **{"solver.scale": 1e-4, "scoring.test_indices": [0], "candidates.count": None}
    )
    with pytest.raises(SolverError, match=r"LiSSA diverged.*Increase scale"):
        Pipeline(diverging).explain()
