"""The embedded LLM suite (``backbone=embedded_llama``): a small Llama built offline on
MergeBench-shaped synthetic tasks.

``build`` (``EmbeddedLlamaSpec``; tokenizer, pre-training, fine-tuning, cache, the suite's
own scorer), ``data`` (the categories and the pre-training text), ``adapter``
(``EmbeddedLlamaBackbone``), ``pool`` (``EmbeddedLlamaTaskPool``) and ``lm_eval_tasks/``
(the suite's lm-eval task YAMLs, package data).
"""
