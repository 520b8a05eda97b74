"""Merge methods against hand-computed small tensors."""
import pytest
import torch

from featcal.merge import dare, global_trim_threshold, task_arithmetic, ties, weight_average


def sd(w, b=None):
    out = {"w": torch.tensor(w, dtype=torch.float32), "ids": torch.tensor([0, 1, 2])}
    if b is not None:
        out["b"] = torch.tensor(b, dtype=torch.float32)
    return out


def test_weight_average_hand_computed():
    base = sd([0.0, 0.0])
    out = weight_average(base, [sd([1.0, 3.0]), sd([3.0, -1.0])])
    assert torch.equal(out["w"], torch.tensor([2.0, 1.0]))


def test_task_arithmetic_hand_computed():
    base = sd([1.0, 1.0, 1.0])
    experts = [sd([2.0, 1.0, 0.0]), sd([1.0, 3.0, 0.0])]
    # task vectors: [1,0,-1] and [0,2,-1]; sum [1,2,-2]; base + 0.5*sum
    out = task_arithmetic(base, experts, scaling_factor=0.5)
    assert torch.allclose(out["w"], torch.tensor([1.5, 2.0, 0.0]))


def test_ties_hand_computed():
    base = sd([0.0, 0.0, 0.0, 0.0])
    # density 0.5 over N = 4 entries: k = 2, threshold = the (4 - 2) = 2nd smallest |τ|,
    # entries with |τ| >= threshold kept (3 of 4 here, as in the reference code)
    e1 = sd([4.0, -1.0, 3.0, 0.5])   # |τ| sorted 0.5, 1, 3, 4 -> thr 1 -> keeps 4, -1, 3
    e2 = sd([-2.0, 5.0, -1.0, 0.1])  # 0.1, 1, 2, 5 -> thr 1 -> keeps -2, 5, -1
    e3 = sd([1.0, 0.0, -6.0, 2.0])   # 0, 1, 2, 6 -> thr 1 -> keeps 1, -6, 2
    # trimmed: [4,-1,3,0], [-2,5,-1,0], [1,0,-6,2]; sums [3,4,-4,2] -> signs [+,+,-,+]
    # agreeing entries: [4 & 1, 5, -1 & -6, 2]
    out = ties(base, [e1, e2, e3], scaling_factor=1.0, density=0.5)
    assert torch.allclose(out["w"], torch.tensor([5.0, 5.0, -7.0, 2.0]))  # disjoint sum (default)
    out = ties(base, [e1, e2, e3], scaling_factor=0.3, density=0.5)
    assert torch.allclose(out["w"], 0.3 * torch.tensor([5.0, 5.0, -7.0, 2.0]))
    out = ties(base, [e1, e2, e3], scaling_factor=1.0, density=0.5, merge_func="mean")
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0, -3.5, 2.0]))
    out = ties(base, [e1, e2, e3], scaling_factor=1.0, density=0.5, merge_func="max")
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0, -6.0, 2.0]))


def test_ties_trims_over_the_whole_flattened_task_vector():
    """One threshold per task over all merged tensors, not a top-20 % per tensor."""
    base = {"a": torch.zeros(4), "b": torch.zeros(6), "ids": torch.tensor([1, 2])}
    expert = {"a": torch.tensor([9.0, -1.0, 0.5, 8.0]), "b": torch.tensor([2.0, -7.0, 0.1, 0.2, 3.0, -0.3]),
              "ids": torch.tensor([1, 2])}
    # N = 10, density 0.2: k = 2, threshold = 8th smallest |τ| of
    # 0.1 0.2 0.3 0.5 1 2 3 7 8 9  -> 7; kept: 9 and 8 (in a), -7 (in b)
    thr = global_trim_threshold(base, expert, ["a", "b"], 0.2)
    assert float(thr) == 7.0
    out = ties(base, [expert], scaling_factor=1.0, density=0.2)
    assert torch.equal(out["a"], torch.tensor([9.0, 0.0, 0.0, 8.0]))
    assert torch.equal(out["b"], torch.tensor([0.0, -7.0, 0.0, 0.0, 0.0, 0.0]))
    # a per-tensor trim would have kept b's own top entries (e.g. 3.0): the global one does not
    assert out["b"][4] == 0.0
    # entries equal to the threshold are kept (|x| >= k-th value)
    expert["b"][4] = 7.0
    out = ties(base, [expert], scaling_factor=1.0, density=0.2)
    assert torch.equal(out["b"], torch.tensor([0.0, -7.0, 0.0, 0.0, 7.0, 0.0]))
    assert torch.equal(out["ids"], base["ids"])


