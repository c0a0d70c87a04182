"""Fact-tracing benchmark for causal language models: a seeded corpus with planted facts, a small GPT-2 trained here,
attribution methods through the influence facade, and MRR / Recall@10 / tail-patch metrics."""
