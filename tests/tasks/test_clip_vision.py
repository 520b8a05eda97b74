"""The CLIP eight-task benchmark on tiny local stand-ins (no network).

Tiny CLIP models (both checkpoint layouts), a tiny tokenizer, tiny datasets in the
real schema and a tiny open_clip model, all loaded back through the real loaders.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.fixtures.clip import (
    make_tiny_clip,
    make_tiny_clip_benchmark,
    make_tiny_expert,
    make_tiny_task_dataset,
    write_tiny_tokenizer,
)
from featcal.backbone.base import batch_size_of
from featcal.backbone.clip import CLIPVisionBackbone, load_clip_vision
from featcal.errors import SourceUnavailable
from featcal.tasks import clip_images, clip_vision as cv

ROOT = Path(__file__).resolve().parents[2]
LOGIT_SCALE = float(np.exp(2.6592))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny CLIP in both layouts (same weights), an expert, and two datasets."""
    root = tmp_path_factory.mktemp("clip")
    ref = make_tiny_clip(root / "v5", layout="v5", seed=0)
    make_tiny_clip(root / "v4", layout="v4", seed=0)
    make_tiny_expert(root / "v4", root / "expert", seed=1)
    make_tiny_task_dataset(root / "mnist", 10, n_train=16, n_test=12, seed=0, mode="L")
    make_tiny_task_dataset(root / "eurosat", 10, n_train=16, n_test=12, seed=1)
    return root, ref


def _ref_text(ref, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return ref.text_projection(out.pooler_output)


# ---- model loading ---------------------------------------------------------------


def test_text_tower_loads_both_layouts(tiny):
    root, ref = tiny
    tok = cv.load_clip_tokenizer(str(root / "v4"))
    texts = ['a photo of the number: "7".', "a centered satellite photo of forest."]
    want = _ref_text(ref, tok, texts)
    for layout in ("v5", "v4"):
        model, scale = cv.load_clip_text(str(root / layout))
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert scale == pytest.approx(LOGIT_SCALE, rel=1e-4)
    # the first eos is pooled: padding must not change a sentence's embedding
    enc1 = tok(texts[1:], return_tensors="pt")
    with torch.no_grad():
        alone = model(**{k: enc1[k] for k in ("input_ids", "attention_mask")}).text_embeds
    torch.testing.assert_close(alone[0], want[1], atol=1e-5, rtol=1e-5)


def test_vision_tower_and_expert_4x_layout(tiny):
    root, ref = tiny
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
    for layout in ("v5", "v4"):
        adapter = CLIPVisionBackbone(["mnist"], str(root / layout), {"mnist": str(root / "expert")})
        base = adapter.load_base()
        torch.testing.assert_close(adapter.represent(base, {"pixel_values": x}), want, atol=1e-5, rtol=1e-5)
    expert = adapter.load_expert("mnist")  # 4.x CLIPVisionModel keys, projection from the base
    torch.testing.assert_close(expert.visual_projection.weight, base.visual_projection.weight)
    diff = (expert.vision_model.encoder.layers[0].mlp.fc1.weight - base.vision_model.encoder.layers[0].mlp.fc1.weight).abs().max()
    assert diff > 0


# ---- zero-shot heads ---------------------------------------------------------------


def test_zeroshot_heads_from_templates_and_cache(tiny, tmp_path, monkeypatch):
    root, ref = tiny
    pool = cv.CLIPVisionTaskPool(
        ["mnist", "eurosat"], str(root / "v4"),
        datasets={"mnist": str(root / "mnist"), "eurosat": str(root / "eurosat")},
        cache_dir=str(tmp_path / "heads"), device="cpu",
    )
    heads = pool.build_heads()
    table = cv.task_table()
    tok = cv.load_clip_tokenizer(str(root / "v4"))
    for task in ("mnist", "eurosat"):
        names, templates = table[task]["classnames"], table[task]["templates"]
        per_class = []
        for c in names:
            e = _ref_text(ref, tok, [t.replace("{c}", c) for t in templates])
            per_class.append(torch.nn.functional.normalize(e, dim=-1).mean(0))
        want = torch.nn.functional.normalize(torch.stack(per_class), dim=-1)
        torch.testing.assert_close(heads[task].class_embeddings, want, atol=1e-5, rtol=1e-5)
        assert heads[task].logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-4)
        assert pool.head_cache_file(task).exists()
    # eurosat uses three templates and a different prompt set: heads differ
    assert not torch.allclose(heads["mnist"].class_embeddings, heads["eurosat"].class_embeddings)

    # a second pool reads the cache and never touches the text tower
    def boom(*a, **k):
        raise AssertionError("text tower loaded despite the cache")

    monkeypatch.setattr(cv, "load_clip_text", boom)
    again = cv.CLIPVisionTaskPool(["mnist", "eurosat"], str(root / "v4"), cache_dir=str(tmp_path / "heads"), device="cpu")
    for task, h in again.build_heads().items():
        torch.testing.assert_close(h.class_embeddings, heads[task].class_embeddings)
    # changing the templates changes the cache key
    other = cv.CLIPVisionTaskPool(["mnist"], str(root / "v4"), cache_dir=str(tmp_path / "heads"), device="cpu",
                                  task_overrides={"mnist": {"templates": ["{c}"]}})
    assert other.head_cache_file("mnist") != pool.head_cache_file("mnist")


