"""GradientStoreCallback: an HF Trainer run builds a store equal to a direct build_store after training, or one
store per chosen step; wrong settings are refused with a fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_bert, token_batch

from fastif import AdapterConfig, HFClassifierAdapter, TensorData
from fastif.errors import ConfigError
from fastif.gradient_store import GradientStore, GradientStoreConfig, build_store
from fastif.projection import ProjectionConfig

transformers = pytest.importorskip("transformers")
from fastif.callbacks import GradientStoreCallback, step_folder  # noqa: E402

ADAPTER = AdapterConfig(include=("bert.pooler", "classifier", "bert.encoder.layer.1"))
CONFIG = GradientStoreConfig(ProjectionConfig(kind="gaussian", dim=32, layer_dim=4, seed=3), "float32", shard_size=8)


def data() -> dict[str, torch.Tensor]:
    return token_batch(20, seed=1)


def train(tmp_path, callback, steps: int = 3):
    """Train a tiny random BERT for ``steps`` optimiser steps with transformers.Trainer and ``callback``."""
    model = tiny_bert()
    batch = data()
    examples = [{key: value[i] for key, value in batch.items()} for i in range(20)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=examples, callbacks=[callback]).train()
    return model


def vectors(folder, adapter) -> np.ndarray:
    return GradientStore.open(folder, adapter, TensorData(data())).vectors


def test_store_at_the_end_equals_a_direct_build_after_training(tmp_path):
    callback = GradientStoreCallback(
        lambda model: HFClassifierAdapter(model, ADAPTER), TensorData(data()), tmp_path / "store", CONFIG, frozen="off"
    )
    model = train(tmp_path, callback)
    assert model.training  # the build restored the Trainer's mode
    adapter = HFClassifierAdapter(model, ADAPTER)
    build_store(adapter, TensorData(data()), tmp_path / "direct", CONFIG)
    np.testing.assert_array_equal(vectors(tmp_path / "store", adapter), vectors(tmp_path / "direct", adapter))
    assert callback.reports["end"].computed == [0, 1, 2]


def test_at_steps_writes_one_store_per_step(tmp_path):
    callback = GradientStoreCallback(
        lambda model: HFClassifierAdapter(model, ADAPTER), TensorData(data()), tmp_path, CONFIG, at=[1, 3]
    )
    model = train(tmp_path, callback)
    assert sorted(callback.reports) == [1, 3]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1", "step-3"]
    final = step_folder(tmp_path, 3)
    direct = tmp_path / "direct"
    callback.build(model, direct, "after")  # the same frozen path on the final parameters
    first, last, again = (np.load(f / "grads-00000.npy") for f in (step_folder(tmp_path, 1), final, direct))
    np.testing.assert_array_equal(last, again)
    assert not np.allclose(first, last)  # step 1's store holds step 1's parameters


def test_an_adapter_of_another_model_is_refused(tmp_path):
    callback = GradientStoreCallback(HFClassifierAdapter(tiny_bert(), ADAPTER), TensorData(data()), tmp_path)
    with pytest.raises(ConfigError, match="factory"):
        callback.build(tiny_bert(), tmp_path / "s", "end")


@pytest.mark.parametrize("at", ["start", [], [0], [1.5], [True]])
def test_bad_steps_are_refused(tmp_path, at):
    with pytest.raises(ConfigError, match="at must"):
        GradientStoreCallback(lambda model: HFClassifierAdapter(model, ADAPTER), TensorData(data()), tmp_path, at=at)
