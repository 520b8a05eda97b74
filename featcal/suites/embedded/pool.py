"""The embedded benchmark's tasks: cached splits of sklearn digits and frozen zero-shot heads.

The suite (see ``featcal.suites.embedded.build`` for how it is built and cached): a
small CLIP-architecture vision tower pre-trained on the digits, one fine-tuned expert
per task, each task a fixed input transform and label map of the 8x8 digits with a
frozen "zero-shot" prototype head derived from the base. The models are loaded by
``featcal.suites.embedded.adapter.EmbeddedBackbone``.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from featcal.tasks.base import ClassEmbeddingHead, ClassificationTaskPool, Task
from featcal.tasks.budget import examples_per_task
from featcal.suites.embedded.build import EmbeddedBuild
from featcal.suites.embedded.spec import EmbeddedSpec


class EmbeddedTaskPool(EmbeddedBuild, ClassificationTaskPool):
    """The embedded suite's tasks: cached splits and frozen zero-shot prototype heads."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedSpec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        self._tasks: list[Task] | None = None
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.selected)

    def split(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel values [N,3,H,W] float32, labels [N]) of a task's split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.tasks  # noqa: B018 - loads the data
        d = self._data[task]
        return d[f"{split}_x"], d[f"{split}_y"]

    @property
    def tasks(self) -> list[Task]:
        if self._tasks is None:
            from safetensors.torch import load_file

            folder = self.folder
            heads = load_file(str(folder / "heads.safetensors"))
            out = []
            for name in self.selected:
                raw = load_file(str(folder / "data" / f"{name}.safetensors"))
                self._data[name] = {k: (v.float() if k.endswith("_x") else v) for k, v in raw.items()}
                head = ClassEmbeddingHead(heads[name], self.spec.logit_scale)
                head.requires_grad_(False)
                out.append(
                    Task(
                        name=name,
                        head=head,
                        calibration_batches=self._calibration_fn(name),
                        test_batches=self._test_fn(name),
                    )
                )
            self._tasks = out
        return self._tasks

    def _calibration_fn(self, name: str):
        def calibration_batches(n: int | str, seed: int, batch_size: int = 16, split: str = "train") -> Iterator[torch.Tensor]:
            x, _ = self.split(name, split)
            n = examples_per_task(n, x.shape[0], name, split)
            perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n]
            for i in range(0, n, int(batch_size)):
                yield x[perm[i: i + int(batch_size)]].clone()

        return calibration_batches

    def _test_fn(self, name: str):
        def test_batches(batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            x, y = self.split(name, "test")
            for i in range(0, x.shape[0], int(batch_size)):
                yield x[i: i + int(batch_size)], y[i: i + int(batch_size)]

        return test_batches

