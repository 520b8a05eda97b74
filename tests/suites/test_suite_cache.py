"""The built-once caches of both embedded suites (``featcal.cache`` behind each suite's
``ensure_built``): deterministic builds, reuse without rebuilding, corruption detected and
rebuilt, concurrent builders building once. Each test runs for the vision suite
(``featcal.suites.embedded.build``) and the text suite (``featcal.suites.embedded_t5.build``)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

import featcal.suites.embedded.build as emb
import featcal.suites.embedded_t5.build as et5
from featcal.suites.embedded.spec import EmbeddedSpec
from featcal.suites.embedded_t5.spec import EmbeddedT5Spec
from featcal.cache import read_manifest

from tests.fixtures.embedded import EMBEDDED_T5_TINY, EMBEDDED_TINY


# ---- corruptions of a built folder --------------------------------------------------------
# generic ones (any suite: the manifest and the saved model folders), then each suite's own
# (its data and side files, in their formats)
def truncate_expert(folder: Path, suite: "Suite") -> None:
    p = folder / "experts" / suite.task / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def no_manifest(folder: Path, suite: "Suite") -> None:
    (folder / "manifest.json").unlink()


def bad_manifest(folder: Path, suite: "Suite") -> None:
    (folder / "manifest.json").write_text("{not json")


def missing_file(folder: Path, suite: "Suite") -> None:
    (folder / "base" / "config.json").unlink()


def manifest_drops_entry(folder: Path, suite: "Suite") -> None:
    m = read_manifest(folder)
    del m["files"][suite.data_file]
    (folder / "manifest.json").write_text(json.dumps(m))


GENERIC = (truncate_expert, no_manifest, bad_manifest, missing_file, manifest_drops_entry)


def flip_data_byte(folder: Path, suite: "Suite") -> None:
    p = folder / "data" / "patch_shuffle.safetensors"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))


def flip_head_byte(folder: Path, suite: "Suite") -> None:
    p = folder / "heads.safetensors"
    b = bytearray(p.read_bytes())
    b[len(b) // 2 + 7] ^= 0x01
    p.write_bytes(bytes(b))


def flip_data_word(folder: Path, suite: "Suite") -> None:
    p = folder / "data" / "sentiment.json"
    p.write_text(p.read_text().replace("positive", "negative", 1))


def flip_tokenizer_byte(folder: Path, suite: "Suite") -> None:
    p = folder / "base" / "tokenizer.json"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


# ---- the suites -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """One embedded suite as these tests drive it."""

    name: str
    #: the build module: ``ensure_built``, ``validate_cache`` and ``build`` (replaced to count builds)
    module: ModuleType
    spec_class: type
    tiny: dict[str, Any]
    #: a task of ``tiny`` whose files the generic corruptions damage
    task: str
    #: that task's data file, relative to the folder
    data_file: str
    #: the suite's own corruptions, run after the generic ones
    corruptions: tuple[Callable[[Path, "Suite"], None], ...]

    def spec(self, **overrides: Any):
        """The tiny spec, with ``overrides``."""
        return self.spec_class.from_config({**self.tiny, **overrides})


SUITES = [
    Suite("embedded", emb, EmbeddedSpec, EMBEDDED_TINY, "digits", "data/digits.safetensors",
          (flip_data_byte, flip_head_byte)),
    Suite("embedded_t5", et5, EmbeddedT5Spec, EMBEDDED_T5_TINY, "length", "data/length.json",
          (flip_data_word, flip_tokenizer_byte)),
]
CORRUPTIONS = [
    pytest.param(suite, corrupt, id=f"{suite.name}-{corrupt.__name__}")
    for suite in SUITES
    for corrupt in GENERIC + suite.corruptions
]
each_suite = pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])


@pytest.fixture(scope="module", autouse=True)
def in_process_builds():
    """These tests are about the cache (lock, manifest, rebuild), not the pinned child
    processes (tested in ``test_embedded*.py`` and below): the builds run in this process
    (``pinned=False``, as a GPU build does), which spares each build the children's start-up."""
    import functools

    with pytest.MonkeyPatch.context() as mp:
        for module in (emb, et5):
            mp.setattr(module, "build", functools.partial(module.build, pinned=False))
        yield


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, one_thread):
    """``tiny_build(suite)``: (spec, cache dir, folder) of the suite's tiny build, made on
    first use and shared by the module's tests."""
    made: dict[str, tuple[Any, Path, Path]] = {}

    def get(suite: Suite) -> tuple[Any, Path, Path]:
        if suite.name not in made:
            cache = tmp_path_factory.mktemp(f"cache-{suite.name}")
            spec = suite.spec()
            made[suite.name] = (spec, cache, suite.module.ensure_built(spec, cache, device="cpu", progress=False))
        return made[suite.name]

    return get


def _hashes(folder: Path) -> dict[str, str]:
    return {k: v["sha256"] for k, v in read_manifest(folder)["files"].items()}


# ---- the tests --------------------------------------------------------------------------------
@each_suite
def test_build_is_deterministic(suite, tiny_build, tmp_path):
    spec, _, folder = tiny_build(suite)
    other = suite.module.ensure_built(spec, tmp_path, device="cpu", progress=False)
    assert other != folder
    assert _hashes(other) == _hashes(folder)
    assert read_manifest(other)["metrics"] == read_manifest(folder)["metrics"]