def test_task_table_is_complete():
    table = cv.task_table()
    assert tuple(table) == cv.CLIP_TASKS
    sizes = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10, "dtd": 47}
    for task, spec in table.items():
        assert len(spec["classnames"]) == sizes[task], task
        assert spec["templates"] and all("{c}" in t for t in spec["templates"]), task
    assert table["svhn"]["dataset"] == "ufldl-stanford/svhn" and table["svhn"]["config"] == "cropped_digits"
    assert table["mnist"]["dataset"] == "ylecun/mnist"
    assert table["stanford-cars"]["dataset"] == "tanganke/stanford_cars"


# ---- data and preprocessing ------------------------------------------------------


def test_calibration_and_test_batches_through_processor(tiny, tmp_path):
    from transformers import CLIPImageProcessor

    root, _ = tiny
    pool = cv.CLIPVisionTaskPool(["mnist", "eurosat"], str(root / "v4"),
                                 datasets={"mnist": str(root / "mnist"), "eurosat": str(root / "eurosat")},
                                 cache_dir=str(tmp_path / "heads"), device="cpu")
    batches = list(pool.calibration_batches("mnist", n=5, seed=3, batch_size=2))
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["pixel_values"].shape[1:] == (3, 32, 32)
    idx = pool.calibration_indices("mnist", 5, 3)
    assert idx == np.random.default_rng(3).permutation(16)[:5].tolist()
    assert idx != pool.calibration_indices("mnist", 5, 4)
    # exactly the base model's image processor on those train rows (grayscale -> RGB)
    ds = pool.dataset("mnist", "train")
    proc = CLIPImageProcessor.from_pretrained(str(root / "v4"))
    want = proc(images=[ds[i]["image"].convert("RGB") for i in idx], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in batches]), torch.as_tensor(want).float())
    # the same seed gives the same examples; the calibration_set API of the pool
    calib = pool.calibration_set(4, seed=3, batch_size=4)
    assert len(calib) == 2 and calib[0][0]["pixel_values"].shape[0] == 4
    torch.testing.assert_close(calib[0][0]["pixel_values"], torch.cat([b["pixel_values"] for b in batches])[:4])
    # test split: all of it, labels as stored
    seen = list(pool.test_batches("eurosat", batch_size=5))
    labels = torch.cat([lab for _, lab in seen])
    assert labels.tolist() == pool.dataset("eurosat", "test")["label"]
    with pytest.raises(ValueError, match="exceeds"):
        pool.calibration_indices("mnist", 17, 0)
    # a worker process gives the same batches
    pool.num_workers = 1
    again = list(pool.calibration_batches("mnist", n=5, seed=3, batch_size=2))
    torch.testing.assert_close(torch.cat([b["pixel_values"] for b in again]), torch.cat([b["pixel_values"] for b in batches]))


def test_evaluate_with_pool_and_split_test(tiny, tmp_path):
    root, _ = tiny
    pool = cv.CLIPVisionTaskPool(["mnist", "eurosat"], str(root / "v4"),
                                 datasets={"mnist": str(root / "mnist"), "eurosat": str(root / "eurosat")},
                                 cache_dir=str(tmp_path / "heads"), device="cpu", max_test_examples=7)
    adapter = CLIPVisionBackbone(["mnist", "eurosat"], str(root / "v4"), {"mnist": str(root / "expert"), "eurosat": str(root / "expert")})
    base = adapter.load_base()
    metrics = pool.evaluate(lambda i: base, "cpu", batch_size=4)
    assert all(set(m) == {"accuracy"} for m in metrics.values()) and pool.primary_metric("mnist") == "accuracy"
    acc = {t: m["accuracy"] for t, m in metrics.items()}
    assert set(acc) == {"mnist", "eurosat"} and all(0.0 <= a <= 100.0 for a in acc.values())
    # every accuracy is a multiple of 1/7: max_test_examples honoured
    assert all(abs(a * 7 / 100 - round(a * 7 / 100)) < 1e-6 for a in acc.values())
    # the transductive protocol draws calibration examples from the test split
    assert len(pool.calibration_indices("eurosat", 12, 0, split="test")) == 12
    with pytest.raises(ValueError, match="exceeds"):
        pool.calibration_indices("eurosat", 13, 0, split="test")


