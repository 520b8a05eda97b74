"""Tiny specs of the two embedded suites, shared by their own test modules
(``test_embedded.py``, ``test_embedded_t5.py``) and the cache tests of both
(``test_suite_cache.py``); the build-as-a-user and portability checks of every embedded
suite (``test_embedded*.py``)."""

# the vision suite (featcal.suites.embedded.build), a tiny build (~1-2 s): 2 tasks, a
# 1-block width-16 tower, a few steps
EMBEDDED_TINY = dict(
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
    # heads on each task's own split (test_split_sizes_and_heads checks them); the
    # default canonical heads are checked by test_canonical_heads_are_upright_digit_prototypes
    head_source="task",
)

# the text suite (featcal.suites.embedded_t5.build), a tiny build (a few seconds): 2 tasks, a
# width-16 1+1-block T5, a few steps
EMBEDDED_T5_TINY = dict(
    tasks=["sentiment", "length"],
    d_model=16,
    d_ff=32,
    layers=1,
    heads=2,
    n_train=64,
    n_test=40,
    pretrain_steps=6,
    pretrain_batch=16,
    finetune_steps=3,
    finetune_batch=8,
)

# the CPU kernels' environment variables, and a setting of them that emulates a CPU with a
# lower instruction set than this one (issue 27): on an AVX-512 machine what an AVX2-only
# CPU runs, on an AVX2 machine the x86-64 baseline (SSE)
ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")


def lower_isa_env() -> dict:
    import torch

    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
    return {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41"}


def build_as_a_user(ensure_built, *args, **kwargs):
    """``ensure_built(*args, **kwargs)`` as a user's machine builds a suite: this CPU's own
    kernel settings in the environment, the experts trained by 2 pinned workers."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for var in ISA_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("FEATCAL_BUILD_WORKERS", "2")
        return ensure_built(*args, **kwargs)


def assert_same_files_on_a_lower_isa(first: dict, rebuild, monkeypatch) -> dict:
    """Issue 27: ``rebuild(workers)`` (a fresh build of the spec whose manifest is ``first``,
    returning its manifest) under the kernel environment of a CPU with a lower instruction
    set (``lower_isa_env``) and 1 worker gives every file the same sha256, the same content
    hash and scores, and both builds are marked portable. Returns the second manifest."""
    for var, value in lower_isa_env().items():
        monkeypatch.setenv(var, value)
    second = rebuild(1)
    assert second["build_workers"] == 1
    assert {k: v["sha256"] for k, v in second["files"].items()} == {k: v["sha256"] for k, v in first["files"].items()}
    assert second["content_hash"] == first["content_hash"] and second["metrics"] == first["metrics"]
    assert first["portable"] is True and second["portable"] is True
    return second
