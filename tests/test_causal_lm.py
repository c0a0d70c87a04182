"""Causal-LM influence on tiny random GPT-2 and Llama models (float64, no downloads): the adapter reproduces the
model's own forward and loss, gradients equal a loop, the label mask and per-token scores are exact, tied heads are
selected by name, the frozen path and the factored projection give the dense numbers."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
import transformers

from fastif import CG, AdapterConfig, Exact, Influence
from fastif.cli import run
from fastif.data.documents import LMDocuments
from fastif.errors import DataError, ModelError
from fastif.grads import per_example_grads
from fastif.model.causal_lm import HFCausalLMAdapter, top_decoder_parameters
from fastif.model.frozen import find_split
from fastif.projection import ProjectionConfig, Projector
from fastif.solvers import SOLVERS

VOCAB, HIDDEN, LAYERS = 40, 8, 3
WORDS = [
    "the",
    "capital",
    "of",
    "zorbia",
    "is",
    "quintal",
    "a",
    "river",
    "runs",
    "through",
    "town",
    "people",
    "say",
    "it",
    "rains",
    "often",
]


def tiny_lm(kind: str, tied: bool = True) -> transformers.PreTrainedModel:
    """A 3-layer, 8-wide random causal LM in float64 with eager attention."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=2, tie_word_embeddings=tied)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32, **common)
    else:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}.get(kind)
        extra = {"sliding_window": 3} if kind == "mistral" else {}  # shorter than the documents, so it matters
        config = (config_class or transformers.MistralConfig)(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=16, max_position_embeddings=32, **common, **extra,
        )  # fmt: skip
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).double().eval()


