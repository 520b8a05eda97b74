"""The embedded suites: small models and tasks built offline, on the CPU, deterministically.

One package per suite, each holding its spec (``spec``: every knob; its hash names the
cache folder), its data (``data``), its build (``build``: pre-training, fine-tuning, the
cache folder), its model adapter (``adapter``) and its task pool (``pool``):

* ``featcal.suites.embedded``: a CLIP-architecture vision tower on scikit-learn's digits
  (``backbone=embedded``, the default);
* ``featcal.suites.embedded_t5``: a small T5 on synthetic text-to-text tasks;
* ``featcal.suites.embedded_llama``: a small Llama on MergeBench-shaped synthetic tasks.

``featcal.suites.build`` is their shared machinery: pinned child processes (the same bytes
on every x86-64 CPU with AVX2), the manifest and the build's identity. A suite may import
the model layer (``featcal.backbone``) and the task pools (``featcal.tasks``); neither of
them imports a suite.
"""