@each_suite
def test_cache_is_reused(suite, tiny_build, monkeypatch, recwarn):
    spec, cache, folder = tiny_build(suite)
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    calls = []
    real = suite.module.build
    monkeypatch.setattr(suite.module, "build", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert suite.module.ensure_built(spec, cache) == folder
    assert calls == []
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime
    assert not [w for w in recwarn.list if "rebuilding" in str(w.message)]


@pytest.mark.parametrize("suite, corrupt", CORRUPTIONS)
def test_corrupt_cache_is_rebuilt(suite, corrupt, tiny_build, tmp_path):
    spec, _, folder = tiny_build(suite)
    reference = _hashes(folder)
    mine = suite.module.ensure_built(spec, tmp_path, device="cpu", progress=False)
    corrupt(mine, suite)
    assert suite.module.validate_cache(mine, spec) is not None
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = suite.module.ensure_built(spec, tmp_path, device="cpu", progress=False)
    assert again == mine
    assert suite.module.validate_cache(mine, spec) is None
    assert _hashes(mine) == reference
    # no temporary or trash folders left behind
    assert [p.name for p in mine.parent.iterdir() if p.is_dir()] == [mine.name]


@each_suite
def test_concurrent_builders_build_once(suite, tmp_path, monkeypatch, one_thread):
    spec = suite.spec(tasks=[suite.task], pretrain_steps=3, finetune_steps=2)
    calls = []
    real = suite.module.build

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    # replaced on the module: ensure_built must look ``build`` up when it runs
    monkeypatch.setattr(suite.module, "build", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(suite.module.ensure_built(spec, tmp_path, device="cpu", progress=False))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and suite.module.validate_cache(results[0], spec) is None


# ---- portability records and the pinned child processes -----------------------------------------
@each_suite
def test_unpinned_build_says_it_is_not_portable(suite, tiny_build):
    from featcal.suites.build import suite_identity

    _, _, folder = tiny_build(suite)
    m = read_manifest(folder)
    assert m["portable"] is False and "not pinned" in m["portability_note"] and m["pin"] is None
    ident = suite_identity(folder, suite.name)
    assert ident["portable"] is False and ident["content_hash"] == m["content_hash"]


def test_portability_of_gpu_and_other_architectures(monkeypatch):
    from featcal.suites import build as suite_build

    gpu = suite_build.portability("cuda:0")
    assert gpu["portable"] is False and "GPU" in gpu["note"] and "build_device=cpu" in gpu["note"]
    monkeypatch.setattr(suite_build.platform, "machine", lambda: "aarch64")
    arm = suite_build.portability("cpu")
    assert arm["portable"] is False and "aarch64" in arm["note"]
    monkeypatch.setattr(suite_build.platform, "machine", lambda: "x86_64")
    assert suite_build.portability("cpu")["portable"] is True
    assert suite_build.portability("cpu", pinned=False)["portable"] is False
    old_cpu = suite_build.portability("cpu", capability="DEFAULT")
    assert old_cpu["portable"] is False and "AVX2" in old_cpu["note"]


def test_build_workers(monkeypatch):
    from featcal.suites.build import build_workers

    monkeypatch.setenv("FEATCAL_BUILD_WORKERS", "3")
    assert build_workers(7) == 3 and build_workers(2) == 2 and build_workers(7, workers=1) == 1
    monkeypatch.setenv("FEATCAL_BUILD_WORKERS", "two")
    with pytest.raises(ValueError, match="FEATCAL_BUILD_WORKERS"):
        build_workers(7)
    monkeypatch.delenv("FEATCAL_BUILD_WORKERS")
    assert 1 <= build_workers(7) <= 7


def test_pinned_children_run_pinned_and_keep_job_order(tmp_path):
    """Jobs come back in their order from 2 workers; each child reports the pinned kernels."""
    from featcal.suites.build import run_pinned_build

    jobs = [{"var": v} for v in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")]
    first, out = run_pinned_build("os:getenv", {"key": "MKL_CBWR"}, "featcal.suites.build:probe", jobs, workers=2)
    assert first == "AVX2"
    assert [o["var"] for o in out] == [j["var"] for j in jobs]
    assert [o["value"] for o in out] == ["avx2", "AVX2", "1"]
    # ATen's AVX2 kernels where the CPU has AVX2 (else its baseline, and the build says it is not portable)
    has_avx2 = "avx2" in Path("/proc/cpuinfo").read_text().split()
    assert all(o["capability"] == ("AVX2" if has_avx2 else "DEFAULT") and o["threads"] == 1 and not o["mkldnn"] for o in out)


def test_a_failing_first_step_fails_the_build_without_hanging(tmp_path):
    from featcal.suites.build import run_pinned_build

    with pytest.raises(RuntimeError, match="featcal: a pinned suite build step"):
        run_pinned_build("os:getenv", {"no_such_argument": 1}, "featcal.suites.build:probe", [{"var": "A"}, {"var": "B"}], workers=2)
