"""The model zoo: on every tiny random model (float64) fastif's numbers equal an independent reference.

References: the model's own forward (logits, losses), a loop of ``torch.autograd.grad`` over that forward
(per-example gradients), gradient dot products (JVP scores), and a dense float64 Hessian from
``torch.autograd.functional.hessian`` solved by ``np.linalg.solve`` (Exact and CG). Plus the adapter fixes each
check guards: causal masks, DeBERTa's 2-D mask, multiple choice, RNN fallbacks, SDPA, the head, NaN location.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from zoo_models import BUILDERS, HF_CASES, Recurrent, ZooCase, zoo_case

from fastif import CG, AdapterConfig, Exact, Hessian, HFClassifierAdapter, Influence, TensorData, TorchAdapter
from fastif.data import batch_len, map_tensors
from fastif.errors import DataError
from fastif.grads import directional_derivatives, per_example_grads
from fastif.projection import ProjectionConfig, Projector
from fastif.scores import ScoreConfig, score_matrix

transformers = pytest.importorskip("transformers")

ALL = list(BUILDERS)


def _whole(data: TensorData):
    return data.batch(range(len(data)))


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal up to ``rtol`` relative to the largest entry (entries near zero do not blow up the error)."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale)


def _reference_grads(case: ZooCase, batch) -> torch.Tensor:
    """Per-example gradients by a loop of torch.autograd.grad over the model's own forward."""
    named = dict(case.adapter.model.named_parameters())
    params = [named[name] for name in case.adapter.names]
    rows = []
    for i in range(batch_len(batch)):
        loss = case.own_losses(map_tensors(lambda t, i=i: t[i : i + 1], batch))[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ALL)
def test_losses_and_logits_equal_the_models_own_forward(name):
    case = zoo_case(name)
    adapter, batch = case.adapter, _whole(case.train)
    assert case.adapter.num_params <= 300
    params = adapter.space.unflatten(adapter.flat_params())
    with torch.no_grad():
        if case.own_logits is not None:  # padded rows included; 1e-10 whatever the model computes internally
            _close(adapter.logits(params, batch), case.own_logits(batch), 1e-10)
        _close(adapter.per_example_loss(adapter.flat_params(), batch), case.own_losses(batch), 1e-10)


