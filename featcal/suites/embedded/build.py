"""Building the embedded benchmark: pre-training, fine-tuning, cache and checksums.

Everything comes from scikit-learn's 8×8 handwritten digits (``sklearn.datasets.load_digits``, shipped in
the package; nothing is downloaded):

1. The 1797 images are split once (seeded) into a test pool and a train pool.
2. Each task applies its own fixed input transform (inversion, quarter turns,
   mirroring, a fixed patch permutation, heavy noise, shrinking, ...) and label map to
   the pools (``TASKS``).
3. A small ``CLIPVisionModelWithProjection`` (same module types as ViT-B/32, reduced
   size) is pre-trained as the shared **base**: digit identity with a throwaway cosine
   classifier, under mild random augmentations. With ``pretrain_data="upright"`` (the
   pre-v3 recipe, kept in ``INTERFERENCE_SPEC``) it sees upright digits only under
   generic augmentations (none of the tasks' transforms); with ``"union"`` (the default
   since v3) it sees every task's input distribution (the train pool upright plus a
   ``pretrain_transformed`` share of it through each task's transform: the transforms
   act as augmentations), as CLIP's pre-training covers the domains of its downstream
   tasks.
4. Each task's frozen head is a ``ClassEmbeddingHead`` of "zero-shot" class embeddings
   from the base: the normalised mean base embedding of each class, centred over
   classes (the role CLIP's text embeddings play), on the task's own train split with
   ``head_source="task"`` (pre-v3), or with ``"canonical"`` (the default) on *upright,
   untransformed* train-pool digits under the task's label map: the class described
   once, independently of the task's input distribution, as CLIP's text prompts do.
5. One **expert** per task fine-tunes the whole tower (not the head) from the base.

The build is deterministic for a spec (seeded generators, no global RNG use outside a
forked RNG scope) and, on the CPU (the default build device), *portable*: its arithmetic
runs in child processes pinned to fixed kernels (``featcal.suites.build``: ATen's AVX2
kernels, MKL's AVX2 reproducibility branch, oneDNN off, one thread each), so every x86-64
CPU with AVX2 builds the same files for a spec with the same torch. The base is built first,
then the experts, each from the saved base, by several workers at once (the same files
whatever their number). A GPU build (``build_device=cuda``) or a build on another
architecture is marked not portable in the manifest. The build is cached on disk under ``<cache>/embedded/<spec hash>/``: ``base/`` and ``experts/<task>/``
(``save_pretrained``, safetensors, loaded back with
``featcal.backbone.clip.load_clip_vision``), ``heads.safetensors``,
``data/<task>.safetensors`` (the transformed splits) and ``manifest.json`` (sha256 of
every file; written last, the folder is assembled in a temporary directory and renamed
into place). A missing, truncated or altered file, or a bad manifest, is detected on
load and the folder is rebuilt with a warning. A lock file (``filelock``) serialises
builders; the cache root is ``$FEATCAL_CACHE`` or the user cache folder
(``platformdirs``). The manifest also records ``content_hash`` (one hash over the files:
the build's identity, which ``results.json`` carries as ``suite``), ``portable`` and
``portability_note``.

The spec is ``featcal.suites.embedded.spec``, the tasks' transforms and splits
``featcal.suites.embedded.data``. The models are read by
``featcal.suites.embedded.adapter.EmbeddedBackbone``, the splits and heads by
``featcal.suites.embedded.pool.EmbeddedTaskPool``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from featcal.tasks.base import ClassEmbeddingHead
from featcal.cache import ensure_suite, read_manifest, write_manifest  # noqa: F401  (read_manifest: public here)
from featcal.suites import build as suite_build
from featcal.suites.embedded.data import TASKS, canonical_inputs, load_digits, make_task_data, pretraining_data, task_generator
from featcal.suites.embedded.spec import EmbeddedSpec, expected_split_sizes
from featcal.utils import train_adamw

#: CPU threads used while building (see ``build``)
BUILD_THREADS = 1


# --------------------------------------------------------------------------------------
# cache location and validation (featcal.cache: lock, manifest, rebuild)
# --------------------------------------------------------------------------------------
def cache_path(spec: EmbeddedSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    return spec.cache_path(cache_dir)


def validate_cache(folder: Path, spec: EmbeddedSpec) -> str | None:
    """``None`` if ``folder`` holds a complete build of ``spec``, else the reason it does not."""
    return spec.cache_problem(folder)


def ensure_built(spec: EmbeddedSpec | Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> Path:
    """The folder of a complete, verified build of ``spec``, built if needed (``featcal.cache.ensure_suite``)."""
    spec = EmbeddedSpec.from_config(spec)
    # ``build`` is looked up per call, not bound at import: tests replace it to count builds
    return ensure_suite(spec, cache_dir, lambda tmp: build(spec, tmp, device=device, progress=progress))



# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------
def clip_config(spec: EmbeddedSpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.width,
        intermediate_size=spec.width * spec.mlp_ratio,
        projection_dim=spec.projection_dim,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_channels=3,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
    )


def _batches(n: int, batch: int, steps: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches, epoch by epoch through seeded permutations."""
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos: pos + batch]
        pos += batch


