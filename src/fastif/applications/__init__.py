"""FastIF's applications: simulatability, fine-tuning on influential points (correct / augment) and the influence
graph. Each takes a model, datasets and its config; recipes (e.g. :mod:`fastif.recipes.nli.apps`) supply those."""
