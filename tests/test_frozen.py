"""The frozen-bottom path gives the same numbers as the full model, over a zoo of tiny random transformers."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import transformers

from fastif import CG, AdapterConfig, Exact, HFClassifierAdapter, Influence
from fastif.errors import DataError, ModelError
from fastif.model.frozen import encode_prefix, find_split
from fastif.scores import ScoreConfig

VOCAB, HIDDEN, LAYERS, LABELS = 40, 8, 3, 3


class TokenData:
    """Random right-padded token sequences of varied length, with labels (a tiny HF-style dataset)."""

    def __init__(self, n: int, seed: int, pad: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(3, 9, (n,), generator=generator).tolist()
        self.ids = [torch.randint(1, VOCAB, (length,), generator=generator) for length in self.lengths]
        self.labels = torch.randint(0, LABELS, (n,), generator=generator)
        self.pad = pad

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(self.lengths[i] for i in indices)
        input_ids = torch.full((len(indices), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : self.lengths[i]] = self.ids[i]
            mask[row, : self.lengths[i]] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[list(indices)]}


def _config(kind: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, num_labels=LABELS, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=16, **common
        )
    if kind == "roberta":
        return transformers.RobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=40, **{**common, "pad_token_id": 1},
        )  # fmt: skip
    if kind == "distilbert":
        return transformers.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=2, hidden_dim=16, **common)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32, **common)
    config_class = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}.get(kind)
    extra = {"sliding_window": 4} if kind == "mistral" else {}  # shorter than the longest sequences, so it matters
    return (config_class or transformers.LlamaConfig)(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=32, **common, **extra,
    )  # fmt: skip


ZOO = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")
RMS_NORM_IN_FLOAT32 = ("llama", "qwen2", "mistral")
"""HF computes these models' RMSNorm in float32 even in a float64 model: two paths agree to float32 rounding only
(which float32 kernels a CPU picks decides how close; an AMD EPYC runner put llama and qwen2 at 2e-8 relative)."""


def _assert_agree(actual: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    """Float64 agreement, or float32 rounding relative to the largest entry for a model that rounds to float32."""
    if kind in RMS_NORM_IN_FLOAT32:
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8 * scale)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def _top_names(model: torch.nn.Module, split_layers: str, trainable: int) -> tuple[str, ...]:
    """The top ``trainable`` layers of the stack plus everything above it (head, pooler, final norm)."""
    prefix = model.base_model_prefix
    below = [f"{prefix}.{path}" for path in ("embeddings", "wte", "wpe", "embed_tokens")]
    stack = split_layers
    names = []
    for name, _ in model.named_parameters():
        if any(name.startswith(b + ".") for b in below):
            continue
        if name.startswith(stack + ".") and int(name[len(stack) + 1 :].split(".")[0]) < LAYERS - trainable:
            continue
        names.append(name)
    return tuple(names)


def _stack(kind: str, model: torch.nn.Module) -> str:
    paths = {"bert": "encoder.layer", "roberta": "encoder.layer", "distilbert": "transformer.layer", "gpt2": "h"}
    return f"{model.base_model_prefix}.{paths.get(kind, 'layers')}"


def _adapter(kind: str, trainable: int) -> HFClassifierAdapter:
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(_config(kind)).double()
    include = _top_names(model, _stack(kind, model), trainable)
    head = "score" if kind in DECODERS else "classifier"
    return HFClassifierAdapter(
        model, AdapterConfig(include=include, l2=0.1, l2_exclude=("*bias",)), feature_module=head
    )


@pytest.mark.parametrize("trainable", [0, 1, 2])
@pytest.mark.parametrize("kind", ZOO)
def test_frozen_equals_unfrozen(kind: str, trainable: int) -> None:
    """s_test, scores, kNN candidates and top-k agree with the cache on and off: to float64 rounding, or to float32
    rounding for a model whose RMSNorm rounds to float32."""
    adapter = _adapter(kind, trainable)
    pad = adapter.model.config.pad_token_id
    train, test = TokenData(24, 1, pad), TokenData(3, 2, pad)
    runs = {}
    for frozen in ("on", "off"):
        influence = Influence(adapter, train, solver=CG(damping=100.0, tolerance=1e-12), frozen=frozen)
        assert (influence.split is not None) == (frozen == "on")
        all_points = influence.candidate_scores(test)
        knn = influence.candidate_scores(test, num_candidates=6)
        runs[frozen] = (all_points, knn, influence.top_k(test, k=3))
    (full_on, knn_on, top_on), (full_off, knn_off, top_off) = runs["on"], runs["off"]
    _assert_agree(full_on.solve.x, full_off.solve.x, kind)
    _assert_agree(full_on.scores, full_off.scores, kind)
    assert torch.equal(knn_on.indices, knn_off.indices)
    _assert_agree(knn_on.scores, knn_off.scores, kind)
    assert torch.equal(top_on.helpful_indices, top_off.helpful_indices)
    assert torch.equal(top_on.harmful_indices, top_off.harmful_indices)


def test_first_token_head_caches_one_row_per_example() -> None:
    """With only BERT's pooler and classifier selected, the cache holds the [CLS] vector alone."""
    adapter = _adapter("bert", 0)
    split = find_split(adapter)
    assert split is not None and split.last_layer is None and split.head is not None  # the head runs alone
    assert (split.entry, split.layers, split.first, split.num_layers, split.first_token_only) == (
        "bert.embeddings", "bert.encoder.layer", LAYERS, LAYERS, True
    )  # fmt: skip
    encoded = encode_prefix(adapter, TokenData(10, 3), split, batch_size=4)
    assert encoded.data.sizes == [1] * 10 and encoded.features.shape == (10, HIDDEN)