def test_pool_scores_the_adapters_representation(tiny, tmp_path):
    """The heads read what the bound model adapter's ``represent`` returns (no CLIP
    attribute in the pool); unbound, the CLIP family's adapter gives the same numbers."""
    root, _ = tiny

    def pool():
        return cv.CLIPVisionTaskPool(["mnist"], str(root / "v4"), datasets={"mnist": str(root / "mnist")},
                                     cache_dir=str(tmp_path / "heads"), device="cpu")

    adapter = CLIPVisionBackbone(["mnist"], str(root / "v4"), {"mnist": str(root / "expert")})
    base = adapter.load_base()
    unbound = pool().evaluate(lambda i: base, "cpu", batch_size=5)

    class Recording(CLIPVisionBackbone):
        calls = 0

        def represent(self, model, inputs):
            Recording.calls += 1
            return super().represent(model, inputs)

    bound = pool().bind(Recording(["mnist"], str(root / "v4"), {"mnist": str(root / "expert")}))
    assert bound.evaluate(lambda i: base, "cpu", batch_size=5) == unbound
    assert Recording.calls == 3  # 12 test examples in batches of 5

    # an adapter whose representation of every input is class k's head embedding: every
    # prediction is k, so the accuracy is the share of label k in the test split (counted here)
    labels = pool().dataset("mnist", "test")["label"]
    for k in sorted(set(labels))[:3]:
        pointing = pool()
        emb = pointing.tasks[0].head.class_embeddings

        class Pointing(CLIPVisionBackbone):
            def represent(self, model, inputs, k=k, emb=emb):
                return emb[k].expand(batch_size_of(inputs), -1).clone()

        pointing.bind(Pointing([], base="", experts=[]))
        got = pointing.evaluate(lambda i: base, "cpu", batch_size=5)["mnist"]["accuracy"]
        assert got == pytest.approx(100.0 * sum(lab == k for lab in labels) / len(labels)), k


def test_fallback_preprocess_without_processor_config(tiny, tmp_path):
    import shutil

    root, _ = tiny
    folder = tmp_path / "noproc"
    shutil.copytree(root / "v5", folder)
    (folder / "preprocessor_config.json").unlink()
    pre = clip_images.CLIPImagePreprocess.from_pretrained(str(folder))
    assert pre.processor is None and pre.image_size == 32
    from PIL import Image

    white = Image.new("RGB", (50, 40), (255, 255, 255))
    x = pre([white, Image.new("L", (40, 60), 0)])
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x[0, :, 5, 5], (1 - torch.tensor(clip_images.OPENAI_CLIP_MEAN)) / torch.tensor(clip_images.OPENAI_CLIP_STD))
    torch.testing.assert_close(x[1, :, 5, 5], -torch.tensor(clip_images.OPENAI_CLIP_MEAN) / torch.tensor(clip_images.OPENAI_CLIP_STD))


def test_label_count_mismatch_is_reported(tiny, tmp_path):
    root, _ = tiny
    make_tiny_task_dataset(tmp_path / "dtd_bad", 5, n_train=4, n_test=4)
    pool = cv.CLIPVisionTaskPool(["dtd"], str(root / "v4"), datasets={"dtd": str(tmp_path / "dtd_bad")},
                                 cache_dir=str(tmp_path / "heads"), device="cpu")
    with pytest.raises(ValueError, match="5 classes but 47 class names"):
        pool.dataset("dtd", "train")


# ---- missing sources -----------------------------------------------------------------


