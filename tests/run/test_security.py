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

ROOT = Path(__file__).resolve().parents[2]

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
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
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


# ---- secrets never land in artifacts -------------------------------------------------

SECRETS = {
    "WANDB_API_KEY": "wandbkey0123456789abcdef0123456789abcdef",
    "HF_TOKEN": "hf_SecretTokenAbCdEf0123456789xyz",
    "HUGGING_FACE_HUB_TOKEN": "hf_OtherSecretToken9876543210abc",
}


@pytest.mark.slow
def test_secrets_never_land_in_what_a_run_writes(tmp_path):
    """A sweep (W&B offline logging on), then featcal-report collect and featcal-report, with the
    tokens in the environment: no file any of them wrote contains a token."""
    from featcal.utils import cache_root
    from tests.fixtures.e2e import isolated_env, run_module

    env = isolated_env(tmp_path)
    env["FEATCAL_CACHE"] = str(cache_root())  # the shared embedded suite (not written by this run's config)
    env.update(SECRETS)
    sweep = tmp_path / "sweep"
    run_module("featcal.run", ["-m", "backbone=embedded_small", "budget.per_task=8", "logger=wandb", "logger.mode=offline",
                               "evaluate_experts=false", "evaluate_base=false", f"hydra.sweep.dir={sweep}"], env, cwd=tmp_path)
    run_module("featcal.report", ["collect", str(sweep)], env, cwd=tmp_path)
    run_module("featcal.report", [str(sweep)], env, cwd=tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # the artifacts we mean to check are all there
    assert {"results.json", "config.yaml", "hydra.yaml", "overrides.yaml"} <= names, sorted(names)
    assert any(p.suffix == ".wandb" for p in files) and any(n.endswith(".log") for n in names)
    assert any("report" in p.parts for p in files)
    leaks = [f"{p.relative_to(tmp_path)}: {k}" for p in files for k, v in SECRETS.items() if v.encode() in p.read_bytes()]
    assert not leaks, leaks


# ---- model-written code: opt-in, fenced, pass@k --------------------------------------


def test_pass_at_k_matches_brute_force():
    """Unbiased pass@k = P(a random k-subset of the n samples holds a passing one), enumerated."""
    from itertools import combinations

    from featcal.tasks.code_exec import pass_at_k

    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))  # samples 0..c-1 pass
                want = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - want) < 1e-12, (n, c, k)
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200, abs=1e-12)  # pass@1 = c / n
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def _fence(**kw):
    from featcal.sandbox import Limits

    return Limits(**{"cpu_seconds": 5, "wall_seconds": 30.0, "memory_mb": 1024, **kw})


def test_fence_runs_programs_without_secrets_in_a_temporary_folder(monkeypatch):
    from featcal.sandbox import run_program

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    assert run_program("print('ok')", _fence()).status == "passed"
    assert run_program("assert 1 == 2", _fence()).status == "failed"
    probe = (
        "import os, sys\n"
        "print('ENV', sorted(os.environ))\n"
        "print('CWD', os.getcwd())\n"
        "open('scratch.txt', 'w').write('x')\n"
        "assert os.environ['HOME'] == os.getcwd() and sys.flags.isolated\n"
    )
    out = run_program(probe, _fence())
    assert out.status == "passed", out.output
    env_names = eval(out.output.split("ENV ", 1)[1].splitlines()[0])  # noqa: S307 (our own probe's output)
    assert not {"HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY"} & set(env_names)
    assert set(env_names) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "LC_CTYPE"}
    cwd = out.output.split("CWD ", 1)[1].splitlines()[0]
    assert "featcal-code-" in cwd and not os.path.exists(cwd)  # its own folder, removed afterwards


def test_fence_limits_cpu_memory_and_wall_clock():
    import time

    from featcal.sandbox import run_program

    t0 = time.time()
    spin = run_program("while True:\n    pass\n", _fence(cpu_seconds=1, wall_seconds=60))
    assert spin.status == "timeout" and spin.returncode is not None  # killed by the CPU limit, not the wall clock
    assert time.time() - t0 < 50
    hog = run_program("x = bytearray(4 * 2**30)\n", _fence(memory_mb=512))
    assert hog.status == "failed" and "MemoryError" in hog.output
    t0 = time.time()
    sleeper = run_program(
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '300'])\n"
        "print('CHILD', p.pid, flush=True)\n"
        "time.sleep(300)\n",
        _fence(wall_seconds=3),
    )
    assert sleeper.status == "timeout" and sleeper.returncode is None and time.time() - t0 < 30
    pid = int(sleeper.output.split("CHILD ", 1)[1].split()[0])
    for _ in range(50):  # the whole process group went: the grandchild too
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {pid} survived the wall-clock kill")


