"""The fine-tuning experiments: configs, splits, the cached top layers, the loop's sign, and a CLI smoke run."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastif.applications.finetune.config import SplitConfig
from fastif.applications.finetune.run import (
    anchor_schedule,
    collate,
    encoder,
    evaluate,
    mean_loss,
    sgd_step,
    trainable_adapter,
)
from fastif.applications.finetune.summary import (
    CONFIG_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    TABLE_FILE,
    published_comparison,
    summarise,
)
from fastif.cli.applications import add_experiment_commands
from fastif.cli.applications import experiment_config_from_args as config_from_args
from fastif.config import config_to_dict, save_config
from fastif.data.text import TextPairData
from fastif.errors import ConfigError
from fastif.model.frozen import FrozenAdapter, find_split
from fastif.recipes.nli import load_embedded, load_minilm_tokenizer, nli_label_scheme
from fastif.recipes.nli.apps import NLI_TASK, ExperimentConfig, default_config, load_experiment_config, quick_config
from fastif.recipes.nli.splits import anli_split, hans_split


@pytest.fixture(scope="module")
def tokenizer():
    return load_minilm_tokenizer()


def tiny_nli_model(tokenizer, num_labels: int):
    """A 2-layer, 16-wide random BERT classifier over the MiniLM vocabulary (eager attention, eval mode)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def factory(tokenizer):
    """A model factory for the loop: the tiny BERT instead of the trained MiniLM."""
    return lambda num_labels: (tiny_nli_model(tokenizer, num_labels), tokenizer, {"name": "tiny-bert"})


def pairs(tokenizer, name: str, count: int, num_labels: int = 2) -> TextPairData:
    records = load_embedded(name, num_labels)[:count]
    return TextPairData(records, tokenizer, 128, nli_label_scheme(num_labels)[0])


# ---------------------------------------------------------------------------------------------- configs


def test_config_defaults_json_round_trip_and_validation(tmp_path):
    for experiment in ("correct", "augment"):
        for task in ("hans", "anli"):
            config = default_config(experiment, task)
            save_config(config, tmp_path / "config.json")
            assert load_experiment_config(tmp_path / "config.json") == config
    assert default_config("augment", "anli").groups == ("r1", "r2", "r3")
    assert quick_config("correct").seeds == (0,)
    data = config_to_dict(default_config("correct"))
    (tmp_path / "typo.json").write_text(json.dumps({**data, "stepz": 3}))
    with pytest.raises(ConfigError, match="stepz"):
        load_experiment_config(tmp_path / "typo.json")
    bad = [
        {"modes": ("helpful", "best")},
        {"groups": ("r1",)},
        {"seeds": (1, 1)},
        {"steps": 0},
        {"selected": 20, "candidates": 10},
        {"lr": 0.0},
    ]
    for change in bad:
        with pytest.raises(ConfigError):
            ExperimentConfig(**change)
    with pytest.raises(ConfigError, match="pool_fraction"):
        ExperimentConfig(experiment="augment", task="anli", groups=("r1",))
    with pytest.raises(ConfigError):
        SplitConfig(anchor_fraction=0.6, pool_fraction=0.5)


# ---------------------------------------------------------------------------------------------- splits


def test_hans_split_is_disjoint_stratified_and_fixed():
    config = SplitConfig(anchor_pool=60, eval_size=90)
    split = hans_split(config, ("lexical_overlap", "constituent"))
    assert split.sizes()["anchors"] == {"lexical_overlap": 60, "constituent": 60}
    for group in ("lexical_overlap", "constituent"):
        anchor_ids = {r.id for r in split.anchors[group]}
        test_ids = {r.id for r in split.test[group]}
        assert not anchor_ids & test_ids
        assert {r.extra["heuristic"] for r in split.anchors[group]} == {group}
        subcases = [r.extra["subcase"] for r in split.test[group]]
        assert len(set(subcases)) == 10 and all(subcases.count(s) == 9 for s in set(subcases))
    again = hans_split(config, ("lexical_overlap", "constituent"))
    assert [r.id for r in again.test["constituent"]] == [r.id for r in split.test["constituent"]]
    larger = hans_split(replace(config, eval_size=120), ("constituent",))
    assert {r.id for r in split.test["constituent"]} <= {r.id for r in larger.test["constituent"]}
    other = hans_split(replace(config, seed=1), ("constituent",))
    assert [r.id for r in other.test["constituent"]] != [r.id for r in split.test["constituent"]]


def test_anli_split_pool_anchors_test_are_disjoint():
    split = anli_split(SplitConfig(anchor_fraction=0.2, pool_fraction=0.5, anchor_pool=0, eval_size=0))
    pool = {r.id for r in split.pool}
    anchors = {r.id for group in split.anchors.values() for r in group}
    test = {r.id for group in split.test.values() for r in group}
    assert not (pool & anchors or pool & test or anchors & test)
    assert len(pool) + len(anchors) + len(test) == 1000 + 1000 + 1198
    assert abs(len(pool) / 3198 - 0.5) < 0.01 and abs(len(anchors) / 3198 - 0.2) < 0.01


