"""FastIF's applications 3 and 4: correcting model errors and fine-tuning on unseen data by one SGD step at a time
on the most influential points (:mod:`.run`, on the core frozen-bottom path), with its config (:mod:`.config`) and
summary tables and plot (:mod:`.summary`). See docs/experiments.md."""
