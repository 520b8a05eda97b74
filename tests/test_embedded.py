"""The embedded benchmark: deterministic cached build, corruption detection, loaders, splits."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import featcal.tasks.embedded as emb
from featcal.backbone.clip import load_clip_vision
from featcal.tasks.base import ClassEmbeddingHead
from featcal.tasks.embedded import (
    EmbeddedBackbone,
    EmbeddedSpec,
    EmbeddedTaskPool,
    ensure_built,
    expected_split_sizes,
    read_manifest,
    validate_cache,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"

# a tiny build (~1-2 s): 2 tasks, a 1-block width-16 tower, a few steps
TINY = dict(
    tasks=["digits", "patch_shuffle"],
    width=16,
    layers=1,
    heads=2,
    projection_dim=16,
    n_test=100,
    n_train=80,
    pretrain_steps=6,
    pretrain_batch=32,
    finetune_steps=4,
    finetune_batch=16,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    spec = EmbeddedSpec.from_config(TINY)
    folder = ensure_built(spec, cache, device="cpu", progress=False)
    return spec, cache, folder


def _hashes(folder: Path) -> dict[str, str]:
    return {k: v["sha256"] for k, v in read_manifest(folder)["files"].items()}


def _yaml(name: str):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.create({"backbone": cfg})


# ---- config ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["embedded", "embedded_small"])
def test_yaml_split_sizes_match_code(name):
    cfg = _yaml(name)
    spec = OmegaConf.to_container(cfg.backbone.spec, resolve=True)
    sizes = expected_split_sizes(spec)
    assert OmegaConf.to_container(cfg.backbone.train_sizes) == sizes["train"]
    assert OmegaConf.to_container(cfg.backbone.test_sizes) == sizes["test"]
    # budgets up to 256 must fit every train split of the default benchmark
    if name == "embedded":
        assert min(sizes["train"].values()) >= 256
        assert len(spec["tasks"]) >= 6


def test_default_yaml_is_the_default_spec():
    spec = OmegaConf.to_container(_yaml("embedded").backbone.spec, resolve=True)
    assert EmbeddedSpec.from_config(spec) == EmbeddedSpec()


def test_spec_rejects_unknown_keys_and_tasks():
    with pytest.raises(ValueError, match="unknown embedded spec key"):
        EmbeddedSpec.from_config({"widht": 8})
    with pytest.raises(ValueError, match="unknown embedded task"):
        EmbeddedSpec.from_config({"tasks": ["digits", "nope"]})
    with pytest.raises(ValueError, match="disagree"):
        EmbeddedBackbone(tasks=["digits"], spec={"tasks": ["inverted"]})


def test_hydra_instantiation_from_yaml(built, tmp_path):
    spec, cache, folder = built
    cfg = _yaml("embedded_small")
    cfg.backbone.spec = OmegaConf.create(spec.to_dict())
    cfg.backbone.cache_dir = str(cache)
    adapter = instantiate(OmegaConf.to_container(cfg.backbone.adapter, resolve=True))
    pool = instantiate(OmegaConf.to_container(cfg.backbone.taskpool, resolve=True))
    assert isinstance(adapter, EmbeddedBackbone) and isinstance(pool, EmbeddedTaskPool)
    assert adapter.tasks == pool.names == TINY["tasks"]
    assert adapter.spec == spec
    assert adapter.folder == folder  # the already-built cache, no rebuild


# ---- build and cache --------------------------------------------------------------------
def test_build_is_deterministic(built, tmp_path):
    spec, _, folder = built
    other = ensure_built(spec, tmp_path, device="cpu", progress=False)
    assert other != folder
    assert _hashes(other) == _hashes(folder)


def test_cache_is_reused(built, recwarn):
    spec, cache, folder = built
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    calls = []
    real = emb.build
    emb.build = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert ensure_built(spec, cache) == folder
    finally:
        emb.build = real
    assert calls == []
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime
    assert not [w for w in recwarn.list if "rebuilding" in str(w.message)]


def _truncate(folder):
    p = folder / "experts" / "digits" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _flip(folder):
    p = folder / "data" / "patch_shuffle.safetensors"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))


def _flip_head(folder):
    p = folder / "heads.safetensors"
    b = bytearray(p.read_bytes())
    b[len(b) // 2 + 7] ^= 0x01
    p.write_bytes(bytes(b))


def _no_manifest(folder):
    (folder / "manifest.json").unlink()


def _bad_manifest(folder):
    (folder / "manifest.json").write_text("{not json")


def _missing_file(folder):
    (folder / "base" / "config.json").unlink()


def _manifest_drops_entry(folder):
    m = read_manifest(folder)
    del m["files"]["data/digits.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "corrupt", [_truncate, _flip, _flip_head, _no_manifest, _bad_manifest, _missing_file, _manifest_drops_entry]
)
def test_corrupt_cache_is_rebuilt(built, tmp_path, corrupt):
    spec, cache, folder = built
    reference = _hashes(folder)
    mine = ensure_built(spec, tmp_path, device="cpu", progress=False)
    corrupt(mine)
    assert validate_cache(mine, spec) is not None
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = ensure_built(spec, tmp_path, device="cpu", progress=False)
    assert again == mine
    assert validate_cache(mine, spec) is None
    assert _hashes(mine) == reference
    # no temporary or trash folders left behind
    assert [p.name for p in mine.parent.iterdir() if p.is_dir()] == [mine.name]


def test_concurrent_builders_build_once(tmp_path):
    spec = EmbeddedSpec.from_config({**TINY, "tasks": ["digits"], "pretrain_steps": 3, "finetune_steps": 2})
    calls = []
    real = emb.build

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    emb.build = counting
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_built(spec, tmp_path, device="cpu", progress=False))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        emb.build = real
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and validate_cache(results[0], spec) is None


# ---- loading ---------------------------------------------------------------------------
def test_models_load_through_load_clip_vision(built):
    from transformers import CLIPVisionModelWithProjection

    spec, cache, folder = built
    adapter = EmbeddedBackbone(spec=spec.to_dict(), cache_dir=str(cache))
    base = adapter.load_base()
    expert = adapter.load_expert("patch_shuffle")
    direct = load_clip_vision(str(folder / "experts" / "patch_shuffle"))
    assert isinstance(base, CLIPVisionModelWithProjection)
    assert len(adapter.blocks(base)) == spec.layers
    assert base.config.hidden_size == spec.width and base.config.image_size == spec.image_size
    for k, v in expert.state_dict().items():
        assert torch.equal(v, direct.state_dict()[k])
    # fine-tuning moved the whole tower, projection and embeddings included
    bsd = base.state_dict()
    for key in ("visual_projection.weight", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.encoder.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(expert.state_dict()[key], bsd[key])


def test_split_sizes_and_heads(built):
    spec, cache, folder = built
    pool = EmbeddedTaskPool(spec=spec, cache_dir=cache)
    sizes = expected_split_sizes(spec)
    adapter = EmbeddedBackbone(spec=spec, cache_dir=cache)
    base = adapter.load_base()
    for task in pool.tasks:
        x_tr, y_tr = pool.split(task.name, "train")
        x_te, y_te = pool.split(task.name, "test")
        assert x_tr.shape == (sizes["train"][task.name], 3, spec.image_size, spec.image_size)
        assert x_te.shape[0] == y_te.shape[0] == sizes["test"][task.name]
        # frozen heads: buffers only, the base's class prototypes on the train split
        assert isinstance(task.head, ClassEmbeddingHead)
        assert not any(p.requires_grad for p in task.head.parameters())
        assert list(task.head.parameters()) == []
        with torch.no_grad():
            z = adapter.represent(base, x_tr)
        n_classes = emb.TASKS[task.name].n_classes
        proto = emb.prototypes(z, y_tr, n_classes)
        assert torch.allclose(task.head.class_embeddings, proto, atol=1e-4)
    # train and test images of a task come from disjoint digits
    with open(folder / "manifest.json") as fh:
        assert json.load(fh)["split_sizes"] == sizes
    from safetensors.torch import load_file

    d = load_file(str(folder / "data" / "digits.safetensors"))
    assert not set(d["train_index"].tolist()) & set(d["test_index"].tolist())


def test_calibration_batches(built):
    spec, cache, _ = built
    pool = EmbeddedTaskPool(spec=spec, cache_dir=cache)
    task = pool.tasks[1]
    a = list(task.calibration_batches(20, 3, 8, "train"))
    b = list(task.calibration_batches(20, 3, 8, "train"))
    c = list(task.calibration_batches(20, 4, 8, "train"))
    assert [x.shape[0] for x in a] == [8, 8, 4]
    assert all(x.shape[1:] == (3, spec.image_size, spec.image_size) and x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # drawn from the requested split, no repeats
    for split in ("train", "test"):
        xs, _ = pool.split(task.name, split)
        got = torch.cat(list(task.calibration_batches(16, 0, 5, split)))
        flat = xs.flatten(1)
        rows = [int(torch.nonzero((flat == g.flatten()).all(1))[0]) for g in got]
        assert len(set(rows)) == 16
    with pytest.raises(ValueError, match="budget"):
        list(task.calibration_batches(spec.n_train + 1, 0, 8, "train"))
    sets = pool.calibration_set(12, 0, 5)
    assert len(sets) == len(spec.tasks) and sum(x.shape[0] for x in sets[0]) == 12


def test_evaluate_reproduces_the_build_accuracy_and_test_batches(built):
    spec, cache, _ = built
    pool = EmbeddedTaskPool(spec=spec, cache_dir=cache)
    xs, ys = zip(*pool.tasks[0].test_batches(64))
    assert [x.shape[0] for x in xs] == [64, 36]
    adapter = EmbeddedBackbone(spec=spec, cache_dir=cache)
    expert = adapter.load_expert("digits")
    acc = pool.evaluate(lambda i: expert, "cpu", only=[0])
    assert set(acc) == {"digits"}
    manifest = read_manifest(Path(adapter.folder))
    # the run's scorer (model(pixel_values=...).image_embeds through the head) reproduces the build's figure
    assert acc["digits"]["accuracy"] == pytest.approx(manifest["metrics"]["experts"]["digits"], abs=1e-6)