def _offline(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_missing_model_and_dataset_fail_with_names(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(SourceUnavailable, match="/no/such/clip"):
        load_clip_vision("/no/such/clip")
    with pytest.raises(SourceUnavailable, match="featcal-test/no-such-clip") as err:
        cv.load_clip_text("featcal-test/no-such-clip")
    assert "hf download" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(SourceUnavailable, match="/no/such/dataset"):
        cv.load_task_split("/no/such/dataset", "train", task="mnist")
    with pytest.raises(SourceUnavailable, match="featcal-test/no-such-dataset") as err:
        cv.load_task_split("featcal-test/no-such-dataset", "train", "cropped_digits", task="svhn")
    msg = str(err.value)
    assert "hf download --repo-type dataset featcal-test/no-such-dataset" in msg and "backbone.taskpool.datasets.svhn" in msg
    assert "config 'cropped_digits'" in msg and "HF_DATASETS_OFFLINE=1" in msg
    from featcal.backbone.openclip import OpenCLIPVisionBackbone

    with pytest.raises(SourceUnavailable, match="zeroshot.pt"):
        OpenCLIPVisionBackbone(["mnist"], str(tmp_path / "zeroshot.pt"), {"mnist": "x"}).load_base()


# ---- open_clip (task-vectors release format) -------------------------------------


TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def _tiny_openclip(tmp_path, quick_gelu=True, seed=0):
    import open_clip

    cfg_file = tmp_path / "tiny-openclip-vit.json"
    cfg_file.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(str(cfg_file))
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-openclip-vit", pretrained=None, force_quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # non-trivial norms and embeddings
        for name, p in model.visual.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, cfg_file


def _save_image_encoder(model, path):
    """Pickle a whole ImageEncoder from a package that will not be importable at load time."""
    pkg, mod = types.ModuleType("tv_src"), types.ModuleType("tv_src.modeling")
    sys.modules["tv_src"], sys.modules["tv_src.modeling"] = pkg, mod

    from torchvision import transforms as T

    def _convert_to_rgb(image):
        return image.convert("RGB")

    _convert_to_rgb.__module__, _convert_to_rgb.__qualname__ = "tv_src.modeling", "_convert_to_rgb"
    mod._convert_to_rgb = _convert_to_rgb

    class ImageEncoder(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.val_preprocess = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), _convert_to_rgb, T.ToTensor()])
            self.cache_dir = "/somewhere"

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "tv_src.modeling", "ImageEncoder"
    mod.ImageEncoder = ImageEncoder
    enc = ImageEncoder(model)
    try:
        torch.save(enc, str(path))
    finally:
        del sys.modules["tv_src.modeling"], sys.modules["tv_src"]


def test_openclip_checkpoints_match_encode_image(tmp_path):
    import copy

    from featcal.backbone.openclip import OpenCLIPVisionBackbone

    base, cfg_file = _tiny_openclip(tmp_path, seed=0)
    expert, _ = _tiny_openclip(tmp_path, seed=1)
    _save_image_encoder(copy.deepcopy(base), tmp_path / "zeroshot.pt")  # whole pickled object
    (tmp_path / "MNIST").mkdir()
    torch.save({f"model.{k}": v for k, v in expert.state_dict().items()}, str(tmp_path / "MNIST" / "finetuned.pt"))  # a state dict
    adapter = OpenCLIPVisionBackbone(["mnist"], str(tmp_path / "zeroshot.pt"), {"mnist": str(tmp_path / "MNIST" / "finetuned.pt")},
                                     model_name="tiny-openclip-vit", quick_gelu=True, model_config_path=str(cfg_file))
    x = torch.randn(3, 3, 32, 32)
    for loaded, ref in ((adapter.load_base(), base), (adapter.load_expert("mnist"), expert)):
        assert loaded.config.hidden_act == "quick_gelu"
        with torch.no_grad():
            want = ref.encode_image(x)
        torch.testing.assert_close(adapter.represent(loaded, {"pixel_values": x}), want, atol=1e-5, rtol=1e-4)
        assert len(adapter.blocks(loaded)) == 2


def test_openclip_gelu_conversion(tmp_path):
    from featcal.backbone.openclip import openclip_visual_to_hf

    model, _ = _tiny_openclip(tmp_path, quick_gelu=False)
    hf = openclip_visual_to_hf(model.visual)
    assert hf.config.hidden_act == "gelu"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).image_embeds, model.encode_image(x), atol=1e-5, rtol=1e-4)


# ---- configs ---------------------------------------------------------------------------


def _compose(overrides, return_hydra_config=False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)


