"""Trust boundaries (issue 26): checkpoints never run code, model-written code runs only
when enabled and fenced, secrets never land in what a run writes.

Malicious checkpoints are real torch files whose pickles reduce to ``os.system``,
``eval``, ``exec``, ``getattr`` chains...; each payload would create a file, and each test
first shows that plain ``torch.load(weights_only=False)`` does create it (the payload is
live), then that featcal's reader refuses the file and the file never appears.
"""
from __future__ import annotations

import builtins
import functools
import json
import operator
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from featcal.backbone.openclip import read_torch_checkpoint
from featcal.safe_pickle import UnsafeCheckpoint

ROOT = Path(__file__).resolve().parents[1]

# ---- the real-style release checkpoint still loads ----------------------------------

TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def _pickle_as(obj, module: str, qualname: str):
    obj.__module__, obj.__qualname__ = module, qualname
    return obj


@pytest.fixture(scope="module")
def release_style_encoder(tmp_path_factory):
    """A task-vectors style ``ImageEncoder`` (src.modeling, not importable at load time)
    holding an open_clip CLIP and open_clip's own preprocessing transforms, pickled whole."""
    import open_clip

    tmp = tmp_path_factory.mktemp("release")
    cfg = tmp / "tiny-sec-vit.json"
    cfg.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model, train_pre, val_pre = open_clip.create_model_and_transforms("tiny-sec-vit", pretrained=None)
    pkg, mod = types.ModuleType("src"), types.ModuleType("src.modeling")
    saved = {k: sys.modules.get(k) for k in ("src", "src.modeling")}
    sys.modules["src"], sys.modules["src.modeling"] = pkg, mod

    class ImageEncoder(nn.Module):  # the release's class: model + transforms + a cache path
        def __init__(self):
            super().__init__()
            self.model, self.train_preprocess, self.val_preprocess = model, train_pre, val_pre
            self.cache_dir = "/checkpoints/cache"

    mod.ImageEncoder = _pickle_as(ImageEncoder, "src.modeling", "ImageEncoder")
    path = tmp / "finetuned.pt"
    try:
        torch.save(ImageEncoder(), str(path))
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return path, {k: v.detach().clone() for k, v in tensors}  # non-persistent buffers (attn_mask) too


def test_release_style_image_encoder_loads_with_equal_tensors(release_style_encoder):
    path, want = release_style_encoder
    with pytest.raises(Exception):  # torch's own safe loader refuses it: the pickle path is needed
        torch.load(str(path), weights_only=True)
    got = read_torch_checkpoint(path)
    got = {k[len("model."):]: v for k, v in got.items() if k.startswith("model.")}
    assert set(got) == set(want) and len(want) > 10
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_unknown_modules_are_never_imported(tmp_path, monkeypatch):
    """A global from an importable module becomes a stub: its module's import-time code never runs."""
    marker = tmp_path / "imported"
    (tmp_path / "sec_evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sec_evilmod

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.arange(4.0))
            self.thing = sec_evilmod.Thing()

    Holder = _pickle_as(Holder, "sec_evilmod", "Holder")
    sec_evilmod.Holder = Holder
    torch.save(Holder(), str(tmp_path / "h.pt"))
    marker.unlink()
    del sys.modules["sec_evilmod"]
    got = read_torch_checkpoint(tmp_path / "h.pt")
    assert torch.equal(got["w"], torch.arange(4.0))
    assert not marker.exists() and "sec_evilmod" not in sys.modules


# ---- malicious pickles ---------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)`` (a nested ``_Reduce`` pickles as its own call)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *a):  # pickle requires the reduce callable to be callable
        raise AssertionError("never called while pickling")


def _payloads(target: Path) -> dict[str, object]:
    cmd = f"touch {target}"
    imp_os = _Reduce(builtins.__import__, "os")
    system = _Reduce(getattr, imp_os, "system")
    return {
        "os.system": _Reduce(os.system, cmd),
        "eval": _Reduce(builtins.eval, f"__import__('os').system({cmd!r})"),
        "exec": _Reduce(builtins.exec, f"import os; os.system({cmd!r})"),
        "getattr chain": _Reduce(system, cmd),
        "subprocess": _Reduce(subprocess.call, ["touch", str(target)]),
        "functools.partial": _Reduce(functools.partial(os.system, cmd)),
        "operator.methodcaller": _Reduce(operator.methodcaller("system", cmd), imp_os),
    }


def _nested(payload):
    """The payload hidden inside an nn.Module's __dict__ next to real parameters."""
    m = nn.Linear(2, 2)
    m.__dict__["extra"] = {"meta": [payload]}
    return m


