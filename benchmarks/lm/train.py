"""Train the benchmark's small GPT-2-style model from scratch on the fact corpus, seeded, and cache it.

The model is cached under ``fastif.files.cache_dir("lm-bench")`` in a folder named after a fingerprint of the corpus
and the training settings, so a second run loads it. Training stops at the first epoch after which at least
``target_accuracy`` of the planted facts are completed correctly (greedy next token on the held-out query), or at
``max_epochs``: attribution of facts the model never learned would be meaningless.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastif.files import atomic_dir, cache_dir
from fastif.fingerprint import fingerprint_records

from .corpus import PAD_ID, Corpus, word_tokenizer

METRICS_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation: a GPT-2 of ``layers`` blocks of width ``width``; AdamW with ``weight_decay``,
    ``lr`` warmed up over ``warmup_steps`` then decayed linearly to 0 at ``max_epochs``; ``dropout`` while training
    (influence and the metrics run the model in eval mode, without it)."""

    seed: int = 0
    layers: int = 2
    width: int = 128
    heads: int = 4
    positions: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    dropout: float = 0.1
    warmup_steps: int = 50
    max_epochs: int = 60
    target_accuracy: float = 0.9


@dataclass
class TrainedLM:
    """The trained model (eval mode, eager attention), its tokenizer, and what training measured."""

    model: nn.Module
    tokenizer: Any
    metrics: dict[str, Any]
    folder: Path


def gpt2_config(config: TrainConfig, tokenizer: Any) -> Any:
    """A GPT-2 config sized by ``config`` over the tokenizer's vocabulary, embeddings tied to the head."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.positions,
        n_embd=config.width,
        n_layer=config.layers,
        n_head=config.heads,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def encode_documents(tokenizer: Any, texts: list[str], positions: int) -> list[list[int]]:
    """Token ids of each text, cut to the model's ``positions``."""
    return [ids[:positions] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_batch(rows: list[list[int]], pad: int = PAD_ID) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) of token rows."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def query_rows(tokenizer: Any, queries: list[dict[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Each query's prompt ids and completion ids (tokenised apart, as the documents' words are)."""
    prompts = tokenizer([q["prompt"] for q in queries], add_special_tokens=False)["input_ids"]
    completions = tokenizer([q["completion"] for q in queries], add_special_tokens=False)["input_ids"]
    return prompts, completions


@torch.no_grad()
def fact_accuracy(model: nn.Module, tokenizer: Any, queries: list[dict[str, str]]) -> list[bool]:
    """Per query, whether the greedy next token after the prompt is the completion's first token."""
    prompts, completions = query_rows(tokenizer, queries)
    batch = pad_batch(prompts)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    predicted = logits[torch.arange(len(prompts)), last].argmax(-1)
    return [int(p) == row[0] for p, row in zip(predicted.tolist(), completions, strict=True)]


def schedule(optimiser: Any, config: TrainConfig, total_steps: int) -> Any:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        decay = (total_steps - step) / (total_steps - config.warmup_steps)
        return min((step + 1) / config.warmup_steps, max(0.0, decay))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _epoch(
    model: nn.Module, optimiser: Any, schedule: Any, rows: list[list[int]], config: TrainConfig, rng: random.Random
) -> tuple[float, int]:
    """One shuffled pass; returns the mean training loss and the number of optimiser steps."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    losses = []
    for start in range(0, len(order), config.batch_size):
        batch = pad_batch([rows[i] for i in order[start : start + config.batch_size]])
        loss = model(**batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses), len(losses)


def train_model(corpus: Corpus, config: TrainConfig, log: Any = print) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Train from scratch (seeded) until ``target_accuracy`` of the facts are learned or ``max_epochs`` pass."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(config.seed)
    tokenizer = word_tokenizer(corpus.vocabulary)
    model = GPT2LMHeadModel(gpt2_config(config, tokenizer)).train()
    rows = encode_documents(tokenizer, [d["text"] for d in corpus.documents], config.positions)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = schedule(optimiser, config, -(-len(rows) // config.batch_size) * config.max_epochs)
    rng, curve, steps, start, load_before = random.Random(config.seed), [], 0, time.perf_counter(), os.getloadavg()
    for epoch in range(1, config.max_epochs + 1):
        loss, count = _epoch(model, optimiser, warmup, rows, config, rng)
        steps += count
        accuracy = sum(fact_accuracy(model.eval(), tokenizer, corpus.queries)) / len(corpus.facts)
        model.train()
        curve.append({"epoch": epoch, "loss": round(loss, 4), "fact_accuracy": accuracy})
        log(f"  epoch {epoch}: loss {loss:.3f}, facts {accuracy:.2f}, {time.perf_counter() - start:.0f}s")
        if accuracy >= config.target_accuracy:
            break
    metrics = {
        "epochs": epoch,
        "steps": steps,
        "final_loss": curve[-1]["loss"],
        "fact_accuracy": curve[-1]["fact_accuracy"],
        "target_met": curve[-1]["fact_accuracy"] >= config.target_accuracy,
        "train_seconds": round(time.perf_counter() - start, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "curve": curve,
    }
    return model.eval(), tokenizer, metrics


def model_folder(corpus: Corpus, config: TrainConfig) -> Path:
    """The cache folder of the model trained with ``config`` on ``corpus``."""
    key = fingerprint_records([{"corpus": corpus.fingerprint(), "train": asdict(config), "torch": torch.__version__}])
    return cache_dir("lm-bench") / f"gpt2-{key[:16]}"


def trained_model(corpus: Corpus, config: TrainConfig | None = None, log: Any = print) -> TrainedLM:
    """The cached model for ``corpus`` and ``config``, trained (and cached atomically) on first use."""
    from transformers import GPT2LMHeadModel

    config = config or TrainConfig()
    folder = model_folder(corpus, config)
    if not (folder / METRICS_FILE).is_file():
        model, tokenizer, metrics = train_model(corpus, config, log)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / METRICS_FILE).write_text(json.dumps({"config": asdict(config), **metrics}, indent=2))

        atomic_dir(folder, write)
    metrics = json.loads((folder / METRICS_FILE).read_text())
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", use_safetensors=True)
    return TrainedLM(model.eval(), word_tokenizer(corpus.vocabulary), metrics, folder)
