"""Model stage: the flat-θ adapters (:mod:`.adapter`), Hugging Face loading and layer selection (:mod:`.hf`),
and batched prediction (:mod:`.predict`)."""