def test_ties_zero_elected_sign_takes_the_global_majority_sign():
    # key a: τ = +2 and -2 -> summed mass 0 -> elected sign 0
    # key b: elected signs +, + -> majority (sign of Σ elected signs over ALL entries) = +
    base = {"a": torch.zeros(1), "b": torch.zeros(2)}
    e1 = {"a": torch.tensor([2.0]), "b": torch.tensor([1.0, 1.0])}
    e2 = {"a": torch.tensor([-2.0]), "b": torch.tensor([1.0, 0.0])}
    out = ties(base, [e1, e2], scaling_factor=1.0, density=1.0)
    assert torch.equal(out["a"], torch.tensor([2.0]))  # the + entry agrees with the majority
    assert torch.equal(out["b"], torch.tensor([2.0, 1.0]))
    # flip the majority: b's elected signs -, - -> a takes -2
    e1["b"], e2["b"] = -e1["b"], -e2["b"]
    out = ties(base, [e1, e2], scaling_factor=1.0, density=1.0)
    assert torch.equal(out["a"], torch.tensor([-2.0]))
    # mean and max use the resolved sign too
    out = ties(base, [e1, e2], scaling_factor=1.0, density=1.0, merge_func="max")
    assert torch.equal(out["a"], torch.tensor([-2.0])) and torch.equal(out["b"], torch.tensor([-1.0, -1.0]))


def test_ties_disjoint_sum_mean_max():
    base = sd([1.0, 1.0, 1.0])
    tvs = [[3.0, -1.0, 2.0], [1.0, 2.0, -4.0], [-5.0, 4.0, 1.0]]
    experts = [sd([1.0 + v for v in tv]) for tv in tvs]
    # sums [-1, 5, -1] -> signs [-, +, -]; agreeing: [-5], [2, 4], [-4]
    expect = {"sum": [-5.0, 6.0, -4.0], "mean": [-5.0, 3.0, -4.0], "max": [-5.0, 4.0, -4.0]}
    for func, agg in expect.items():
        out = ties(base, experts, scaling_factor=0.5, density=1.0, merge_func=func)
        assert torch.allclose(out["w"], 1.0 + 0.5 * torch.tensor(agg)), func