def test_memmap_cache_past_the_budget_gives_the_same_scores(tmp_path) -> None:
    """A cache budget of 0 bytes moves the activations to a memmap on disk; the scores do not change."""
    adapter = _adapter("gpt2", 1)
    train, test = TokenData(16, 4), TokenData(2, 5)
    ram = Influence(adapter, train, solver=Exact(damping=100.0))
    disk = Influence(adapter, train, solver=Exact(damping=100.0), cache_budget_bytes=0, cache_folder=tmp_path)
    torch.testing.assert_close(ram.scores(test), disk.scores(test), rtol=1e-10, atol=1e-12)
    assert (tmp_path / "activations.npy").is_file()


def test_frozen_modes() -> None:
    """``auto`` falls back where nothing lies below the selection; ``on`` then says why; bad modes are refused."""
    adapter = _adapter("bert", LAYERS)  # every layer trainable: nothing below the first one but embeddings
    assert find_split(adapter, "auto") is None
    embeddings = HFClassifierAdapter(adapter.model, AdapterConfig(include=("bert.embeddings", "classifier")))
    assert find_split(embeddings, "auto") is None
    with pytest.raises(ModelError, match="embeddings"):
        find_split(embeddings, "on")
    with pytest.raises(ModelError, match="frozen must be"):
        find_split(adapter, "yes")  # type: ignore[arg-type]


def test_frozen_path_with_jvp_and_grad_scores_agree() -> None:
    """Both score paths run on the cached activations and give the same numbers (to 1e-6: Llama computes its
    RMSNorm in float32 even in a float64 model, see tests/test_zoo.py)."""
    adapter = _adapter("llama", 1)
    train, test = TokenData(12, 6), TokenData(1, 7)
    scores = {
        method: Influence(adapter, train, Exact(damping=100.0), ScoreConfig(method=method)).scores(test)
        for method in ("jvp", "grad")
    }
    scale = float(scores["grad"].abs().max())
    torch.testing.assert_close(scores["jvp"], scores["grad"], rtol=1e-6, atol=1e-8 * scale)


def test_bert_last_layer_runs_at_the_first_token_only() -> None:
    """On the frozen path a BERT head's last layer computes position 0 alone ([B, 1, H]), the full model [B, T, H]."""
    adapter = _adapter("bert", 2)
    influence = Influence(adapter, TokenData(6, 8), frozen="on")
    assert influence.split is not None and influence.split.last_layer is not None
    head, shapes = influence.work_adapter, []
    last = adapter.model.bert.encoder.layer[LAYERS - 1]
    handle = last.register_forward_hook(lambda _m, _a, output: shapes.append(tuple(output.shape)))
    try:
        head.per_example_loss(influence.flat, head.to_device(influence.train_view.batch([0, 1])))
        adapter.per_example_loss(influence.flat, adapter.to_device(TokenData(6, 8).batch([0, 1])))
    finally:
        handle.remove()
    width = max(TokenData(6, 8).lengths[:2])
    assert shapes == [(2, 1, HIDDEN), (2, width, HIDDEN)]


def test_hessian_data_is_the_set_whose_hessian_is_inverted() -> None:
    """``hessian_data`` changes only H: with it equal to the training set the scores are unchanged, with a subset
    they equal a dense solve of that subset's Hessian (on the frozen path too)."""
    adapter = _adapter("bert", 1)
    train, test = TokenData(16, 9), TokenData(2, 10)
    base = Influence(adapter, train, Exact(damping=100.0))
    same = Influence(adapter, train, Exact(damping=100.0), hessian_data=train)
    torch.testing.assert_close(base.scores(test), same.scores(test), rtol=1e-10, atol=1e-12)
    subset = Subset8(train)
    other = Influence(adapter, train, Exact(damping=100.0), hessian_data=subset)
    reference = Influence(adapter, subset, Exact(damping=100.0))
    torch.testing.assert_close(other.s_test(test), reference.s_test(test), rtol=1e-10, atol=1e-12)


