"""FastIF's applications 3 and 4: correcting model errors and fine-tuning on unseen data by one SGD step at a time
on the most influential points (:mod:`.run`), with its config (:mod:`.config`), summary tables and plot
(:mod:`.summary`), and the frozen-bottom cache of the trainable top (:mod:`.head`). See docs/experiments.md."""