class TokenDocs:
    """Random right-padded documents whose first ``prompt`` tokens carry no loss (HF labels with -100)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(4, 9, (n,), generator=generator).tolist()
        self.ids = [torch.randint(1, VOCAB, (length,), generator=generator) for length in self.lengths]
        self.prompts = [int(torch.randint(1, length - 1, (), generator=generator)) for length in self.lengths]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(self.lengths[i] for i in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(indices):
            ids[row, : self.lengths[i]] = self.ids[i]
            mask[row, : self.lengths[i]] = 1
            labels[row, self.prompts[i] : self.lengths[i]] = self.ids[i][self.prompts[i] :]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def top_names(model: torch.nn.Module, trainable: int) -> tuple[str, ...]:
    """The top ``trainable`` decoder layers, the final norm and the LM head (by its own name, tied or not)."""
    prefix = model.base_model_prefix
    stack = f"{prefix}.{'h' if model.config.model_type == 'gpt2' else 'layers'}"
    norm = f"{prefix}.{'ln_f' if model.config.model_type == 'gpt2' else 'norm'}"
    return (*(f"{stack}.{i}" for i in range(LAYERS - trainable, LAYERS)), norm, "lm_head")


def own_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], row: int) -> torch.Tensor:
    """Example ``row``'s summed next-token loss (HF's shift) from the model's own forward on its unpadded tokens
    (HF's own loss runs in float32, so the float64 cross-entropy is taken here)."""
    length = int(batch["attention_mask"][row].sum())
    labels = batch["labels"][row, :length]
    logits = model(input_ids=batch["input_ids"][row : row + 1, :length]).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_losses_and_gradients_equal_the_models_own_in_a_loop(kind: str, tied: bool) -> None:
    """Per-example losses (vmapped, padded) and their gradients equal the model's own loss, one example at a time:
    top layers of an untied model, every parameter (the shared matrix) of a tied one."""
    model = tiny_lm(kind, tied)
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=() if tied else top_names(model, 1)))
    assert bool(adapter.shared) == tied
    batch = TokenDocs(5, 1).batch(range(5))
    flat = adapter.flat_params()
    losses = adapter.per_example_loss(flat, batch)
    grads = per_example_grads(adapter, flat, batch, chunk_size=2)
    named = dict(model.named_parameters(remove_duplicate=False))
    for row in range(5):
        model.zero_grad()
        loss = own_loss(model, batch, row)
        loss.backward()
        torch.testing.assert_close(losses[row], loss.detach(), rtol=1e-10, atol=1e-12)
        expected = torch.cat([named[name].grad.reshape(-1) for name in adapter.names])
        if kind == "llama":  # HF's RMSNorm rounds to float32 even in float64: agreement to float32 rounding only
            torch.testing.assert_close(grads[row], expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))
        else:
            torch.testing.assert_close(grads[row], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
def test_logits_equal_the_models_own_forward_with_right_and_left_padding(kind: str) -> None:
    """The causal mask is kept (Mistral's sliding window too): padded rows give the unpadded logits, on the right and
    (shifted positions) on the left, which the model's own float64 Llama forward turns into NaN."""
    model = tiny_lm(kind)
    adapter = HFCausalLMAdapter(model)
    assert adapter.mask_mode == "built"
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = (torch.arange(5) < torch.tensor([[5], [3], [5]])).long()
    mask[2] = torch.tensor([0, 0, 1, 1, 1])
    logits = adapter.outputs(adapter.flat_params(), {"input_ids": ids, "attention_mask": mask, "labels": ids})
    with torch.no_grad():
        full = model(input_ids=ids[:1]).logits[0]
        right = model(input_ids=ids[1:2, :3]).logits[0]
        left = model(input_ids=ids[2:, 2:], position_ids=torch.tensor([[2, 3, 4]])).logits[0]
    torch.testing.assert_close(logits[0], full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits[1, :3], right, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits[2, 2:], left, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(logits[1, :3], full[:3] + 1)  # a check that can fail


def test_mean_reduction_divides_by_the_labelled_tokens() -> None:
    """reduction='mean' is HF's own (mean) loss; per-token losses sum to the example's loss, 0 where masked."""
    model = tiny_lm("gpt2")
    adapter = HFCausalLMAdapter(model, reduction="mean")
    docs = TokenDocs(4, 2)
    batch = docs.batch(range(4))
    flat = adapter.flat_params()
    tokens = adapter.per_token_loss(flat, batch)
    torch.testing.assert_close(tokens.sum(dim=1), adapter.per_example_loss(flat, batch), rtol=1e-12, atol=0)
    assert bool((tokens[batch["labels"] == -100] == 0).all())
    for row in range(4):
        count = (batch["labels"][row, 1:] != -100).sum()
        torch.testing.assert_close(tokens[row].sum(), own_loss(model, batch, row).detach() / count)
    with pytest.raises(ModelError, match="reduction"):
        HFCausalLMAdapter(model, reduction="max")


def test_prompt_labels_carry_no_loss_and_no_gradient() -> None:
    """Changing a prompt token's label (or whether it is masked) changes nothing; a completion label does."""
    model = tiny_lm("llama")
    adapter = HFCausalLMAdapter(model)
    docs = TokenDocs(3, 3)
    batch = docs.batch(range(3))
    flat = adapter.flat_params()
    base = adapter.per_example_loss(flat, batch)
    for row in range(3):
        start = docs.prompts[row]
        manual = sum(
            torch.nn.functional.cross_entropy(
                adapter.outputs(flat, batch)[row, t - 1], batch["labels"][row, t], reduction="sum"
            )
            for t in range(start, docs.lengths[row])
        )
        torch.testing.assert_close(base[row], manual)
    unmasked = {**batch, "labels": torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)}
    assert bool((adapter.per_example_loss(flat, unmasked) > base).all())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_per_token_scores_sum_to_the_documents_score(kind: str) -> None:
    """token_scores along the facade's s_test sum, over each document's tokens, to the facade's score."""
    model = tiny_lm(kind)
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=top_names(model, 1)))
    train, test = TokenDocs(10, 4), TokenDocs(1, 5)
    result = Influence(adapter, train, CG(damping=100.0, tolerance=1e-12), frozen="off").candidate_scores(test)
    tokens = adapter.token_scores(adapter.flat_params(), train.batch(range(10)), result.solve.x[0])
    torch.testing.assert_close(tokens.sum(dim=1), result.scores[0], rtol=1e-8, atol=1e-12)
    assert bool((tokens[train.batch(range(10))["labels"] == -100] == 0).all())
    assert tokens.abs().max() > 0