@pytest.mark.parametrize("name", ALL)
def test_per_example_grads_equal_an_autograd_loop(name):
    case = zoo_case(name)
    batch = _whole(case.train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the RNN fallback's one-line notice (tested below)
        ours = per_example_grads(case.adapter, case.adapter.flat_params(), batch, chunk_size=4)
    _close(ours, _reference_grads(case, batch), case.rtol)


@pytest.mark.parametrize("name", ALL)
def test_jvp_scores_equal_gradient_dot_scores(name):
    case = zoo_case(name)
    adapter = case.adapter
    tangents = torch.randn(2, adapter.num_params, generator=torch.Generator().manual_seed(0), dtype=adapter.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_jvp = score_matrix(adapter, adapter.flat_params(), tangents, case.train, config=ScoreConfig("jvp", 4))
        by_grad = score_matrix(adapter, adapter.flat_params(), tangents, case.train, config=ScoreConfig("grad", 4))
    _close(by_jvp, by_grad, case.rtol)


def _dense_damped(case: ZooCase) -> tuple[np.ndarray, float]:
    """The objective's dense Hessian (autograd, float64) and a damping that makes H + damping·I well conditioned."""
    adapter = case.adapter
    batch = adapter.to_device(_whole(case.train))
    dense = torch.autograd.functional.hessian(lambda theta: adapter.objective(theta, batch), adapter.flat_params())
    matrix = dense.detach().numpy()
    eigenvalues = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    damping = max(0.0, -eigenvalues.min()) + 0.05 * max(np.abs(eigenvalues).max(), 1e-6)
    return matrix, float(damping)


@pytest.mark.parametrize("name", ALL)
def test_exact_and_cg_equal_a_dense_float64_solve(name):
    case = zoo_case(name)
    adapter, flat = case.adapter, case.adapter.flat_params()
    matrix, damping = _dense_damped(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test_grads = per_example_grads(adapter, flat, _whole(case.test))
        hessian = Hessian(adapter, case.train, flat, batch_size=4)
        exact = Exact(damping=damping).fit(hessian).solve(test_grads).x
        cg = CG(damping=damping, max_iterations=400, tolerance=1e-12).fit(hessian).solve(test_grads).x
        scores = score_matrix(adapter, flat, exact, case.train)
    system = matrix + damping * np.eye(len(matrix))
    dense = torch.as_tensor(np.linalg.solve(system, test_grads.numpy().T).T)
    _close(exact, dense, max(case.rtol, 1e-9))
    _close(cg, dense, max(case.rtol, 1e-8))
    _close(scores, dense @ _reference_grads(case, _whole(case.train)).T, max(case.rtol, 1e-9))


def test_exact_scores_equal_captum_naive_times_n():
    """captum's Hessian is of the summed loss: hessian_reg = n·(l2 + damping) and captum = fastif / n."""
    influence_module = pytest.importorskip("captum.influence", reason="captum is not installed (the peers extra)")
    case = zoo_case("convolutional")
    _, damping = _dense_damped(case)
    ours = Influence(case.adapter, case.train, Exact(damping=damping)).scores(case.test)
    (x, y), n = case.train.tensors, len(case.train)
    captum = influence_module.NaiveInfluenceFunction(
        copy.deepcopy(case.adapter.model),
        torch.utils.data.TensorDataset(x, y),
        "unused",
        checkpoints_load_func=lambda model, path: 1.0,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=n,
        projection_dim=case.adapter.num_params,  # every eigenpair: no low-rank truncation
        hessian_reg=n * (case.adapter.config.l2 + damping),
        hessian_inverse_tol=0.0,
    )
    theirs = captum.influence(case.test.tensors).double()
    _close(theirs * n, ours, 1e-6)  # measured: 1.8e-7 of the largest score


# ------------------------------------------------------------------------------------------ the fixes


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_adapters_pick_a_mask_mode_and_their_head(name):
    adapter = zoo_case(name).adapter
    expected_mode = "model" if name == "deberta_v2" else "built"  # DeBERTa multiplies its embeddings by the mask
    assert adapter.mask_mode == expected_mode
    assert adapter.causal == (name in ("gpt2", "llama"))
    assert adapter.feature_name == ("score" if name in ("gpt2", "llama") else "classifier")


def test_decoder_features_are_the_hidden_state_of_the_last_non_pad_token():
    case = zoo_case("gpt2")
    batch = _whole(case.train)
    with torch.no_grad():
        hidden = case.adapter.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states[-1]
    last = batch["attention_mask"].sum(1) - 1
    _close(case.adapter.features(batch), hidden[torch.arange(len(last)), last], 1e-12)


def test_a_decoder_without_pad_token_refuses_padded_batches():
    config = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16, num_labels=2)
    adapter = HFClassifierAdapter(transformers.GPT2ForSequenceClassification(config))
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1] * 4, [1, 1, 0, 0]])}
    with pytest.raises(DataError, match="pad_token_id"):
        adapter.check_batch({**batch, "labels": torch.zeros(2, dtype=torch.long)})