def test_backbone_config_runs_tiny_benchmark(tmp_path):
    from hydra.utils import instantiate

    overrides = make_tiny_clip_benchmark(tmp_path, tasks=("mnist", "eurosat"), n_train=8, n_test=6)
    cfg = _compose(overrides + ["device=cpu", "logger=none"])
    assert list(cfg.backbone.taskpool.tasks) == ["mnist", "eurosat"]
    assert cfg.backbone.train_sizes.mnist == 8
    adapter = instantiate(cfg.backbone.adapter)
    pool = instantiate(cfg.backbone.taskpool)
    assert pool.names == adapter.tasks == ["mnist", "eurosat"]
    base = adapter.load_base()
    experts = adapter.load_experts()
    calib = pool.calibration_set(4, seed=0, batch_size=4)
    z = adapter.represent(experts[0], calib[0][0])
    assert z.shape == (4, 16)
    assert set(pool.evaluate(lambda i: base, "cpu", batch_size=3)) == {"mnist", "eurosat"}


def test_openclip_backbone_config_requires_checkpoint_dir():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _compose(["backbone=clip_vit_b32_openclip", "logger=none"])
    assert "backbone.adapter.checkpoint_dir" in OmegaConf.missing_keys(cfg)
    cfg = _compose(["backbone=clip_vit_b32_openclip", "backbone.adapter.checkpoint_dir=/ckpt", "logger=none"])
    assert not [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra.")]
    adapter = instantiate(cfg.backbone.adapter)  # no loading yet
    assert adapter.base_source == "/ckpt/zeroshot.pt"
    assert adapter.expert_sources["stanford-cars"] == "/ckpt/Cars/finetuned.pt"
    assert adapter.tasks == list(cv.CLIP_TASKS)
    assert cfg.backbone.taskpool.base == "openai/clip-vit-base-patch32"


def test_experiment_presets_sweep_overrides_compose():
    """Every value a preset sweeps over a plain key (budget.per_task) composes into a
    config with that value (the sweeper passes each one on as an override); group
    choices are composed by test_config."""
    for preset in ("clip_vit_b32_table", "clip_vit_b32_budget"):
        cfg = _compose([f"experiment={preset}", "logger=none"], return_hydra_config=True)
        assert cfg.hydra.mode.name == "MULTIRUN"
        for key, values in cfg.hydra.sweeper.params.items():
            if "." not in key:
                continue
            for value in str(values).split(","):
                job = _compose([f"experiment={preset}", f"{key}={value}", "logger=none"])
                assert str(OmegaConf.select(job, key)) == value


# ---- paper comparison ----------------------------------------------------------------


def test_compare_to_paper(tmp_path):
    import pandas as pd

    from featcal.report import paper as mod  # featcal-report paper
    tasks = list(cv.CLIP_TASKS)
    rows = []
    for seed, bump in ((0, 0.0), (1, 2.0)):
        for t in tasks:
            rows.append(dict(run_dir=f"r{seed}", backbone="clip_vit_b32", merge="task_arithmetic", calibration="featcal", budget=256, task=t, stage="merged", accuracy=60.0))
            rows.append(dict(run_dir=f"r{seed}", backbone="clip_vit_b32", merge="task_arithmetic", calibration="featcal", budget=256, task=t, stage="calibrated", accuracy=80.0 + bump))
            rows.append(dict(run_dir=f"r{seed}", backbone="clip_vit_b32", merge="task_arithmetic", calibration="featcal", budget=256, task=t, stage="experts", accuracy=90.0))
    rows.append(dict(run_dir="r2", backbone="clip_vit_b32", merge="task_arithmetic", calibration="none", budget=256, task="mnist", stage="merged", accuracy=95.0))
    sweep = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(sweep, index=False)
    assert mod.main([str(sweep), "--csv-out", str(tmp_path / "m.csv")]) == 0
    text = (tmp_path / "results_vs_paper.md").read_text()
    matched = pd.read_csv(tmp_path / "m.csv")
    fc = matched[(matched.method == "featcal") & (matched.task == "average")].iloc[0]
    assert fc.ours == pytest.approx(81.0) and fc.paper == pytest.approx(85.47) and fc.delta == pytest.approx(81.0 - 85.47)
    assert int(fc.runs) == 2 and int(fc.tasks) == 8
    mn = matched[(matched.method == "featcal") & (matched.task == "mnist")].iloc[0]
    assert mn.paper == pytest.approx(98.81)
    ta = matched[(matched.method == "none") & (matched.task == "mnist")].iloc[0]
    assert ta.ours == pytest.approx(95.0) and ta.paper == pytest.approx(96.07)
    ex = matched[(matched.method == "experts") & (matched.task == "average")].iloc[0]
    assert ex.paper == pytest.approx(90.3)
    assert "85.47" in text and "transductive" in text and "81.00" in text