def _train(
    model: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    extra_params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    spec: EmbeddedSpec,
    g: torch.Generator,
    device: torch.device,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    desc: str,
    progress: bool,
) -> float:
    batch = min(batch, x.shape[0])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        xb = x[idx]
        if augment is not None:
            xb = augment(xb, g)
        logits = head(model(pixel_values=xb.to(device)).image_embeds)
        return F.cross_entropy(logits, y[idx].to(device))

    return train_adamw(
        model, _batches(x.shape[0], batch, steps, g), loss_of, steps, lr, spec.weight_decay, spec.warmup_frac,
        ema_weight=0.1, extra_params=extra_params, desc=desc, progress=progress,
    )


@torch.no_grad()
def _embed(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    model.eval()
    out = [model(pixel_values=x[i: i + batch].float().to(device)).image_embeds.float().cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Normalised class means of normalised embeddings, centred by the mean over classes."""
    z = F.normalize(embeddings.float(), dim=-1)
    means = torch.stack([z[labels == c].mean(0) for c in range(n_classes)])
    return F.normalize(means - means.mean(0, keepdim=True), dim=-1)


def _accuracy(emb: torch.Tensor, labels: torch.Tensor, head: ClassEmbeddingHead) -> float:
    return 100.0 * float((head(emb).argmax(-1) == labels).float().mean())


def zero_shot_head(
    spec: EmbeddedSpec,
    name: str,
    base: nn.Module,
    data: Mapping[str, torch.Tensor],
    images8: torch.Tensor,
    digits: torch.Tensor,
    device: torch.device,
    canonical: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Class embeddings [C, D] of a task's frozen head, from the base (see ``head_source``).

    ``canonical``: a dict kept by the caller across the tasks of one build; the base's
    embeddings of the canonical inputs (the same for every task, only the label map
    differs) are computed once and reused from it (the same numbers as recomputing)."""
    tdef = TASKS[name]
    if spec.head_source == "task":
        return prototypes(_embed(base, data["train_x"], device), data["train_y"], tdef.n_classes)
    if canonical is not None and "embeddings" in canonical:
        emb, y = canonical["embeddings"], canonical["digits"]
    else:
        x, y = canonical_inputs(spec, images8, digits)
        emb = _embed(base, x, device)
        if canonical is not None:
            canonical.update(embeddings=emb, digits=y)
    return prototypes(emb, tdef.label(y), tdef.n_classes)


def build(
    spec: EmbeddedSpec,
    out: Path,
    device: str | torch.device | None = None,
    progress: bool = True,
    threads: int | None = BUILD_THREADS,
    workers: int | None = None,
    pinned: bool = True,
) -> dict[str, Any]:
    """Build ``spec`` into the (new) folder ``out``; the manifest is written last.

    ``device``: where to train (``None``: the CPU, the portable build; ``"auto"``: cuda if
    available). On the CPU with ``pinned`` (the default) every step runs in child processes
    pinned to the x86-64 baseline kernels (``featcal.suites.build``): the same files on every
    x86-64 CPU; the base first, then the experts in ``workers`` children at once (default:
    ``$FEATCAL_BUILD_WORKERS`` or the usable cores), the same files whatever their number.
    Otherwise (a GPU, or ``pinned=False``) the steps run in this process with ``threads``
    intra-op threads (``None``: leave torch's setting) and the manifest marks the build
    not portable.
    """
    return suite_build.build_suite(spec, Path(out), device, progress, threads, workers, pinned,
                                   f"{__name__}:_build_base", f"{__name__}:_build_expert")


def preload() -> None:
    """Import what the build steps use (a pinned worker does this while the base trains)."""
    from transformers import CLIPVisionModelWithProjection  # noqa: F401


def _build_base(spec: Mapping[str, Any], out: str, device: str, progress: bool) -> dict[str, Any]:
    """Step 1 (a pinned child, see ``build``): the task splits, the pre-trained base and the
    zero-shot heads into ``out``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    spec = EmbeddedSpec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    started, cpu0 = time.time(), time.process_time()
    images8, digits = load_digits()
    timings: dict[str, float] = {}

    # ---- data ---------------------------------------------------------------
    data = {t: make_task_data(spec, t, images8, digits) for t in spec.tasks}
    (out / "data").mkdir()
    for t, d in data.items():
        save_file(d, str(out / "data" / f"{t}.safetensors"), metadata={"task": t})

    # ---- base: generic pre-training ------------------------------------------
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        base = CLIPVisionModelWithProjection(clip_config(spec))
        throwaway = torch.randn(10, spec.projection_dim) * 0.02
    base.to(dev)
    w = nn.Parameter(throwaway.to(dev))

    def cosine_head(z: torch.Tensor) -> torch.Tensor:
        return 20.0 * F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).t()

    pre_x, pre_y, augment = pretraining_data(spec, images8, digits)
    pre_loss = _train(
        base, cosine_head, [w], pre_x, pre_y, spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_lr,
        spec, task_generator(spec, "__pretrain__"), dev, augment, "pretrain base", progress,
    )
    base.eval()
    timings["pretrain"] = time.time() - t0

    # ---- heads: zero-shot prototypes of the base ------------------------------
    heads: dict[str, torch.Tensor] = {}
    zero_shot: dict[str, float] = {}
    canonical: dict[str, torch.Tensor] = {}  # the base's embeddings of the canonical inputs, once
    for t in spec.tasks:
        d = data[t]
        heads[t] = zero_shot_head(spec, t, base, d, images8, digits, dev, canonical)
        head = ClassEmbeddingHead(heads[t], spec.logit_scale)
        zero_shot[t] = _accuracy(_embed(base, d["test_x"], dev), d["test_y"], head)
    save_file({t: h.contiguous().cpu() for t, h in heads.items()}, str(out / "heads.safetensors"))
    base.save_pretrained(str(out / "base"), safe_serialization=True)
    timings["data_base_heads"] = time.time() - started - timings["pretrain"]
    return {
        "fields": {
            "tasks": {t: {"n_classes": TASKS[t].n_classes, "description": TASKS[t].description} for t in spec.tasks},
            "split_sizes": expected_split_sizes(spec),
            "pretrain_final_loss": pre_loss,
            "metrics": {"base_zero_shot": zero_shot},
        },
        "seconds": timings,
        "cpu": {"base": time.process_time() - cpu0},
    }


def _build_expert(spec: Mapping[str, Any], out: str, device: str, progress: bool, task: str) -> dict[str, Any]:
    """Step 2 (one per task, pinned children in parallel, see ``build``): fine-tune the
    task's expert from the saved base with its frozen head; save it, return its accuracy.
    Reads only the step-1 files, so its bytes do not depend on the other experts."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    spec = EmbeddedSpec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    t0, c0 = time.time(), time.process_time()
    d = load_file(str(out / "data" / f"{task}.safetensors"))
    heads = load_file(str(out / "heads.safetensors"))
    expert = CLIPVisionModelWithProjection.from_pretrained(str(out / "base")).to(dev)
    head = ClassEmbeddingHead(heads[task], spec.logit_scale).to(dev)
    _train(
        expert, head, [], d["train_x"].float(), d["train_y"], spec.finetune_steps, spec.finetune_batch,
        spec.finetune_lr, spec, task_generator(spec, task, "finetune"), dev, None, f"fine-tune {task}", progress,
    )
    accuracy = _accuracy(_embed(expert, d["test_x"], dev), d["test_y"], head.cpu())
    expert.save_pretrained(str(out / "experts" / task), safe_serialization=True)
    return {"task": task, "fields": [(["metrics", "experts"], accuracy)], "seconds": time.time() - t0, "cpu": time.process_time() - c0}


# --------------------------------------------------------------------------------------
# shared by the adapter (featcal.suites.embedded.adapter) and the task pool
# --------------------------------------------------------------------------------------
def _spec_from(tasks: list[str] | None, spec: Any, overrides: Mapping[str, Any]) -> EmbeddedSpec:
    given = dataclasses.asdict(spec) if isinstance(spec, EmbeddedSpec) else dict(spec or {})
    given.update(overrides)
    if tasks is not None:
        if "tasks" in given:
            if not set(map(str, tasks)) <= set(map(str, given["tasks"])) or len(set(tasks)) != len(tasks):
                raise ValueError(f"tasks {list(tasks)} disagree with spec.tasks {list(given['tasks'])}: "
                                 "they must be distinct tasks of the spec (a subset selects those experts)")
        else:
            given["tasks"] = list(tasks)
    return EmbeddedSpec.from_config(given)


class EmbeddedBuild:
    """The spec, cache location and build device of one embedded suite, and its cache
    folder: built (or validated) on first use, then remembered."""

    def _init_build(
        self,
        tasks: list[str] | None,
        spec: Mapping[str, Any] | EmbeddedSpec | None,
        cache_dir: str | None,
        build_device: str | None,
        spec_overrides: Mapping[str, Any],
    ) -> None:
        self.spec = _spec_from(tasks, spec, spec_overrides)
        #: the tasks this object serves: ``tasks`` (a subset of the built suite, in the given
        #: order) or every task of the spec; the cache is the whole suite's either way
        self.selected = [str(t) for t in tasks] if tasks is not None else list(self.spec.tasks)
        self.cache_dir = cache_dir
        self.build_device = build_device
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = ensure_built(self.spec, self.cache_dir, device=self.build_device)
        return self._folder

    def suite_identity(self) -> dict[str, Any]:
        """The build's identity for ``results.json`` (``featcal.suites.build.suite_identity``);
        warns when the build is not portable."""
        from featcal.suites.build import announce_identity

        return announce_identity(self.folder, self.spec.SUITE)
