"""The merge registry (featcal/merge/registry.py): every method is one record, and merging
through the record (as ``merge=<option>`` builds it) gives bitwise the state dict of a
direct call of the method's function, in memory and, where the method has one, streamed."""
import functools
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from featcal.merge.registry import METHODS, Merge, MergeMethod, as_merge, build_merge
from featcal.merge.streaming import stream_merge
from featcal.paths import conf_dir

N_TASKS = 3
#: keyword arguments a method's function takes besides its declared parameters: the state
#: dicts, the adapter's exclusion and the run's data (``needs_calibration_data`` / ``needs_heads``)
CALL_ARGS = {"base", "experts", "exclude", "backbone", "base_model", "expert_models", "calib", "device", "heads", "history"}


class _Represent:
    """The one thing RegMean and AdaMerging ask of a backbone: its final representation."""

    def represent(self, model, inputs):
        return model(inputs)


class _Tiny(nn.Module):
    """Two Linears that run, an integer buffer (passes through) and three tables the forward
    does not use: ``embed`` and ``lm_head`` are excluded from merges (kept at the base value;
    merge=ties_mergebench counts lm_head in its trim), ``shared`` is merged
    (merge=ties_fusionbench_t5 counts it 3 times)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.embed, self.shared, self.lm_head = nn.Embedding(7, 3), nn.Embedding(7, 3), nn.Embedding(3, 3)
        self.register_buffer("position_ids", torch.arange(5))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def world(one_thread):
    """A base and 3 experts (tiny MLPs, float32), their state dicts with an integer buffer
    and a key the adapter excludes, calibration batches and class heads per task."""
    torch.manual_seed(0)
    base = _Tiny().eval()
    experts = []
    for t in range(N_TASKS):
        e = _Tiny().eval()
        e.load_state_dict({k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in base.state_dict().items()})
        experts.append(e)

    calib = [[torch.randn(4, 6) + 0.3 * t for _ in range(2)] for t in range(N_TASKS)]
    heads = [nn.Linear(4, 3) for _ in range(N_TASKS)]
    return dict(base=base, experts=experts, base_sd=base.state_dict(), expert_sds=[e.state_dict() for e in experts],
                calib=calib, heads=heads, exclude=lambda k: k.startswith(("embed.", "lm_head.")))


def _data(world, method: MergeMethod) -> dict:
    """What the run hands a method that reads the calibration set (``run.py``)."""
    if not method.needs_calibration_data:
        return {}
    data = dict(backbone=_Represent(), base_model=world["base"], expert_models=world["experts"],
                calib=world["calib"], device="cpu")
    if method.needs_heads:
        data["heads"] = world["heads"]
    return data


def _options():
    return sorted(p.stem for p in (conf_dir() / "merge").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _composed(option: str) -> str:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"merge={option}"])
    return OmegaConf.to_yaml(cfg.merge, resolve=True)


def _merge_node(option: str) -> dict:
    """The resolved ``merge`` node of ``merge=<option>`` (as the run composes it)."""
    return OmegaConf.to_container(OmegaConf.create(_composed(option)))


def _quick(node: dict) -> dict:
    """Cheaper parameters, the same for both paths: AdaMerging's Adam steps cut to 3,
    merge=ties_surgery_clip's 25.6 M extra zero entries in the trim to 1000."""
    node = dict(node, steps=3) if "steps" in node else dict(node)
    if node.get("trim_extra_zeros"):
        node["trim_extra_zeros"] = 1000
    return node


