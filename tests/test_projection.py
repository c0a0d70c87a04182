"""Random projections: seeded reproducibility, JL norm/inner-product preservation, and factored = dense."""

from __future__ import annotations

import pytest
import torch
from helpers import token_batch
from torch import nn

from fastif import AdapterConfig, TorchAdapter
from fastif.errors import ConfigError, DataError
from fastif.grads import per_example_grads
from fastif.projection import DenseProjection, ProjectionConfig, Projector, random_matrix


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets, reduction="none")


class TokenMLP(nn.Module):
    """Linear layers applied per token of a [B, T, in] input, mean-pooled: the Linear inputs are 3-D."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.scale = nn.Parameter(torch.ones(12))
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)) * self.scale).mean(dim=1)


class TinyGPT2(nn.Module):
    """A 2-layer, 16-wide random GPT-2 body (Conv1D layers) with a mean-pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, attn_implementation="eager")
        self.gpt2 = GPT2Model(config)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gpt2(input_ids=ids).last_hidden_state.mean(dim=1))


def mlp_problem(tokens: bool):
    """A float64 Linear-Tanh-Linear classifier on 2-D [B, 6] or 3-D [B, 5, 6] inputs, with a batch of 7."""
    torch.manual_seed(0)
    model = (TokenMLP() if tokens else nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))).double()
    x = torch.randn(7, 5, 6, dtype=torch.float64) if tokens else torch.randn(7, 6, dtype=torch.float64)
    return TorchAdapter(model, cross_entropy), (x, torch.randint(0, 3, (7,)))