def test_fence_cuts_the_network_where_the_os_allows():
    import socket

    from featcal.sandbox import network_isolation, run_program

    how = network_isolation()
    if not how.startswith("unshare"):
        pytest.skip(f"no network namespace on this machine: {how}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).close()\nprint('connected')\n"
    try:
        plain = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0, plain.stderr  # reachable without the fence
        fenced = run_program(client, _fence())
        assert fenced.status == "failed" and "connected" not in fenced.output
    finally:
        server.close()


HUMANEVAL_STYLE = [  # HumanEval's schema: task_id, prompt, canonical_solution, test, entry_point
    {"task_id": "Local/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Local/1", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
     "canonical_solution": "    return 2 * x\n", "entry_point": "double",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]


def test_fenced_code_eval_scores_pass_at_k():
    from featcal.tasks.code_exec import FencedCodeEval

    refs = [p["test"] + f"\ncheck({p['entry_point']})" for p in HUMANEVAL_STYLE]
    p0, p1 = HUMANEVAL_STYLE[0]["prompt"], HUMANEVAL_STYLE[1]["prompt"]
    preds = [
        [p0 + "    return a + b\n", p0 + "    return a - b\n", p0 + "    return b + a\n"],  # 2 of 3 pass
        [p1 + "    return x + 2\n", p1 + "    import os; os._exit(3)\n"],  # 0 of 2 pass
    ]
    scores, per = FencedCodeEval(_fence()).compute(references=refs, predictions=preds, k=[1, 2])
    assert [o.status for o in per[0]] == ["passed", "failed", "passed"]
    assert scores["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["pass@2"] == pytest.approx((1.0 + 0) / 2)
    with pytest.raises(Exception, match="allow_code_execution"):
        FencedCodeEval(_fence(), allowed=False).compute(references=refs, predictions=preds, k=[1])


def test_lm_eval_humaneval_task_scores_in_the_fence(tmp_path):
    """lm-eval's own humaneval task file (its metric calls evaluate.load("code_eval"), which
    needs the hub) on a local stand-in in HumanEval's schema, answered by a scripted model:
    pass@1 comes from featcal's fence."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from featcal.tasks.code_exec import fenced_code_eval

    data = tmp_path / "humaneval_local.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in HUMANEVAL_STYLE))
    he_yaml = Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml"
    (tmp_path / "humaneval_local.yaml").write_text(
        f"include: {he_yaml}\ntask: humaneval_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    )
    answers = {HUMANEVAL_STYLE[0]["prompt"]: "    return a + b\n", HUMANEVAL_STYLE[1]["prompt"]: "    return x * 3\n"}

    class Scripted(LM):
        def generate_until(self, requests):
            return [answers[r.args[0]] for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    with fenced_code_eval(True, _fence()) as scorer:
        res = lm_eval.simple_evaluate(model=Scripted(), tasks=["humaneval_local"],
                                      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                      confirm_run_unsafe_code=True, bootstrap_iters=0)
    values = res["results"]["humaneval_local"]
    assert values["pass@1,create_test"] == pytest.approx(0.5)  # add passes, the tripled double fails
    assert scorer.programs_run >= 2


def test_code_tasks_skipped_without_the_opt_in(caplog):
    from featcal.tasks.code_exec import gate
    from featcal.tasks.mergebench import MergeBenchTaskPool

    tasks = {"coding": ["humaneval_plus", "mbpp_plus"], "math": ["gsm8k_cot"]}
    with caplog.at_level("WARNING"):
        kept, statement = gate(tasks, allowed=False)
    assert kept == {"coding": [], "math": ["gsm8k_cot"]}
    assert statement["allowed"] is False and statement["code_tasks"] == ["humaneval_plus", "mbpp_plus"]
    assert "allow_code_execution=true" in caplog.text and "humaneval_plus" in caplog.text
    kept, statement = gate(tasks, allowed=True)
    assert kept == tasks and statement["fence"]["cpu_seconds"] > 0 and "network" in statement["fence"]
    pool = MergeBenchTaskPool(["coding"], "tok", {"coding": "d"}, tasks)
    assert pool.lm_eval_tasks == {"coding": []} and pool.code_execution["allowed"] is False
    assert MergeBenchTaskPool.validate_config({"tasks": ["coding"], "datasets": {"coding": "d"}, "lm_eval_tasks": tasks,
                                               "allow_code_execution": "yes"})


def test_mergebench_configs_default_to_no_code_execution():
    from featcal.config import compose

    files = sorted((ROOT / "conf" / "backbone").glob("mergebench*.yaml"))
    assert files
    for f in files:
        node = compose([f"backbone={f.stem}"]).backbone.taskpool  # the preset's task pool (conf/taskpool)
        assert node.allow_code_execution is False, f


@pytest.mark.slow
def test_code_task_opt_in_and_fence_reach_results_and_log(tmp_path):
    """featcal-run on the MergeBench pool (tiny local Llama world) with a code task built on
    lm-eval's own humaneval.yaml: with the opt-in its programs run fenced and results.json
    states the opt-in and the fence; without it the task is skipped with the warning."""
    import lm_eval

    from tests.fixtures.e2e import run_module
    from tests.fixtures.llm import build_world
    from tests.fixtures.mergebench import write_task_data

    base, experts = build_world(tmp_path / "world", "llama", layers=2, steps=2)
    data = write_task_data(tmp_path, n=12)
    (tmp_path / "he.jsonl").write_text("".join(json.dumps(p) + "\n" for p in HUMANEVAL_STYLE))
    he_yaml = Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml"
    (tmp_path / "humaneval_local.yaml").write_text(
        f"include: {he_yaml}\ntask: humaneval_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'he.jsonl'}\n"
        "generation_kwargs:\n  until: ['\\nclass', '\\ndef']\n  max_gen_toks: 8\n  do_sample: false\n"
    )
    env = dict(os.environ, FEATCAL_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    common = [
        "backbone=mergebench_llama32_3b", "merge=task_arithmetic", "calibration=none", "logger=none", "device=cpu",
        "backbone.adapter.tasks=[coding,math]", f"backbone.adapter.base={base}",
        f"backbone.adapter.experts.coding={experts['coding']}", f"backbone.adapter.experts.math={experts['math']}",
        f"backbone.taskpool.datasets.coding={data['coding']}", f"backbone.taskpool.datasets.math={data['math']}",
        "backbone.taskpool.lm_eval_tasks.coding=[humaneval_local]", "backbone.taskpool.lm_eval_tasks.math=[tiny_mc]",
        f"backbone.taskpool.lm_eval_include=[{tmp_path}]", "backbone.taskpool.lm_eval_defaults=false",
        "backbone.taskpool.max_length=64", "budget.per_task=4", "budget.batch_size=2", "eval.limit=2",
        "eval_batch_size=2", "evaluate_base=false", "evaluate_experts=false",
    ]
    from tests.fixtures.mergebench import write_lm_eval_tasks

    write_lm_eval_tasks(tmp_path)
    on = run_module("featcal.run", [*common, "backbone.taskpool.allow_code_execution=true", f"hydra.run.dir={tmp_path / 'on'}"],
                    env, cwd=tmp_path)
    res = json.loads((tmp_path / "on" / "results.json").read_text())
    ce = res["code_execution"]
    assert ce["allowed"] is True and ce["code_tasks"] == ["humaneval_local"]
    assert ce["fence"]["cpu_seconds"] > 0 and ce["fence"]["memory_mb"] > 0 and ce["fence"]["network"]
    assert 0.0 <= res["metrics"]["merged"]["coding"]["humaneval_local/pass@1"] <= 100.0
    log_text = on.stdout + on.stderr + (tmp_path / "on" / "run.log").read_text()
    assert "allow_code_execution=true" in log_text and "fenced" in log_text

    off = run_module("featcal.run", [*common, f"hydra.run.dir={tmp_path / 'off'}"], env, cwd=tmp_path)
    res = json.loads((tmp_path / "off" / "results.json").read_text())
    assert res["code_execution"]["allowed"] is False
    assert "coding" not in res["metrics"]["merged"] and "math" in res["metrics"]["merged"]
    assert "skipping ['humaneval_local']" in off.stdout + off.stderr + (tmp_path / "off" / "run.log").read_text()


def test_patching_an_allowlisted_class_is_refused():
    """GLOBAL torch.Tensor + BUILD {'__repr__': ...}: a BUILD on a class object is refused
    outright (defence in depth: for today's allowlist plain pickle fails on it too, but an
    allowlisted plain Python class would be patched for the whole process)."""
    import io

    from featcal.safe_pickle import AllowlistUnpickler

    raw = b"\x80\x02ctorch\nTensor\n}X\x08\x00\x00\x00__repr__cbuiltins\nset\nsb."
    before = torch.Tensor.__repr__
    with pytest.raises(UnsafeCheckpoint, match=r"sets attributes on the class 'torch\.(_tensor\.)?Tensor'"):
        AllowlistUnpickler(io.BytesIO(raw)).load()
    assert torch.Tensor.__repr__ is before
    ok = b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb."  # BUILD on an instance still works
    assert isinstance(AllowlistUnpickler(io.BytesIO(ok)).load(), dict)


def test_pool_installs_the_fence_for_code_eval():
    """After the task pool's gate, evaluate.load("code_eval") (what lm-eval's code tasks call)
    is featcal's fenced scorer, refusing unless allowed; other metrics are untouched."""
    import evaluate

    from featcal.tasks.code_exec import FencedCodeEval, gate

    gate({"coding": ["humaneval_plus"]}, allowed=False)
    scorer = evaluate.load("code_eval")
    assert isinstance(scorer, FencedCodeEval) and scorer.allowed is False
    with pytest.raises(Exception, match="allow_code_execution"):
        scorer.compute(references=["assert True"], predictions=[["pass"]], k=[1])
    gate({"coding": ["humaneval_plus"]}, allowed=True)
    scorer = evaluate.load("code_eval")
    assert scorer.allowed is True
    assert scorer.compute(references=["assert f() == 1"], predictions=[["def f():\n    return 1\n"]], k=[1])[0] == {"pass@1": 1.0}