def _assert_bitwise(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_every_merge_option_names_a_registered_method():
    seen = set()
    for option in _options():
        merge = build_merge(_merge_node(option))
        assert isinstance(merge, Merge) and METHODS[merge.name] is merge.method, option
        seen.add(merge.name)
    assert seen == set(METHODS)  # no record without a config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declared_parameters_are_the_functions_own(name):
    m = METHODS[name]
    sig = inspect.signature(m.function).parameters
    declared = {p.name: p.default for p in m.params}
    assert set(declared) == set(sig) - CALL_ARGS, name
    for key, default in declared.items():
        assert sig[key].default == default, (name, key)
        assert m.validate_config({key: default}) == [], (name, key)  # the defaults pass their own checks


@pytest.mark.parametrize("option", _options())
def test_registry_merge_is_bitwise_the_direct_call(world, option):
    node = _quick(_merge_node(option))
    merge = build_merge(node)
    data = _data(world, merge.method)
    got = merge(world["base_sd"], world["expert_sds"], exclude=world["exclude"], **data)
    params = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
    want = merge.method.function(world["base_sd"], world["expert_sds"], exclude=world["exclude"], **data, **params)
    _assert_bitwise(got, want)
    assert torch.equal(got["embed.weight"], world["base_sd"]["embed.weight"])
    assert torch.equal(got["position_ids"], world["base_sd"]["position_ids"])
    assert not torch.equal(got["net.0.weight"], world["base_sd"]["net.0.weight"])  # something merged


def _folder(path: Path, sd: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return _folder(root / "base", world["base_sd"]), [_folder(root / f"e{t}", sd) for t, sd in enumerate(world["expert_sds"])]


@pytest.mark.parametrize("option", [o for o in _options() if METHODS[build_merge(_merge_node(o)).name].streaming])
def test_streamed_registry_merge_is_bitwise_the_direct_call(world, folders, tmp_path, option):
    from safetensors.torch import load_file

    node = _quick(_merge_node(option))
    merge = build_merge(node)
    params = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
    base, experts = folders
    if params.get("trim_also"):  # the streaming passes see the merged keys only: refused, and said so
        with pytest.raises(ValueError, match="trim_also"):
            stream_merge(merge, base, experts, tmp_path / "m", exclude=world["exclude"], progress=False)
        return
    out = stream_merge(merge, base, experts, tmp_path / "m", exclude=world["exclude"], progress=False)
    got = load_file(str(out / "model.safetensors"))
    want = merge.method.function(world["base_sd"], world["expert_sds"], exclude=world["exclude"], **params)
    _assert_bitwise({k: got[k] for k in want}, want)
    # the Python API's partial of the function streams the same bytes
    legacy = stream_merge(functools.partial(merge.method.function, **params), base, experts, tmp_path / "p",
                          exclude=world["exclude"], progress=False)
    assert (legacy / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_in_memory_only_methods_say_so():
    for name in ("regmean", "adamerging"):
        with pytest.raises(ValueError, match=f"merge '{name}' needs calibration data .* no streaming version"):
            METHODS[name]().streaming()
    streamable = [n for n, m in METHODS.items() if m.streaming]
    assert streamable == ["weight_average", "task_arithmetic", "ties", "dare"]


def test_as_merge_binds_functions_partials_and_user_merges():
    from featcal.merge import ties

    m = as_merge(functools.partial(functools.partial(ties, density=0.3), scaling_factor=0.4))
    assert m.method is METHODS["ties"] and dict(m.params) == {"density": 0.3, "scaling_factor": 0.4}
    assert m.arguments()["merge_func"] == "sum" and as_merge(m) is m and as_merge(ties).params == {}
    import pickle

    back = pickle.loads(pickle.dumps(m))
    assert back.method is METHODS["ties"] and back.params == m.params

    def mine(base, experts, exclude=None, calib=None):
        return base

    mine.needs_calibration_data = True
    user = as_merge(functools.partial(mine, calib=None))
    assert not user.method.registered and user.needs_calibration_data and not user.needs_heads
    with pytest.raises(ValueError, match="merge 'mine' needs calibration data"):
        user.streaming()
    with pytest.raises(TypeError, match=r"merge 'ties' takes no parameter\(s\) \['densty'\]"):
        METHODS["ties"](densty=0.2)


def test_streamed_merge_cache_key_is_unchanged():
    """A streamed merge's folder is keyed by ``merge_recipe``: the same dict as before the
    registry, so merged folders already on disk are reused."""
    from featcal.merge.streaming import merge_recipe
    from featcal.merge import task_arithmetic

    want = {"sources": ["b", "e"], "merge": "featcal.merge.task_arithmetic.task_arithmetic",
            "kwargs": {"scaling_factor": "0.3"}}
    assert merge_recipe(functools.partial(task_arithmetic, scaling_factor=0.3), ["b", "e"]) == want
    assert merge_recipe(build_merge(_merge_node("task_arithmetic")), ["b", "e"]) == want


def test_config_checks_and_unknown_keys_come_from_the_record():
    from featcal.config import validate
    from featcal.errors import ConfigError
    from featcal.strict import accepted_keys

    assert accepted_keys("featcal.merge.registry.TIES") == {p.name for p in METHODS["ties"].params}
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["merge=dare", "merge.drop_rate=1.0", "merge.rescale=yes"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "merge.drop_rate=1.0: must be a number in [0, 1)" in str(err.value)
    assert "merge.rescale='yes': must be true or false" in str(err.value)