def gpt2_problem():
    """The tiny GPT-2 (float64) with influence over its top block and head: Conv1D weights, biases, LayerNorms."""
    torch.manual_seed(0)
    model = TinyGPT2().double()
    adapter = TorchAdapter(model, cross_entropy, AdapterConfig(include=("gpt2.h.1", "head")))
    return adapter, (torch.randint(0, 50, (5, 7)), torch.randint(0, 3, (5,)))


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="kind"):
        ProjectionConfig(kind="sparse")
    with pytest.raises(ConfigError, match="dim"):
        ProjectionConfig(dim=0)
    with pytest.raises(ConfigError, match="terms"):
        ProjectionConfig(layer_dim=8, terms=0)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_seed_reproduces_the_matrix_and_another_seed_differs(kind):
    first = random_matrix(kind, 64, 300, seed=3, key=("dense", "w", 0))
    assert torch.equal(first, random_matrix(kind, 64, 300, seed=3, key=("dense", "w", 0)))
    assert not torch.equal(first, random_matrix(kind, 64, 300, seed=4, key=("dense", "w", 0)))
    assert not torch.equal(first, random_matrix(kind, 64, 300, seed=3, key=("dense", "w", 1)))
    if kind == "rademacher":
        assert set(torch.unique(first * 8).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_jl_preserves_norms_and_inner_products(kind):
    """d = 2048 on 20 random vectors of P = 9,000 (three named blocks, one spanning several column blocks)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 9000, generator=generator, dtype=torch.float64)
    projection = DenseProjection(["a", "b", "c"], [100, 8800, 100], ProjectionConfig(kind=kind, dim=2048, seed=1))
    y = projection.project_flat(x)
    assert y.shape == (20, 2048)
    assert torch.equal(y, DenseProjection(["a", "b", "c"], [100, 8800, 100], projection.config).project_flat(x))
    ratio = y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    assert ratio.min() > 0.85 and ratio.max() < 1.15
    unit = x / x.norm(dim=1, keepdim=True)
    exact, approx = unit @ unit.T, (y / x.norm(dim=1, keepdim=True)) @ (y / x.norm(dim=1, keepdim=True)).T
    assert (exact - approx).abs().max() < 0.15  # |⟨Rx, Ry⟩ - ⟨x, y⟩| for unit vectors: std ≈ 1/√d = 0.022
    other = DenseProjection(["a", "b", "c"], [100, 8800, 100], ProjectionConfig(kind=kind, dim=2048, seed=2))
    assert not torch.allclose(other.project_flat(x), y)


def test_dense_projection_is_identity_when_dim_covers_the_parameters():
    x = torch.randn(3, 50, dtype=torch.float64)
    projection = DenseProjection(["a", "b"], [20, 30], ProjectionConfig(dim=64))
    assert projection.dim == 50 and torch.equal(projection.project_flat(x), x)


def _check_factored_equals_dense(adapter, batch, config: ProjectionConfig) -> Projector:
    projector = Projector(adapter, config)
    flat = adapter.flat_params()
    factored = projector.project_batch(flat, batch, chunk_size=3)
    dense = projector.project_flat(per_example_grads(adapter, flat, batch))
    assert factored.shape == (len(batch[1]), projector.dim)
    torch.testing.assert_close(factored, dense, rtol=1e-10, atol=1e-12)
    return projector


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("terms", [1, 3])
def test_summed_kronecker_terms_equal_the_dense_projection(tokens, terms):
    adapter, batch = mlp_problem(tokens)
    config = ProjectionConfig(kind="gaussian", dim=8, layer_dim=4, seed=5, terms=terms)
    projector = _check_factored_equals_dense(adapter, batch, config)
    assert [block.terms for block in projector.factored] == [terms, 1]  # out.weight's 3 outputs: one side identity
    block = projector.factored[0]
    grads = per_example_grads(adapter, adapter.flat_params(), batch)
    weight_grad = grads[:, block.offset : block.offset + block.rows * block.cols]
    kron = sum(
        torch.kron(projector._side(block, "out", r).double(), projector._side(block, "in", r).double())
        for r in range(terms)
    )
    torch.testing.assert_close(
        projector.project_batch(adapter.flat_params(), batch)[:, :16], weight_grad @ kron.T / terms**0.5
    )
    if terms > 1:  # term 0 is the one-term map's matrix
        one = Projector(adapter, ProjectionConfig(kind="gaussian", dim=8, layer_dim=4, seed=5))
        assert torch.equal(one._side(one.factored[0], "in"), projector._side(block, "in", 0))


def test_summed_kronecker_terms_cut_the_error_on_rank_one_gradients():
    """Scores ⟨P s, P u vᵀ⟩ of an s_test-like vector (a mean of gradients) against rank-1 gradients (one token
    through a 96 x 96 Linear) that share a direction: one Kronecker map at 16 rows per side errs far more than a
    dense map of its 256 rows (first-order error terms ~ 1/16), and 16 summed terms come close to the dense one."""
    adapter = TorchAdapter(nn.Linear(96, 96, bias=False).double(), cross_entropy)
    generator = torch.Generator().manual_seed(1)
    common_out, common_in = torch.randn(2, 96, generator=generator, dtype=torch.float64)
    u = common_out + 1.5 * torch.randn(400, 96, generator=generator, dtype=torch.float64)
    v = common_in + 1.5 * torch.randn(400, 96, generator=generator, dtype=torch.float64)
    grads = (u[:, :, None] * v[:, None, :]).reshape(400, -1)
    s_test = grads[:20].mean(dim=0, keepdim=True)
    exact = (grads @ s_test.T).squeeze(1)

    def relative_error(projected: torch.Tensor, query: torch.Tensor) -> float:
        return float(((projected @ query.T).squeeze(1) - exact).pow(2).mean() / exact.var())

    dense = DenseProjection(["weight"], [96 * 96], ProjectionConfig(kind="gaussian", dim=256, seed=2))
    dense_error = relative_error(dense.project_flat(grads), dense.project_flat(s_test))
    for seed in range(3):
        errors = {}
        for terms in (1, 16):
            config = ProjectionConfig(kind="gaussian", dim=8, layer_dim=16, seed=seed, terms=terms)
            projector = Projector(adapter, config)
            assert projector.dim == 256
            errors[terms] = relative_error(projector.project_flat(grads), projector.project_flat(s_test))
        assert errors[1] > 4 * dense_error
        assert errors[16] < errors[1] / 3 and errors[16] < 2 * dense_error


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_factored_equals_dense_on_an_mlp(tokens, kind):
    adapter, batch = mlp_problem(tokens)
    projector = _check_factored_equals_dense(adapter, batch, ProjectionConfig(kind=kind, dim=8, layer_dim=4, seed=5))
    assert [block.name for block in projector.factored] == (
        ["embed.weight", "out.weight"] if tokens else ["0.weight", "2.weight"]
    )
    assert projector.dim == 4 * 4 + 3 * 5 + 8  # out.weight: 3 outputs kept whole, inputs get 16 // 3 rows; dense 8
    block = projector.factored[0]
    grads = per_example_grads(adapter, adapter.flat_params(), batch)
    weight_grad = grads[:, block.offset : block.offset + block.rows * block.cols]
    kron = torch.kron(projector._side(block, "out").double(), projector._side(block, "in").double())
    torch.testing.assert_close(projector.project_batch(adapter.flat_params(), batch)[:, :16], weight_grad @ kron.T)


def test_factored_equals_dense_on_a_tiny_gpt2():
    adapter, batch = gpt2_problem()
    projector = _check_factored_equals_dense(adapter, batch, ProjectionConfig(dim=64, layer_dim=8, seed=2))
    assert all(block.transposed for block in projector.factored if block.name.startswith("gpt2"))
    assert {"gpt2.h.1.attn.c_attn.bias", "head.bias"} <= set(projector.hooked_biases)
    assert {"gpt2.h.1.ln_1", "gpt2.h.1.ln_2"} <= {norm.module for norm in projector.norms}  # hooked, not vmapped
    assert not any("ln_" in adapter.space.names[i] for i in projector.vmapped)


def test_factored_equals_dense_on_a_tiny_bert_with_padding(bert_adapter):
    """HF BERT (nn.Linear in attention, FFN, pooler, classifier) on ragged padded token batches."""
    batch = token_batch(4)
    projector = Projector(bert_adapter, ProjectionConfig(kind="gaussian", dim=32, layer_dim=6, seed=3, terms=2))
    flat = bert_adapter.flat_params()
    factored = projector.project_batch(flat, batch, chunk_size=2)
    dense = projector.project_flat(per_example_grads(bert_adapter, flat, batch))
    torch.testing.assert_close(factored, dense, rtol=1e-9, atol=1e-11)
    assert len(projector.factored) == 8  # q, k, v, attention output, FFN in and out, pooler, classifier


def test_identity_kind_gives_the_gradients_themselves():
    adapter, batch = mlp_problem(tokens=True)
    flat = adapter.flat_params()
    projector = Projector(adapter, ProjectionConfig(kind="identity", layer_dim=4))
    assert projector.dim == adapter.num_params
    projected = projector.project_batch(flat, batch)
    grads = per_example_grads(adapter, flat, batch)
    scores = projector.project_flat(grads[:2]) @ projected.T
    torch.testing.assert_close(scores, grads[:2] @ grads.T, rtol=1e-10, atol=1e-12)


def test_project_flat_refuses_a_wrong_width():
    adapter, _ = mlp_problem(tokens=False)
    with pytest.raises(DataError, match="same adapter"):
        Projector(adapter, ProjectionConfig()).project_flat(torch.zeros(2, adapter.num_params + 1))
