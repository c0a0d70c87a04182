"""Equivalences in kronfluence's style: vectorised = loop, JVP = gradient dot, invariance to batching, solvers agree."""

from __future__ import annotations

import pytest
import torch
from helpers import logistic_adapter, logistic_data, token_batch
from torch import nn

from fastif import CG, AdapterConfig, Exact, Hessian, Influence, LiSSA, ScoreConfig, TensorData, TorchAdapter
from fastif.candidates import compute_features
from fastif.grads import directional_derivatives, per_example_grads
from fastif.hvp import loss_hvp
from fastif.scores import score_matrix


def _mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(40, 6, dtype=dtype)
    y = torch.randint(0, 3, (40,))
    adapter = TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"), AdapterConfig(l2=1e-2))
    return adapter, TensorData((x, y))


def _loop_grads(adapter, data):
    rows = []
    for i in range(len(data)):
        theta = adapter.flat_params().requires_grad_(True)
        (gradient,) = torch.autograd.grad(adapter.per_example_loss(theta, data.batch([i])).sum(), theta)
        rows.append(gradient)
    return torch.stack(rows)


def test_vmap_gradients_equal_a_per_example_loop_mlp():
    adapter, data = _mlp_problem()
    vectorised = per_example_grads(adapter, adapter.flat_params(), data.batch(range(len(data))), chunk_size=7)
    torch.testing.assert_close(vectorised, _loop_grads(adapter, data), rtol=1e-10, atol=1e-12)


