"""Smoke test of the speed/quality study (benchmarks/study) on a tiny random BERT: the helpers agree with the library
and every part runs end to end, writing its results JSON and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"
sys.path.insert(0, str(STUDY))

import common  # noqa: E402
import part1_stest_tradeoff  # noqa: E402
import part2_knn_recall  # noqa: E402
import part3_fastif_vs_original  # noqa: E402
import part4_damping  # noqa: E402

from fastif.grads import dataset_grads  # noqa: E402
from fastif.solvers import Exact, LiSSA, LiSSAConfig  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    """The study set-up around a 2-layer, 16-wide random BERT: 48 training pairs, 40 test pairs."""
    from transformers import BertConfig, BertForSequenceClassification

    from fastif.recipes.nli import load_minilm_tokenizer

    tokenizer = load_minilm_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=3,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(config).eval()
    return common.load_setup(48, 40, model=model, tokenizer=tokenizer, l2=0.05)


def test_cached_head_matches_full_model(setup):
    assert setup.adapter.num_params == 16 * 16 + 16 + 16 * 3 + 3
    assert common.equivalence_check(setup) < 1e-5


def test_chain_snapshots_match_run_chain_and_lanczos_matches_exact(setup):
    hessian = setup.hessian()
    vectors = dataset_grads(setup.adapter, setup.adapter.flat_params(), setup.test_subset([0, 1]))
    lissa = LiSSA(LiSSAConfig(damping=0.5, depth=12, batch_size=2, tail_average=0.5)).fit(hessian)
    snap = common.chain_snapshots(lissa, vectors, 1, [6, 12], tail_average=0.5)
    torch.testing.assert_close(snap["tail"][12], lissa.run_chain(vectors, 1)[0], rtol=1e-5, atol=1e-7)
    solves = common.lanczos_solves(hessian, vectors, [0.5, 5.0], iterations=60)
    for damping in (0.5, 5.0):
        exact = Exact(damping=damping).fit(hessian).solve(vectors).x
        assert all(solves[damping]["positive_definite"])
        torch.testing.assert_close(solves[damping]["x"], exact, rtol=1e-3, atol=1e-4 * float(exact.abs().max()))


def test_every_part_runs(setup, tmp_path):
    parts = {
        "p1": (part1_stest_tradeoff, "--damping 0.5 --batch-sizes 1 2 --depths 4 8 --chains 2 --tests 2"),
        "p2": (
            part2_knn_recall,
            "--damping 0.5 --correct 2 --wrong 2 --depth 5 --batch-size 4 --ks 2 8 48 --ms 2 5",
        ),
        "p3": (
            part3_fastif_vs_original,
            "--damping 0.5 --correct 2 --wrong 1 --timed 1 --original-batch 8 --original-depth 6 --fast-depth 6 "
            "--tuned-depth 4 --ks 5 10 --workers 1 --full-model-steps 1",
        ),
        "p4": (
            part4_damping,
            "--dampings 0.1 1 10 --lissa-dampings 1 --correct 1 --wrong 1 --lanczos 30 --lissa-depth 20 "
            "--original-depth 5 --original-batch 8 --top 3",
        ),
    }
    for name, (module, options) in parts.items():
        module.run(module.parse_args([*options.split(), "--output", str(tmp_path / f"{name}.json")]), setup)
    for name in ("p1", "p2", "p3", "p4"):
        results = json.loads((tmp_path / f"{name}.json").read_text())
        assert results["environment"]["loadavg_1_5_15"] and "command" in results["environment"]
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    p3 = json.loads((tmp_path / "p3.json").read_text())
    assert {a["k"] for a in p3["agreement"]} == {5, 10}
    p4 = json.loads((tmp_path / "p4.json").read_text())
    assert p4["cg_check"]["max_relative_difference"] < 1e-3