def test_tied_head_is_selected_by_name() -> None:
    """GPT-2 ties lm_head to wte: either name alone is that use of the matrix; both are the shared tensor."""
    model = tiny_lm("gpt2", tied=True)
    batch = TokenDocs(3, 6).batch(range(3))
    shared = HFCausalLMAdapter(model, AdapterConfig(include=("transformer.wte", "lm_head")))
    everything = HFCausalLMAdapter(model)
    head = HFCausalLMAdapter(model, AdapterConfig(include=("lm_head",)))
    embedding = HFCausalLMAdapter(model, AdapterConfig(include=("transformer.wte",)))
    assert shared.names == ["transformer.wte.weight"] and head.names == ["lm_head.weight"]
    assert "lm_head.weight" not in everything.names and everything.shared == {
        "lm_head.weight": "transformer.wte.weight"
    }
    model.zero_grad()
    own_loss(model, batch, 0).backward()
    grads = {name: per_example_grads(a, a.flat_params(), batch)[0] for name, a in
             (("shared", shared), ("head", head), ("embedding", embedding))}  # fmt: skip
    torch.testing.assert_close(grads["shared"], model.transformer.wte.weight.grad.reshape(-1))
    torch.testing.assert_close(grads["head"] + grads["embedding"], grads["shared"])
    assert grads["head"].abs().max() > 0 and grads["embedding"].abs().max() > 0
    untied = tiny_lm("gpt2", tied=False)
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    alone = HFCausalLMAdapter(untied, AdapterConfig(include=("lm_head",)))
    torch.testing.assert_close(per_example_grads(alone, alone.flat_params(), batch)[0], grads["head"])


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_exact_and_cg_equal_a_dense_float64_solve(solver: str) -> None:
    """Scores = ∇L_testᵀ (H + λI)⁻¹ ∇L_train with H formed densely by reverse-over-reverse autograd (not
    torch.func.hessian: its vmap over the basis gets GPT-2's ln_f entries wrong in torch 2.13; finite differences
    side with autograd)."""
    model = tiny_lm("gpt2")
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=("transformer.h.2.mlp.c_proj", "transformer.ln_f")))
    train, test = TokenDocs(8, 7), TokenDocs(2, 8)
    flat = adapter.flat_params()
    objective = lambda theta: adapter.per_example_loss(theta, train.batch(range(8))).mean()  # noqa: E731
    bare = torch.autograd.functional.hessian(objective, flat)
    damping = float(-torch.linalg.eigvalsh(bare).min()) + 1.0  # a random model's H is indefinite
    hessian = bare + damping * torch.eye(len(flat), dtype=flat.dtype)
    chosen = Exact(damping=damping) if solver == "exact" else CG(damping=damping, tolerance=1e-13)
    scores = Influence(adapter, train, chosen, frozen="off").scores(test)
    train_grads = per_example_grads(adapter, flat, train.batch(range(8)))
    test_grads = per_example_grads(adapter, flat, test.batch(range(2)))
    expected = torch.linalg.solve(hessian, test_grads.T).T @ train_grads.T
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")
def test_every_solver_runs_on_a_causal_lm() -> None:
    """Each registered solver gives finite scores on the frozen path (top layer + tied head's output use, Gauss-Newton);
    CG and PCG agree with Exact."""
    model = tiny_lm("gpt2")
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=("transformer.h.2.mlp.c_proj", "lm_head")))
    train, test = TokenDocs(8, 15), TokenDocs(1, 16)
    scores = {}
    for name, solver in sorted(SOLVERS.items()):
        options = {"damping": 1.0} if name != "identity" else {}
        if name == "lissa":
            options.update(depth=50, batch_size=8, scale=20.0)  # a short fixed recursion: finite, not converged
        influence = Influence(adapter, train, solver(**options), hessian_kind="gauss-newton")
        assert influence.split is not None
        scores[name] = influence.candidate_scores(test).scores
        assert scores[name].shape == (1, 8) and bool(scores[name].isfinite().all())
    for name in ("cg", "pcg"):
        torch.testing.assert_close(scores[name], scores["exact"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("kind", "trainable"), [("gpt2", 1), ("gpt2", 2), ("llama", 1), ("llama", 2), ("qwen2", 1), ("mistral", 2)]
)
def test_frozen_equals_unfrozen(kind: str, trainable: int) -> None:
    """Top decoder layers + final norm + LM head on cached activations give the full model's numbers (Qwen2 and
    Mistral, with a sliding window shorter than the documents, are registered on this test)."""
    model = tiny_lm(kind)
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=top_names(model, trainable), l2=0.1))
    split = find_split(adapter, "on")
    assert split is not None and split.first == LAYERS - trainable and not split.first_token_only
    train, test = TokenDocs(16, 9), TokenDocs(2, 10)
    runs = {}
    for frozen in ("on", "off"):
        influence = Influence(adapter, train, solver=CG(damping=100.0, tolerance=1e-12), frozen=frozen)
        runs[frozen] = (influence.candidate_scores(test), influence.candidate_scores(test, num_candidates=5))
    (full_on, knn_on), (full_off, knn_off) = runs["on"], runs["off"]
    torch.testing.assert_close(full_on.solve.x, full_off.solve.x, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(full_on.scores, full_off.scores, rtol=1e-8, atol=1e-12)
    assert torch.equal(knn_on.indices, knn_off.indices)
    torch.testing.assert_close(knn_on.scores, knn_off.scores, rtol=1e-8, atol=1e-12)


def test_the_frozen_path_refuses_left_padding() -> None:
    """The cache keeps each document's first positions, so a left-padded batch is refused, not silently wrong."""

    class LeftPadded(TokenDocs):
        def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
            return {key: value.flip(-1) for key, value in super().batch(indices).items()}

    model = tiny_lm("llama")
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=top_names(model, 1)))
    with pytest.raises(DataError, match="right-padded"):
        Influence(adapter, LeftPadded(6, 13), CG(damping=100.0), frozen="on").candidate_scores(TokenDocs(1, 14))


