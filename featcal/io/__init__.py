"""Checkpoint and data IO, below the model layer: safetensors shards read lazily and
written incrementally (``safetensors``), causal LMs loaded whole or kept on disk and read
block by block (``lazy``), model sources resolved from local folders or the Hugging Face hub
(``hub``), datasets resolved the same way (``datasets``). Imports nothing of featcal above
``featcal.errors`` / ``featcal.utils``."""