@pytest.mark.parametrize("nested", [False, True], ids=["top", "in_module_dict"])
@pytest.mark.parametrize("kind", ["os.system", "eval", "exec", "getattr chain", "subprocess", "functools.partial", "operator.methodcaller"])
def test_malicious_pickle_refused_without_side_effect(tmp_path, kind, nested):
    live = tmp_path / "live"
    payload = _payloads(live)[kind]
    path = tmp_path / "finetuned.pt"
    torch.save(_nested(payload) if nested else payload, str(path))
    # the payload is real: plain pickle loading runs it
    try:
        torch.load(str(path), weights_only=False)
    except Exception:
        pass
    assert live.exists(), f"payload {kind} did not run under plain torch.load"

    target = tmp_path / "pwned"
    path2 = tmp_path / "finetuned2.pt"
    torch.save(_nested(_payloads(target)[kind]) if nested else _payloads(target)[kind], str(path2))
    with pytest.raises(UnsafeCheckpoint) as info:
        read_torch_checkpoint(path2)
    msg = str(info.value)
    assert str(path2) in msg
    named = re.search(r"global '([\w.]+)\.(\w+)'", msg)
    assert named and named.group(2) in {"system", "eval", "exec", "getattr", "__import__", "call", "partial", "methodcaller"}, msg
    assert not target.exists()


def test_refusal_reaches_the_user_as_one_featcal_line(tmp_path):
    from featcal.backbone.openclip import OpenCLIPVisionBackbone

    target = tmp_path / "pwned"
    torch.save(_payloads(target)["os.system"], str(tmp_path / "zeroshot.pt"))
    adapter = OpenCLIPVisionBackbone(["mnist"], "zeroshot.pt", {"mnist": "zeroshot.pt"}, checkpoint_dir=str(tmp_path))
    with pytest.raises(UnsafeCheckpoint, match=r"zeroshot\.pt.*posix\.system|zeroshot\.pt.*os\.system"):
        adapter.load_base()
    assert not target.exists()


def test_allowlist_decisions():
    from featcal.safe_pickle import refusal

    for mod, name in [("posix", "system"), ("nt", "system"), ("builtins", "getattr"), ("builtins", "__import__"),
                      ("importlib", "import_module"), ("subprocess", "Popen"), ("_posixsubprocess", "fork_exec"),
                      ("torch.hub", "load"), ("numpy", "load"), ("runpy", "run_path"), ("copyreg", "_reconstructor"),
                      ("some.pkg", "eval"), ("torch", "__builtins__")]:
        assert refusal(mod, name), (mod, name)
    for mod, name in [("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch", "float32"),
                      ("src.modeling", "ImageEncoder"), ("open_clip.transform", "_convert_to_rgb"),
                      ("torch.nn.modules.linear", "Linear")]:
        assert not refusal(mod, name), (mod, name)


# ---- the other load paths ------------------------------------------------------------

ALLOWLISTED_READER = "featcal/safe_pickle.py"


def test_no_unsafe_load_outside_the_allowlisted_reader():
    """The package never unpickles outside featcal/safe_pickle.py and never trusts remote code."""
    patterns = {
        "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
        "pickle.load": re.compile(r"\b(c?pickle|dill|joblib)\.loads?\b|\bUnpickler\b(?!\w)"),
        "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True|trust_remote_code:\s*true"),
        "eval/exec": re.compile(r"(?<![\w.])(?<!def )(eval|exec)\("),
    }
    hits = []
    files = [p for p in (ROOT / "featcal").rglob("*.py")] + list((ROOT / "conf").rglob("*.yaml"))
    assert len(files) > 20
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        if rel == ALLOWLISTED_READER:
            continue
        text = f.read_text()
        for what, pat in patterns.items():
            for m in pat.finditer(text):
                line = text[: m.start()].count("\n") + 1
                hits.append(f"{rel}:{line}: {what}")
        for m in re.finditer(r"torch\.load\(", text):  # the call's next 300 characters must say weights_only=True
            if not re.match(r"[^\n]*(\n[^\n]*){0,3}?weights_only\s*=\s*True", text[m.end(): m.end() + 300]):
                hits.append(f"{rel}:{text[: m.start()].count(chr(10)) + 1}: torch.load without weights_only=True")
    assert not hits, hits
    # and the allowlisted reader does use pickle (the grep would see a regression there too)
    assert "weights_only=False" in (ROOT / ALLOWLISTED_READER).read_text()