def test_anchor_schedule_is_seeded_and_shared_across_modes():
    first = anchor_schedule(25, 10, 4, seed=3, group_index=1)
    assert first == anchor_schedule(25, 10, 4, seed=3, group_index=1)
    assert first != anchor_schedule(25, 10, 4, seed=4, group_index=1)
    assert all(len(step) == 10 and len(set(step)) == 10 for step in first)
    assert len({i for step in first[:2] for i in step}) == 20  # no repeats within one permutation


# ---------------------------------------------------------------------------------------------- cached top layers


def frozen_top(tokenizer, model, config, cache_dir=None):
    """The experiment's adapter, split and encoder for ``model`` (the core frozen path, as ``prepare`` builds it)."""
    full = trainable_adapter(model, config)
    split = find_split(full, "on")
    names = nli_label_scheme(model.config.num_labels)[0]
    return full, split, encoder(full, split, tokenizer, config, names, cache_dir)


def test_top_layers_on_cached_inputs_equal_the_full_model(tokenizer):
    from fastif.model.predict import predict_logits

    model = tiny_nli_model(tokenizer, 2)
    data = pairs(tokenizer, "mnli_train", 12)
    config = replace(quick_config("correct"), trainable_layers=1, max_length=128)
    full, split, encode = frozen_top(tokenizer, model, config)
    encoded = encode(data.records)
    top = FrozenAdapter(full, split, encoded.layer_returns_tuple)
    cached = encoded.data
    batch = cached.batch(range(12))
    flat = top.flat_params()
    assert torch.allclose(top.outputs(flat, batch), predict_logits(model, data), atol=1e-5)
    assert torch.equal(top.raw_batch(batch)["labels"], data.labels)
    modules = ("bert.encoder.layer.1", "bert.pooler", "classifier")
    assert set(top.names) == {name for name, _ in model.named_parameters() if name.startswith(modules)}
    assert top.num_params == sum(p.numel() for m in modules for p in model.get_submodule(m).parameters())
    assert split.first == 1 and not split.first_token_only
    before = model.classifier.weight.detach().clone()
    sgd_step(top, cached, lr=0.5)
    assert not torch.equal(before, model.classifier.weight)  # the step lands in the full model
    assert torch.allclose(top.outputs(top.flat_params(), batch), predict_logits(model, data), atol=1e-5)
    metrics = evaluate(top, collate(cached, batch_size=4))
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0
    assert metrics["loss"] == pytest.approx(mean_loss(top, cached), rel=1e-5)


def test_cls_only_top_and_the_disk_cache(tokenizer, tmp_path):
    from fastif.fingerprint import fingerprint_parameters
    from fastif.model.predict import predict_logits

    model = tiny_nli_model(tokenizer, 3)
    data = pairs(tokenizer, "mnli_train", 9, num_labels=3)
    full, split, encode = frozen_top(tokenizer, model, quick_config("correct"), cache_dir=tmp_path)
    assert split.first_token_only and all(name.startswith(("bert.pooler", "classifier")) for name in full.names)
    key = fingerprint_parameters(dict(model.state_dict()))
    first = encode(data.records)
    assert first.data.sizes == [1] * 9 and first.data.states.shape == (9, 16)
    assert len(list(tmp_path.iterdir())) == 1
    calls: list[int] = []
    handle = model.bert.embeddings.register_forward_hook(lambda *_: calls.append(1))
    try:
        again = encode(data.records)  # read back from disk: no forward pass
    finally:
        handle.remove()
    assert calls == [] and torch.equal(first.data.states, torch.from_numpy(np.array(again.data.states)))
    assert torch.equal(first.features, again.features)
    top = FrozenAdapter(full, split, again.layer_returns_tuple)
    assert torch.allclose(top.outputs(top.flat_params(), again.data.batch(range(9))), predict_logits(model, data),
                          atol=1e-5)  # fmt: skip
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    assert fingerprint_parameters(dict(model.state_dict())) != key
    frozen_top(tokenizer, model, quick_config("correct"), cache_dir=tmp_path)[2](data.records)
    assert len(list(tmp_path.iterdir())) == 2  # another model: another folder


def test_helpful_points_lower_the_anchor_loss_and_harmful_raise_it(factory):
    """The sign check: with heavy damping s_test ∝ the anchor gradient, so a small step must move the loss."""
    from fastif.applications.finetune.run import prepare

    lissa = replace(quick_config("correct").lissa, damping=50.0, scale=200.0, depth=30)
    config = replace(quick_config("correct"), candidates=40, selected=5, lr=1e-3, lissa=lissa)
    setup = prepare(config, factory, NLI_TASK, lambda _message: None)
    group = config.groups[0]
    anchors = setup.anchors[group].subset(range(4))
    neighbours = setup.index.search_mean(setup.anchor_features[group][:4], config.candidates)
    from fastif.applications.finetune.run import choose

    changes = {}
    for mode in ("helpful", "harmful"):
        before = mean_loss(setup.adapter, anchors)
        data, chosen, scores, _ = choose(setup, mode, anchors, neighbours, (0, 0))
        assert len(chosen) == 5 and set(chosen) <= set(neighbours.tolist())
        assert (scores[0] > 0) if mode == "helpful" else (scores[0] < 0)
        sgd_step(setup.adapter, data, config.lr)
        changes[mode] = mean_loss(setup.adapter, anchors) - before
        setup.adapter.load_flat_params(setup.original)
    assert changes["helpful"] < 0 < changes["harmful"]