def _ties_flat_reference(base, experts, keys, lam, density, merge_func):
    """The definition on one [T, N] matrix of flattened task vectors (brute force)."""
    flat = torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in keys]) for e in experts])
    n = flat.shape[1]
    k = int(n * density)
    thr = flat.abs().kthvalue(n - k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    sel = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    if merge_func == "sum":
        agg = sel.sum(0)
    elif merge_func == "mean":
        agg = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    else:
        agg = sel.abs().max(0).values * sign
    out, offset = {}, 0
    for key in keys:
        m = base[key].numel()
        out[key] = base[key] + lam * agg[offset : offset + m].view_as(base[key])
        offset += m
    return out


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_streaming_matches_the_flattened_definition(merge_func):
    g = torch.Generator().manual_seed(0)
    shapes = {"l1.weight": (7, 5), "l1.bias": (7,), "l2.weight": (3, 7), "norm.weight": (3,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)]
    # equal-magnitude entries across the threshold and exact sign cancellations
    experts[1]["l1.bias"] = base["l1.bias"] - (experts[0]["l1.bias"] - base["l1.bias"])
    for density in (0.2, 0.5):
        got = ties(base, experts, scaling_factor=0.3, density=density, merge_func=merge_func)
        ref = _ties_flat_reference(base, experts, list(shapes), 0.3, density, merge_func)
        for k in shapes:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_ties_rejects_unknown_merge_func_and_density():
    with pytest.raises(ValueError, match="merge_func"):
        ties(sd([0.0]), [sd([1.0])], merge_func="median")
    with pytest.raises(ValueError, match="density"):
        ties(sd([0.0]), [sd([1.0])], density=0.0)


def test_non_float_and_excluded_pass_through():
    base = sd([0.0, 0.0], b=[1.0])
    experts = [sd([1.0, 1.0], b=[5.0]), sd([1.0, 1.0], b=[7.0])]
    experts[0]["ids"] = torch.tensor([9, 9, 9])
    for fn in (weight_average, task_arithmetic, ties, dare):
        out = fn(base, experts, exclude=lambda k: k == "b")
        assert torch.equal(out["ids"], base["ids"])
        assert out["ids"].dtype == torch.int64
        assert torch.equal(out["b"], base["b"])


def test_dtype_preserved_bf16():
    base = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    out = task_arithmetic(base, [{"w": torch.ones(3, dtype=torch.bfloat16)}], scaling_factor=0.5)
    assert out["w"].dtype == torch.bfloat16
    assert torch.allclose(out["w"].float(), torch.full((3,), 0.5))


def test_dare_rescales_and_is_seeded():
    base = {"w": torch.zeros(20000)}
    experts = [{"w": torch.ones(20000)}]
    a = dare(base, experts, scaling_factor=1.0, drop_rate=0.5, seed=3)
    b = dare(base, experts, scaling_factor=1.0, drop_rate=0.5, seed=3)
    assert torch.equal(a["w"], b["w"])
    kept = a["w"] != 0
    assert torch.allclose(a["w"][kept], torch.tensor(2.0))
    assert 0.45 < kept.float().mean() < 0.55
    assert abs(a["w"].mean().item() - 1.0) < 0.05


def test_dare_defaults_are_fusionbench_and_rescale_can_be_off():
    import inspect

    params = inspect.signature(dare).parameters
    assert params["drop_rate"].default == 0.5 and params["scaling_factor"].default == 0.3
    assert params["rescale"].default is True
    base = {"w": torch.zeros(1000)}
    experts = [{"w": torch.ones(1000)}]
    a = dare(base, experts, scaling_factor=1.0, seed=1)
    b = dare(base, experts, scaling_factor=1.0, seed=1, rescale=False)
    assert torch.equal(a["w"] != 0, b["w"] != 0)  # same masks for a seed
    assert torch.allclose(a["w"][a["w"] != 0], torch.tensor(2.0))
    assert torch.allclose(b["w"][b["w"] != 0], torch.tensor(1.0))
    # two experts draw different masks
    c = dare(base, [experts[0], experts[0]], scaling_factor=1.0, seed=1)
    assert set(c["w"].unique().tolist()) == {0.0, 2.0, 4.0}


def test_merge_yamls_select_by_target_only_with_reference_defaults():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from pathlib import Path

    conf = str(Path(__file__).resolve().parents[2] / "conf" / "merge")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        nodes = {n: compose(config_name=n) for n in ("ties", "dare", "task_arithmetic", "weight_average")}
    for name, node in nodes.items():
        assert "name" not in node, name
    assert (nodes["ties"].merge_func, nodes["ties"].density, nodes["ties"].scaling_factor) == ("sum", 0.2, 0.3)
    assert (nodes["dare"].drop_rate, nodes["dare"].scaling_factor, nodes["dare"].rescale) == (0.5, 0.3, True)
    fn = instantiate({k: v for k, v in nodes["ties"].items()})
    out = fn(sd([0.0, 0.0]), [sd([1.0, 0.0]), sd([1.0, 0.0])], exclude=None)
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.0]))  # disjoint sum 2 x 1, λ = 0.3


def test_mismatched_keys():
    with pytest.raises(ValueError, match="does not match"):
        task_arithmetic({"w": torch.zeros(1)}, [{"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="at least one expert"):
        ties({"w": torch.zeros(1)}, [])


def test_merge_methods_validate_their_own_keys():
    from featcal.merge.registry import DARE, TASK_ARITHMETIC, TIES, WEIGHT_AVERAGE

    assert TIES.validate_config({"scaling_factor": 0.3, "density": 0.2, "merge_func": "sum"}) == []
    problems = TIES.validate_config({"scaling_factor": 1.5, "density": 0.0, "merge_func": "median"})
    assert len(problems) == 3 and any(p.startswith("merge_func='median'") for p in problems)
    assert DARE.validate_config({"drop_rate": 1.0, "rescale": "yes", "seed": 0}) == [
        "drop_rate=1.0: must be a number in [0, 1)", "rescale='yes': must be true or false"]
    assert TASK_ARITHMETIC.validate_config({"scaling_factor": 0.0}) == ["scaling_factor=0.0: must be a number in (0, 1]"]
    assert WEIGHT_AVERAGE.validate_config({}) == []
