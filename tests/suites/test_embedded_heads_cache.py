"""The zero-shot heads of a build embed the canonical inputs once and reuse them for every
task (featcal.suites.embedded.build.zero_shot_head's ``canonical`` dict): the heads must be
bit-for-bit those computed task by task, and the base must run on them only once."""
from __future__ import annotations

import torch

import featcal.suites.embedded.build as eb
from featcal.suites.embedded.data import canonical_inputs, load_digits
from featcal.suites.embedded.spec import EmbeddedSpec


def test_canonical_embeddings_computed_once_same_heads(monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    spec = EmbeddedSpec(tasks=("inverted", "rot90", "mirror"), width=32, layers=1, heads=2, projection_dim=16)
    torch.manual_seed(0)
    base = CLIPVisionModelWithProjection(eb.clip_config(spec)).eval()
    images8, digits = load_digits()
    data = {t: None for t in spec.tasks}  # not read with head_source "canonical"
    dev = torch.device("cpu")
    plain = {t: eb.zero_shot_head(spec, t, base, data[t], images8, digits, dev) for t in spec.tasks}

    calls = []
    orig = eb._embed
    monkeypatch.setattr(eb, "_embed", lambda *a, **k: calls.append(1) or orig(*a, **k))
    canonical: dict = {}
    cached = {t: eb.zero_shot_head(spec, t, base, data[t], images8, digits, dev, canonical) for t in spec.tasks}
    assert len(calls) == 1  # one embedding pass for all three tasks
    for t in spec.tasks:
        assert torch.equal(cached[t], plain[t]), t
    x, _ = canonical_inputs(spec, images8, digits)
    assert torch.equal(canonical["embeddings"], orig(base, x, dev))  # what is reused is the base's embedding