# ---------------------------------------------------------------------------------------------- CLI smoke run


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fastif")
    add_experiment_commands(root.add_subparsers(dest="command", required=True))
    return root


def test_cli_options_build_the_config(tmp_path):
    args = parser().parse_args(["experiment", "augment", "--task", "anli", "--seeds", "3", "4", "--steps", "2"])
    config = config_from_args(args)
    assert (config.experiment, config.task, config.seeds, config.steps) == ("augment", "anli", (3, 4), 2)
    assert config.split.pool_fraction > 0
    save_config(replace(quick_config("correct"), steps=7), tmp_path / "c.json")
    args = parser().parse_args(["experiment", "augment", "--config", str(tmp_path / "c.json"), "--seed", "5"])
    config = config_from_args(args)
    assert (config.experiment, config.steps, config.seeds) == ("augment", 7, (5,))
    with pytest.raises(SystemExit):
        parser().parse_args(["experiment", "correct", "--seed", "1", "--seeds", "2"])
    with pytest.raises(SystemExit):
        parser().parse_args(["experiment", "fix"])


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")  # --quick runs 4-step chains on purpose
@pytest.mark.parametrize("experiment", ["correct", "augment"])
def test_quick_experiment_smoke_run_writes_results(tmp_path, factory, experiment, capsys):
    output, cache = tmp_path / "out", tmp_path / "cache"
    args = parser().parse_args(
        ["experiment", experiment, "--quick", "--output", str(output), "--cache-dir", str(cache)]
    )
    args.factory = factory
    assert args.handler(args) == 0
    for name in (RESULTS_FILE, CONFIG_FILE, TABLE_FILE, PLOT_FILE):
        assert (output / name).is_file()
    results = json.loads((output / RESULTS_FILE).read_text())
    config = load_experiment_config(output / CONFIG_FILE)
    assert config == quick_config(experiment)
    assert len(results["runs"]) == len(config.groups) * len(config.modes) * len(config.seeds)
    assert all(len(run["steps"]) == config.steps for run in results["runs"])
    pool_ids = {step_id for run in results["runs"] for step in run["steps"] for step_id in step["selected_ids"] or []}
    anchor_ids = {step_id for run in results["runs"] for step in run["steps"] for step_id in step["anchor_ids"]}
    assert pool_ids and not pool_ids & anchor_ids
    summary = summarise(results)
    assert set(summary["own_group"]) == {*config.groups, "mean"}
    first_run = results["runs"][0]
    own_loss = (
        first_run["steps"][-1]["eval"][first_run["group"]]["loss"] - results["original"][first_run["group"]]["loss"]
    )
    assert summary["own_group_loss"][first_run["group"]][first_run["mode"]]["mean"] == pytest.approx(own_loss)
    assert "Test-loss change" in (output / TABLE_FILE).read_text()
    assert results["environment"]["start"]["loadavg"] and results["setup"]["lissa_scale"] > 0
    assert "| anchors from |" in capsys.readouterr().out


def test_published_comparison_closed_form():
    """Per-seed helpful gains 3, 2, 4, 3, 3 (mean 3, sd √0.5) against 2.5: t = 0.5 / (√0.5 / √5) = 1.581 on 4 df,
    two-sided p = 0.189; against random (all 0) the paired t is 3 / 0.3162 = 9.487, p = 6.9e-4."""
    gains = [3.0, 2.0, 4.0, 3.0, 3.0]
    curves = {("g", "helpful", "g"): [[0.0, g] for g in gains], ("g", "random", "g"): [[0.0, 0.0]] * 5}
    comparison = published_comparison(curves, ["g"], {"published": {"source": "paper", "gain_points": 2.5}})
    assert comparison["helpful_mean"] == pytest.approx(3.0)
    assert comparison["p_helpful_vs_published"] == pytest.approx(0.189, abs=1e-3)
    assert comparison["p_helpful_vs_random"] == pytest.approx(6.9e-4, rel=0.02)
    one_seed = {("g", "helpful", "g"): [[0.0, 1.0]], ("g", "random", "g"): [[0.0, 0.0]]}
    single = published_comparison(one_seed, ["g"], {"published": {"source": "paper", "gain_points": 2.5}})
    assert single["p_helpful_vs_random"] is None and single["p_helpful_vs_published"] is None
    flat = {("g", "helpful", "g"): [[0.0, 0.0]] * 3, ("g", "random", "g"): [[0.0, 0.0]] * 3}
    unmoved = published_comparison(flat, ["g"], {"published": {"source": "paper", "gain_points": 2.5}})
    assert unmoved["helpful_mean"] == 0.0 and unmoved["p_helpful_vs_published"] is None  # a t-test is undefined
