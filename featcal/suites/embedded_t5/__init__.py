"""The embedded text-to-text suite (``backbone=embedded_t5``): a small T5 built offline on
synthetic text tasks.

``spec`` (``EmbeddedT5Spec``), ``data`` (the tasks and the pre-training objectives),
``build`` (tokenizer, pre-training, fine-tuning, cache), ``adapter``
(``EmbeddedT5Backbone``), ``pool`` (``EmbeddedT5TaskPool``).
"""