class Subset8:
    """The first 8 examples of a TokenData."""

    def __init__(self, data: TokenData) -> None:
        self.data, self.lengths = data, data.lengths[:8]

    def __len__(self) -> int:
        return 8

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.data.batch(indices)


def test_parallel_lissa_on_the_frozen_path_equals_serial() -> None:
    """``Influence.parallel`` spreads LiSSA chains over 2 local processes on the head; the s_test is the serial one."""
    from fastif import LiSSA
    from fastif.runner import RunnerConfig

    adapter = _adapter("bert", 1)
    train, test = TokenData(16, 11), TokenData(2, 12)
    solver = LiSSA(depth=12, repeats=2, batch_size=2, damping=100.0, seed=3)
    serial = Influence(adapter, train, solver).candidate_scores(test, num_candidates=5)
    influence = Influence(adapter, train, LiSSA(solver.config))
    with influence.parallel(RunnerConfig(backend="processes", workers=2)):
        parallel = influence.candidate_scores(test, num_candidates=5)
    torch.testing.assert_close(parallel.solve.x, serial.solve.x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parallel.scores, serial.scores, rtol=1e-10, atol=1e-12)


def test_store_cache_skips_the_pass_on_a_later_run(tmp_path) -> None:
    """With ``cache=Store``, the first run saves the activations and features; a second run loads them (no
    forward pass over the training set) and gives the same scores."""
    from fastif.store import Store, fingerprint_parameters

    adapter = _adapter("bert", 1)
    train, test = TokenData(12, 13), TokenData(2, 14)
    identity = dict(model_fingerprint=fingerprint_parameters(dict(adapter.model.named_parameters())),
                    data_fingerprint="token-data-13", config={})  # fmt: skip
    with Store.open(tmp_path / "store", **identity) as store:
        first = Influence(adapter, train, Exact(damping=100.0), cache=store).candidate_scores(test, num_candidates=4)
    calls: list[int] = []
    handle = adapter.model.bert.embeddings.register_forward_hook(lambda *_: calls.append(1))
    try:
        with Store.open(tmp_path / "store", **identity) as store:
            influence = Influence(adapter, train, Exact(damping=100.0), cache=store)
            influence.work_adapter  # noqa: B018 (loads the cache)
            assert calls == []
            second = influence.candidate_scores(test, num_candidates=4)
    finally:
        handle.remove()
    assert torch.equal(first.indices, second.indices)
    torch.testing.assert_close(first.scores, second.scores, rtol=1e-12, atol=0.0)


def test_a_first_token_classifier_runs_its_head_alone() -> None:
    """With only pooler + classifier selected, a loss on the frozen path runs no embedding or layer module."""
    adapter = _adapter("bert", 0)
    influence = Influence(adapter, TokenData(6, 15), frozen="on")
    head, calls = influence.work_adapter, []
    handles = [adapter.model.bert.embeddings.register_forward_hook(lambda *_: calls.append("embeddings"))]
    handles.append(adapter.model.bert.encoder.layer[0].register_forward_hook(lambda *_: calls.append("layer")))
    try:
        losses = head.per_example_loss(influence.flat, head.to_device(influence.train_view.batch([0, 1, 2])))
    finally:
        for handle in handles:
            handle.remove()
    full = adapter.per_example_loss(influence.flat, adapter.to_device(TokenData(6, 15).batch([0, 1, 2])))
    assert calls == [] and torch.allclose(losses, full, rtol=1e-10, atol=1e-12)


def test_an_influence_over_a_frozen_adapter_and_a_subset_of_its_activations() -> None:
    """A ``FrozenAdapter`` is not split again (``find_split`` leaves it alone), and an ``ActivationData`` subset
    gives the parent's scores for those points: the fine-tuning loop builds its per-step Influence this way."""
    adapter = _adapter("bert", 1)
    train, test = TokenData(10, 16), TokenData(2, 17)
    outer = Influence(adapter, train, Exact(damping=100.0), frozen="on")
    head, activations = outer.work_adapter, outer.train_view
    assert find_split(head, "on") is None and find_split(head, "auto") is None
    picked = [7, 2, 5]
    subset = activations.subset(picked)
    assert len(subset) == 3 and subset.lengths == [train.lengths[i] for i in picked]
    torch.testing.assert_close(subset.batch([0, 1])["hidden"], activations.batch([7, 2])["hidden"], rtol=0, atol=0)
    inner = Influence(head, activations, Exact(damping=100.0))
    assert inner.split is None
    tests = outer.prepare(test).data
    expected = outer.scores(test, train_indices=picked)
    torch.testing.assert_close(inner.scores(tests, train_indices=picked), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(DataError, match="subset"):
        activations.subset([10])
