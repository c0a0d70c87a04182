"""Task (c) set-up: the embedded MiniLM NLI classifier, its MNLI data, loaders for the peers, and exact references.

Influence is taken over the **pooler + classifier** (148,995 parameters), the smaller subset the study in
docs/study.md uses: on a shared 2-core CPU the top two encoder layers (3.7M parameters) made a full-data Hessian
reference unaffordable. The reference is exact influence for those parameters: the [CLS] hidden state that the pooler
reads does not depend on them, so the core frozen path (``frozen="on"``) computes it once per example and CG on the
full 8,000-point Hessian, and the per-example gradients of all 8,000 points, run on the model's own pooler +
classifier alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fastif import CG, AdapterConfig, HFClassifierAdapter, Influence, ScoreConfig
from fastif.data.text import TextPairData
from fastif.model.hf import L2_EXCLUDE
from fastif.recipes.nli import NLI_DAMPING, NLITrainConfig, load_embedded, nli_label_scheme, train_nli_classifier

INCLUDE = ("bert.pooler", "classifier")
TRACKED_MODULES = ("bert.pooler.dense", "classifier")


@dataclass(frozen=True)
class NLISpec:
    """Sizes, damping, label count (3, or 2: entailment vs not) and seeds of task (c)."""

    n_train: int = 8000
    n_test: int = 10
    test_pool: int = 400
    damping: float = NLI_DAMPING
    max_length: int = 128
    seed: int = 0
    num_labels: int = 3


@dataclass
class NLIProblem:
    """The trained model, the length-sorted training set (with original ids), the test set and the objective."""

    spec: NLISpec
    model: nn.Module
    train: TextPairData
    train_ids: np.ndarray  # train[i] is MNLI-train pair train_ids[i]
    test: TextPairData
    l2: float
    info: dict

    def adapter(self) -> HFClassifierAdapter:
        """fastif's adapter: pooler + classifier, the training L2 term on weights only."""
        return HFClassifierAdapter(self.model, AdapterConfig(include=INCLUDE, l2=self.l2, l2_exclude=L2_EXCLUDE))

    @property
    def shift(self) -> float:
        """l2 + damping: the diagonal shift the peers get (they cannot exclude biases from the L2 term)."""
        return self.l2 + self.spec.damping


def build_problem(spec: NLISpec) -> NLIProblem:
    """Load (or train once, cached) the embedded NLI model; sort the training pairs by length to cut padding."""
    trained = train_nli_classifier(NLITrainConfig(num_labels=spec.num_labels), progress=False)
    tokenizer, labels = trained.tokenizer, nli_label_scheme(spec.num_labels)[0]
    records = load_embedded("mnli_train", spec.num_labels)[: spec.n_train]
    everything = TextPairData(records, tokenizer, spec.max_length, labels)
    order = np.argsort(everything.lengths, kind="stable")
    train = everything.subset(order.tolist())
    pool = load_embedded("mnli_test", spec.num_labels)[: spec.test_pool]
    picked = np.sort(np.random.default_rng(spec.seed).choice(len(pool), size=spec.n_test, replace=False))
    test = TextPairData([pool[i] for i in picked], tokenizer, spec.max_length, labels)
    info = {"model_path": str(trained.path), "metrics": trained.metrics, "test_pool_indices": picked.tolist()}
    return NLIProblem(spec, trained.model.eval(), train, order, test, trained.config.l2, info)


# ---------------------------------------------------------------------------------------------- loaders for peers


class Examples(torch.utils.data.Dataset):
    """A torch Dataset view of a TextPairData: item i is example i as unpadded tensors (for the peers' loaders)."""

    def __init__(self, data: TextPairData, indices: Sequence[int] | None = None) -> None:
        self.data = data
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: value[0] for key, value in self.data.batch([self.indices[i]]).items()}


def pad_collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Right-pad a list of single examples to the longest (pad id 0, as MiniLM's tokenizer) and stack them."""
    width = max(int(item["input_ids"].shape[0]) for item in items)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        batch[key] = torch.stack([nn.functional.pad(item[key], (0, width - item[key].shape[0])) for item in items])
    batch["labels"] = torch.stack([item["labels"] for item in items])
    return batch


def tuple_batch(batch: dict[str, Tensor]) -> list[Tensor]:
    """``[input_ids, attention_mask, token_type_ids, labels]``: the positional form captum and dattri take (a list:
    dattri's Arnoldi cache assigns into it)."""
    return [batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["labels"]]


def tuple_loader(data: TextPairData, indices: Sequence[int] | None, batch_size: int) -> DataLoader:
    """Batches of ``indices`` (in order) as padded positional lists, labels last."""
    return DataLoader(
        Examples(data, indices), batch_size=batch_size, shuffle=False, collate_fn=lambda b: tuple_batch(pad_collate(b))
    )


class LogitsModel(nn.Module):
    """``model(input_ids, attention_mask, token_type_ids) -> logits``: the positional interface captum calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def fresh_model(problem: NLIProblem) -> nn.Module:
    """A private copy of the trained model (peers wrap or hook the modules they are given)."""
    return copy.deepcopy(problem.model).eval()


# ---------------------------------------------------------------------------------------------- exact reference


def exact_reference(problem: NLIProblem) -> dict[str, Any]:
    """Exact scores [n_test, n_train]: CG on the full Hessian (relative residual 1e-8) and every training gradient,
    on the core frozen path (the cached [CLS] vector feeds the model's own pooler + classifier)."""
    n = len(problem.train)
    influence = Influence(
        problem.adapter(),
        problem.train,
        CG(damping=problem.spec.damping, max_iterations=500, tolerance=1e-8),
        ScoreConfig(method="grad", batch_size=1024, chunk_size=256),
        hessian_batch_size=n,
        frozen="on",
    )
    result = influence.candidate_scores(problem.test)
    info = {k: v for k, v in result.solve.info.items() if not isinstance(v, list | torch.Tensor)}
    return {"scores": result.scores.numpy(), "cg": info}


def check_head_equivalence(problem: NLIProblem, count: int = 4) -> float:
    """Max relative difference between the frozen path's and the full model's per-example gradients (~1e-6)."""
    from fastif.grads import per_example_grads

    full = problem.adapter()
    indices = list(range(count))
    reference = per_example_grads(full, full.flat_params(), problem.train.batch(indices))
    influence = Influence(full, problem.train.subset(indices), frozen="on")
    head = influence.work_adapter
    ours = per_example_grads(head, head.flat_params(), influence.train_view.batch(indices))
    return float((reference - ours).norm() / reference.norm())