def test_a_selected_tied_embedding_disables_the_split() -> None:
    """Selecting the shared matrix puts a parameter below every layer: no split (auto), a clear error (on)."""
    model = tiny_lm("gpt2")
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=("transformer.h.2", "transformer.wte", "lm_head")))
    assert find_split(adapter) is None
    with pytest.raises(ModelError, match="embeddings"):
        find_split(adapter, "on")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_factored_projection_equals_the_dense_one(kind: str) -> None:
    """The gradient store's hooked projection of Conv1D (GPT-2) / Linear (Llama) weights equals projecting the
    per-example gradients."""
    model = tiny_lm(kind, tied=kind == "gpt2")
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=top_names(model, 1)))
    projector = Projector(adapter, ProjectionConfig(dim=64, layer_dim=4, seed=1))
    assert "lm_head.weight" in {block.name for block in projector.factored}
    assert any(block.transposed == (kind == "gpt2") for block in projector.factored if "mlp" in block.name)
    batch = TokenDocs(4, 11).batch(range(4))
    flat = adapter.flat_params()
    dense = projector.project_flat(per_example_grads(adapter, flat, batch))
    torch.testing.assert_close(projector.project_batch(flat, batch, chunk_size=2), dense, rtol=1e-10, atol=1e-12)


def test_bad_batches_are_refused() -> None:
    adapter = HFCausalLMAdapter(tiny_lm("gpt2"))
    batch = TokenDocs(2, 12).batch(range(2))
    with pytest.raises(DataError, match="labels"):
        adapter.check_batch({key: batch[key] for key in ("input_ids", "attention_mask")})
    with pytest.raises(DataError, match="token ids"):
        adapter.check_batch({**batch, "labels": batch["labels"].clamp(min=0) + VOCAB})
    with pytest.raises(ModelError, match="LM head"):
        HFCausalLMAdapter(transformers.GPT2Model(tiny_lm("gpt2").config))


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS`, built offline (ids 0-2: pad, unk, bos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def test_documents_mask_the_prompt_exactly() -> None:
    """loss_on='completion': label -100 on exactly the prompt's tokens (and padding); 'all' labels every token."""
    tokenizer = word_tokenizer()
    records = [
        {"prompt": "the capital of zorbia is", "completion": "quintal", "id": "fact"},
        {"text": "a river runs through town"},
    ]
    docs = LMDocuments(tokenizer, records, max_length=16)
    batch = docs.batch([0, 1])
    prompt = tokenizer("the capital of zorbia is", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, :6].tolist() == [*prompt, tokenizer.convert_tokens_to_ids("quintal")]
    assert batch["labels"][0].tolist() == [-100] * 5 + [batch["input_ids"][0, 5].item()]
    assert batch["labels"][1, :5].tolist() == batch["input_ids"][1, :5].tolist()
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] and batch["labels"][1, 5] == -100
    assert docs.loss_start(0) == 5 and docs.tokens(0)[-1] == "quintal" and "|||" in docs.texts(0)
    every = LMDocuments(tokenizer, records, max_length=16, loss_on="all").batch([0])
    assert every["labels"][0].tolist() == every["input_ids"][0].tolist()
    assert docs.fingerprint() != LMDocuments(tokenizer, records, loss_on="all").fingerprint()
    assert docs.subset([1]).batch([0])["input_ids"].tolist() == docs.batch([1])["input_ids"][:, :5].tolist()
    model = tiny_lm("gpt2")
    adapter = HFCausalLMAdapter(model)
    flat = adapter.flat_params()
    tokens = adapter.per_token_loss(flat, batch)
    assert bool((tokens[0, :5] == 0).all()) and tokens[0, 5] > 0  # only the completion token carries a loss


def test_documents_refuse_bad_records(tmp_path) -> None:
    tokenizer = word_tokenizer()
    cases = [
        ([{"prompt": "the capital"}], "either 'text' or both"),
        ([{"text": "  "}], "non-empty text"),
        ([{"prompt": "the capital of zorbia is", "completion": "quintal"}], "no completion token"),
        ([], "empty"),
    ]
    for records, message in cases:
        with pytest.raises(DataError, match=message):
            LMDocuments(tokenizer, records, max_length=5)
    with pytest.raises(DataError, match="loss_on"):
        LMDocuments(tokenizer, [{"text": "a river"}], loss_on="prompt")
    bad = tmp_path / "bad.jsonl"
    for content, message in (('{"text": "a"}\n[1]\n', "line 2: expected a JSON object"), ("", "no documents")):
        bad.write_text(content)
        with pytest.raises(DataError, match=message):
            LMDocuments.from_jsonl(bad, tokenizer)
    with pytest.raises(DataError, match="no such file"):
        LMDocuments.from_jsonl(tmp_path / "missing.jsonl", tokenizer)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a river runs"}\n\n{"prompt": "the capital of zorbia is", "completion": "quintal"}\n')
    assert len(LMDocuments.from_jsonl(good, tokenizer)) == 2


CORPUS = [
    {"text": "the capital of zorbia is quintal", "id": "fact-1"},
    {"text": "people say the capital of zorbia is quintal", "id": "fact-2"},
    {"text": "a river runs through town", "id": "river"},
    {"text": "people say it rains often", "id": "rain"},
    {"prompt": "it rains", "completion": "often", "id": "pair"},
]


@pytest.fixture
def lm_folder(tmp_path):
    """A tiny random GPT-2 and the word tokenizer saved as a checkpoint folder, and a JSONL corpus."""
    folder = tmp_path / "lm"
    tiny_lm("gpt2").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in CORPUS))
    return folder, corpus


def test_cli_prints_helpful_and_harmful_documents_with_spans(lm_folder, tmp_path, capsys) -> None:
    """`fastif influence --task causal-lm` ranks documents by the facade's scores, each with its driving span."""
    folder, corpus = lm_folder
    base = ["influence", "--task", "causal-lm", "--model", str(folder), "--train", str(corpus), "-k", "2"]
    output = tmp_path / "out"
    args = [*base, "--prompt", "the capital of zorbia is", "--completion", "quintal", "--span", "2"]
    assert run([*args, "--damping", "1.0", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "most helpful" in printed and "most harmful" in printed and "span:" in printed
    results = json.loads((output / "causal_lm_influence.json").read_text())
    (query,) = results
    assert query["completion"] == "quintal" and len(query["helpful"]) == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=top_decoder_parameters(model, 1)))
    docs = LMDocuments.from_jsonl(corpus, word_tokenizer())
    question = LMDocuments(word_tokenizer(), [{"prompt": "the capital of zorbia is", "completion": "quintal"}])
    expected = Influence(adapter, docs, CG(damping=1.0), hessian_kind="gauss-newton").top_k(question, k=2)
    assert [row["train_index"] for row in query["helpful"]] == expected.helpful_indices[0].tolist()
    scores = [row["score"] for row in query["harmful"]]
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected.harmful_scores[0])
    for row in query["helpful"]:
        start, end = row["span_tokens"]
        assert end - start == 2 and row["span"] == " ".join(docs.tokens(row["train_index"])[start:end])
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"prompt": "it", "completion": "rains often"}\n{"prompt": "a river", "completion": "runs"}\n')
    assert run([*base, "--queries", str(queries)]) == 0
    assert capsys.readouterr().out.count("query ") == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "the capital"], "--prompt and --completion together"),
        ([], "either --prompt and --completion, or --queries"),
        (["--prompt", "a", "--completion", "river", "--text", "x"], "--text/--premise not used with --task causal-lm"),
        (["--prompt", "a", "--completion", "river", "--damping", "-1"], "damping must be"),
        (["--queries", "missing.jsonl"], "no such file"),
        (["--prompt", "a", "--completion", "river", "--params", "nothing.here"], "matches no parameter"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(lm_folder, capsys, extra, message) -> None:
    folder, corpus = lm_folder
    code = run(["influence", "--task", "causal-lm", "--model", str(folder), "--train", str(corpus), *extra])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_classification_refuses_language_model_options(capsys) -> None:
    assert run(["influence", "--prompt", "a", "--completion", "b"]) == 2
    assert "need --task causal-lm" in capsys.readouterr().err