def test_vmap_gradients_equal_a_per_example_loop_bert(bert_adapter):
    data = TensorData(token_batch(6))
    vectorised = per_example_grads(bert_adapter, bert_adapter.flat_params(), data.batch(range(6)), chunk_size=4)
    torch.testing.assert_close(vectorised, _loop_grads(bert_adapter, data), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("problem", ["mlp", "bert"])
def test_jvp_scores_equal_gradient_dot_scores(problem, bert_adapter):
    if problem == "mlp":
        adapter, data = _mlp_problem()
    else:
        adapter, data = bert_adapter, TensorData(token_batch(10))
    flat = adapter.flat_params()
    tangent = torch.randn(adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = data.batch(range(len(data)))
    by_jvp = directional_derivatives(adapter, flat, batch, tangent)
    by_grad = per_example_grads(adapter, flat, batch) @ tangent
    torch.testing.assert_close(by_jvp, by_grad, rtol=1e-4, atol=1e-5 * float(by_grad.abs().max()))


def test_scores_are_invariant_to_batch_size_chunk_size_and_path():
    adapter, data = _mlp_problem()
    train, test = TensorData(data.batch(range(30))), TensorData(data.batch(range(30, 40)))
    reference = Influence(adapter, train, Exact(damping=0.5), ScoreConfig("grad", 64, 32)).scores(test)
    for config in (ScoreConfig("grad", 7, 3), ScoreConfig("jvp", 5, 1), ScoreConfig("auto", 1, 1)):
        scores = Influence(adapter, train, Exact(damping=0.5), config).scores(test)
        torch.testing.assert_close(scores, reference, rtol=1e-8, atol=1e-10)
    hessian_batches = Influence(adapter, train, Exact(damping=0.5), hessian_batch_size=4).scores(test)
    torch.testing.assert_close(hessian_batches, reference, rtol=1e-8, atol=1e-10)


class _LengthAwareData(TensorData):
    """TensorData that reports token counts and records the order in which its batches are asked for."""

    def __init__(self, tensors) -> None:
        super().__init__(tensors)
        self.lengths = tensors["attention_mask"].sum(1).tolist()
        self.requested: list[int] = []

    def batch(self, indices):
        self.requested += list(indices)
        return super().batch(indices)


def test_length_ordered_scores_and_features_come_back_in_the_callers_order(bert_adapter):
    data = _LengthAwareData(token_batch(12, seed=3))
    plain = TensorData(data.tensors)
    flat = bert_adapter.flat_params()
    s_test = torch.randn(2, bert_adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    picked = [7, 0, 11, 3, 3, 5]  # any order, a duplicate
    config = ScoreConfig("grad", batch_size=4)
    scores = score_matrix(bert_adapter, flat, s_test, data, picked, config)
    assert [data.lengths[i] for i in data.requested] == sorted(data.lengths[i] for i in picked)  # shortest first
    torch.testing.assert_close(scores, score_matrix(bert_adapter, flat, s_test, plain, picked, config))
    data.requested.clear()
    features = compute_features(bert_adapter, data, batch_size=5)
    assert [data.lengths[i] for i in data.requested] == sorted(data.lengths)
    torch.testing.assert_close(features, compute_features(bert_adapter, plain, batch_size=5))


def test_exact_cg_and_lissa_agree_on_a_convex_model(logistic):
    train, test = logistic_data(logistic, logistic["train"]), logistic_data(logistic, logistic["test"][:5])
    adapter = logistic_adapter(logistic)
    exact = Influence(adapter, train, Exact()).scores(test)
    cg = Influence(adapter, train, CG(tolerance=1e-12)).scores(test)
    lissa = Influence(adapter, train, LiSSA(depth=800, repeats=2, batch_size=16, tail_average=0.5)).scores(test)
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-8 * float(exact.abs().max()))
    correlation = torch.corrcoef(torch.stack([exact.flatten(), lissa.flatten()]))[0, 1]
    assert correlation > 0.99
    assert float((lissa - exact).norm() / exact.norm()) < 0.1


def test_hvp_is_symmetric_on_a_tiny_bert_with_eager_attention():
    from helpers import tiny_bert

    from fastif import HFClassifierAdapter

    adapter = HFClassifierAdapter(tiny_bert(torch.float32))
    assert adapter.model.config._attn_implementation == "eager"
    flat, batch = adapter.flat_params(), token_batch(4)
    generator = torch.Generator().manual_seed(2)
    v, w = (torch.randn(adapter.num_params, generator=generator) for _ in range(2))
    hv, hw = (loss_hvp(adapter, flat, batch, u) for u in (v, w))
    assert abs(float(w @ hv) - float(v @ hw)) <= 1e-4 * float(hv.norm() * w.norm())
    forward_over_reverse = loss_hvp(adapter, flat, batch, v, method="fwd-rev")
    torch.testing.assert_close(forward_over_reverse, hv, rtol=1e-3, atol=1e-5 * float(hv.abs().max()))


def test_influence_over_a_parameter_subset_equals_the_block_computation():
    adapter, data = _mlp_problem()
    train, test = TensorData(data.batch(range(30))), TensorData(data.batch(range(30, 40)))
    model = adapter.model
    subset = TorchAdapter(model, adapter.loss_fn, AdapterConfig(include=("2",), l2=1e-2))
    assert subset.names == ["2.weight", "2.bias"]
    full_hessian = Hessian(adapter, train).dense()
    block = slice(adapter.num_params - subset.num_params, adapter.num_params)  # layer "2" comes last
    test_grads = Influence(adapter, train).test_grads(test)[:, block]
    train_grads = Influence(adapter, train).test_grads(train)[:, block]
    expected = test_grads @ torch.linalg.solve(
        full_hessian[block, block] + 0.5 * torch.eye(subset.num_params), train_grads.T
    )
    torch.testing.assert_close(
        Influence(subset, train, Exact(damping=0.5)).scores(test), expected, rtol=1e-8, atol=1e-10
    )


def test_top_k_with_all_points_as_candidates_equals_full_scoring():
    adapter, data = _mlp_problem()
    train, test = TensorData(data.batch(range(30))), TensorData(data.batch(range(30, 34)))
    influence = Influence(adapter, train, Exact(damping=0.5))
    full, pruned = influence.top_k(test, k=5), influence.top_k(test, k=5, num_candidates=30)
    torch.testing.assert_close(pruned.helpful_scores, full.helpful_scores)
    torch.testing.assert_close(pruned.harmful_indices, full.harmful_indices)


def test_top_k_with_candidates_scores_only_the_nearest_points():
    adapter, data = _mlp_problem()
    train, test = TensorData(data.batch(range(30))), TensorData(data.batch(range(30, 34)))
    influence = Influence(adapter, train, Exact(damping=0.5))
    nearest = influence.nearest(test, 8)
    top = influence.top_k(test, k=3, num_candidates=8)
    all_scores = influence.scores(test)
    for row in range(4):
        assert set(top.helpful_indices[row].tolist()) <= set(nearest[row].tolist())
        torch.testing.assert_close(top.helpful_scores[row], all_scores[row, top.helpful_indices[row]])
    group = influence.top_k(test, k=3, num_candidates=8, group=True)
    assert group.helpful_indices.shape == (1, 3)
