"""Smoke test of the causal-LM fact-tracing benchmark (benchmarks/lm): the metrics on hand-made rankings and a
constructed tail-patch case, the corpus's ground truth, and one end-to-end run on a tiny corpus and a 1-layer
model trained for a handful of steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lm import corpus as lm_corpus
from benchmarks.lm import metrics, run
from benchmarks.lm.methods import MethodsConfig, bm25_scores, rankings
from benchmarks.lm.report import goals, markdown_report
from benchmarks.lm.train import TrainConfig, pad_batch

TINY = run.Profile(
    lm_corpus.CorpusConfig(num_facts=4, filler_documents=8),
    TrainConfig(layers=1, width=16, heads=2, batch_size=4, max_epochs=2, target_accuracy=1.0),
    MethodsConfig(solvers=("cg", "ekfac"), hessian_examples=None, cg_iterations=3, trace_probes=1, arnoldi_rank=2),
)


def test_reciprocal_rank_and_recall_on_hand_made_rankings():
    assert metrics.reciprocal_rank([5, 2, 7, 1], [7, 1]) == pytest.approx(1 / 3)
    assert metrics.reciprocal_rank([5, 2], [9]) == 0.0
    assert metrics.recall_at_k([4, 9, 3, 8], [9, 8, 6], k=3) == pytest.approx(1 / 3)
    assert metrics.recall_at_k([4, 9, 3, 8], [9, 8, 6], k=4) == pytest.approx(2 / 3)
    found = metrics.tracing_metrics([[0, 1, 2], [3, 2, 1]], [[0], [1, 2]], k=2)
    assert found == {"mrr": pytest.approx((1 + 1 / 2) / 2), "recall@2": pytest.approx((1 + 1 / 2) / 2)}


def test_summary_counts_positive_gains():
    found = metrics.summary([1.0, -1.0, 3.0, 5.0])
    assert found["mean"] == 2.0 and found["median"] == 2.0 and found["fraction_positive"] == 0.75
    assert found["sem"] == pytest.approx(found["std"] / 2)


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=12, n_positions=16, n_embd=8, n_layer=1, n_head=2, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def test_tail_patch_gain_is_first_order_lr_times_squared_gradient(tiny_model):
    """Stepping on the query itself raises its log-probability by lr·‖∇‖² to first order; stepping up lowers it."""
    batch = pad_batch([[1, 2, 3, 4, 5]])
    query = {**batch, "labels": torch.tensor([[-100, -100, -100, -100, 5]])}
    params = dict(tiny_model.named_parameters())
    loss = metrics.mean_token_loss(tiny_model, params, query)
    squared = sum(float((g * g).sum()) for g in torch.autograd.grad(loss, list(params.values())))
    lr = 1e-4
    gain = float(metrics.tail_patch_gain(tiny_model, query, query, lr)[0])
    assert gain == pytest.approx(lr * squared, rel=1e-2)
    assert float(metrics.tail_patch_gain(tiny_model, query, query, -lr)[0]) < 0


def test_corpus_plants_each_fact_in_its_documents():
    corpus = lm_corpus.build_corpus(TINY.corpus)
    assert len(corpus.documents) == 8 + 4 * 3 and len(corpus.queries) == 4
    for fact, documents in zip(corpus.facts, corpus.fact_documents, strict=True):
        holding = [i for i, d in enumerate(corpus.documents) if f" {fact.object}" in " " + d["text"]]
        assert sorted(documents) == holding and len(holding) == 3
        assert not any(fact.prompt in corpus.documents[i]["text"] for i in holding)  # the query is held out
    tokenizer = lm_corpus.word_tokenizer(corpus.vocabulary)
    assert tokenizer(corpus.facts[0].completion, add_special_tokens=False)["input_ids"] != [1]  # not [UNK]
    assert lm_corpus.build_corpus(TINY.corpus).fingerprint() == corpus.fingerprint()


def test_bm25_ranks_the_fact_documents_first():
    corpus = lm_corpus.build_corpus(TINY.corpus)
    texts = [q["prompt"] + q["completion"] for q in corpus.queries]
    ranked = rankings(bm25_scores([d["text"] for d in corpus.documents], texts).scores)
    assert metrics.tracing_metrics(ranked, corpus.fact_documents, k=3) == {"mrr": 1.0, "recall@3": 1.0}


def test_end_to_end_run_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path))
    payload = run.run(TINY, log=lambda _: None)
    methods = payload["methods"]
    assert set(methods) == {
        "gradient-cosine", "gradient-dot", "influence-cg", "influence-ekfac", "bm25", "random",
    }  # fmt: skip
    for found in methods.values():
        assert 0 < found["mrr"] <= 1 and 0 <= found["recall@10"] <= 1
        assert len(found["tail_patch_per_query"]) == 4
    assert payload["influence_setup"]["damping"] > 0
    assert not payload["influence_setup"]["frozen_path"]  # one block, all selected: no constant bottom to cache
    assert list(tmp_path.glob("lm-bench/gpt2-*/model.safetensors"))
    assert "| influence-cg |" in markdown_report(payload) and "met" in str(goals(payload))