def test_multiple_choice_labels_are_checked_against_the_number_of_choices():
    case = zoo_case("bert_multiple_choice")
    batch = _whole(case.train)
    case.adapter.check_batch(batch)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\] for this 2-choice model"):
        case.adapter.check_batch({**batch, "labels": torch.full_like(batch["labels"], 2)})
    with pytest.raises(DataError, match=r"\[B, num_choices, T\]"):
        case.adapter.check_batch({**batch, "input_ids": batch["input_ids"][:, 0]})


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rnns_fall_back_once_with_a_one_line_notice(cell, dtype):
    torch.manual_seed(0)
    model = Recurrent(cell).to(dtype)
    adapter = TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"))
    x, y = torch.randn(5, 5, 3, dtype=dtype), torch.randint(0, 3, (5,))
    flat = adapter.flat_params()
    tangent = torch.randn_like(flat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = per_example_grads(adapter, flat, (x, y), chunk_size=2)
        derivatives = directional_derivatives(adapter, flat, (x, y), tangent)
        per_example_grads(adapter, flat, (x, y))
        directional_derivatives(adapter, flat, (x, y), tangent)
    notices = [str(w.message) for w in caught if str(w.message).startswith("fastif:")]
    assert len(notices) == len(adapter.unsupported) and len(set(notices)) == len(notices)  # once per transform
    assert all(("loop over examples" in n) or ("gradient dot products" in n) for n in notices)
    assert not any("shapes" in n or "label" in n for n in notices)
    reference = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        reference.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(grads, torch.stack(reference), rtol)
    _close(derivatives, grads @ tangent, rtol)


def test_a_genuine_model_error_is_not_hidden_by_the_fallback():
    adapter = TorchAdapter(Recurrent(nn.LSTM).double(), nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(DataError, match="model failed on this batch"):
        per_example_grads(adapter, adapter.flat_params(), (torch.randn(3, 5, 4, dtype=torch.float64), torch.zeros(3)))


def test_an_hf_model_in_a_torch_adapter_is_switched_to_eager_attention():
    config = transformers.BertConfig(**{**_tiny_bert_sizes(), "attn_implementation": "sdpa"})
    model = transformers.BertForSequenceClassification(config).double()
    assert model.config._attn_implementation == "sdpa"

    def loss(outputs, labels):
        return nn.functional.cross_entropy(outputs.logits, labels, reduction="none")

    adapter = TorchAdapter(model, loss, AdapterConfig(include=("classifier", "bert.pooler")))
    assert model.config._attn_implementation == "eager"
    data = TensorData((torch.randint(1, 30, (4, 5)), torch.randint(0, 2, (4,))))
    assert bool(Hessian(adapter, data).dense().isfinite().all())


def _tiny_bert_sizes() -> dict:
    return dict(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


class _Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()


def test_a_nan_in_the_forward_is_located_by_module_and_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), _Sqrt(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0], [-1.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    adapter = TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"))
    train = TensorData((x, torch.zeros(4, dtype=torch.long)))
    tangent = torch.ones(1, adapter.num_params, dtype=torch.float64)
    with pytest.raises(
        DataError, match=r"training example\(s\) \[2\]: NaN/Inf first appears in the output of module '1'"
    ):
        score_matrix(adapter, adapter.flat_params(), tangent, train, config=ScoreConfig("grad"))


def test_a_nan_only_in_the_backward_is_said_to_be_there():
    model = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0)).double()
    adapter = TorchAdapter(model, lambda out, target: (out - target).abs().sqrt())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    batch = (torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert "backward pass" in adapter.locate_nonfinite(adapter.flat_params(), batch)


def test_sliding_rows_that_block_every_key_stay_finite_in_float64():
    """ModernBERT's float32 softmax turns float64's finfo.min into -inf; the adapter's masks stay finite there."""
    config = transformers.ModernBertConfig(
        **{**_tiny_bert_sizes(), "num_hidden_layers": 2}, num_labels=2, pad_token_id=0, local_attention=4,
        global_attn_every_n_layers=2,
        max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.ModernBertForSequenceClassification(config).double().eval()
    adapter = HFClassifierAdapter(model, AdapterConfig(include=("model.layers.0.attn.Wqkv", "classifier")))
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    mask = torch.tensor([[1] * 7, [1, 1] + [0] * 5])  # row 1, query 6: its window (keys 4-6) is all padding
    batch = {"input_ids": torch.randint(1, 30, (2, 7)) * mask, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    params = adapter.space.unflatten(adapter.flat_params())
    with torch.no_grad():
        _close(adapter.logits(params, batch), model(input_ids=batch["input_ids"], attention_mask=mask).logits, 1e-10)
    assert bool(per_example_grads(adapter, adapter.flat_params(), batch).isfinite().all())


@pytest.mark.parametrize("name", ALL)
def test_store_projection_equals_the_projection_of_the_reference_gradients(name):
    """The gradient store's hooked path (factored Linear/Conv1D weights, their biases, norms; the rest by vmap)
    equals projecting the autograd loop's per-example gradients, two Kronecker terms per weight."""
    case = zoo_case(name)
    batch = _whole(case.train)
    projector = Projector(case.adapter, ProjectionConfig(kind="gaussian", dim=16, layer_dim=4, seed=1, terms=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the RNN fallback's one-line notice (tested below)
        stored = projector.project_batch(case.adapter.flat_params(), batch, chunk_size=4)
    _close(stored, projector.project_flat(_reference_grads(case, batch)), case.rtol)
