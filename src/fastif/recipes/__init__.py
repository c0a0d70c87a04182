"""Recipes: domains outside the core (the NLI/MiniLM recipe, the tabular example). The pipeline finds a recipe through
the ``fastif.recipes`` entry points; nothing below the recipes imports them."""
