"""Merge methods against hand-computed small tensors."""
import pytest
import torch

from featcal.merge import dare, merge, task_arithmetic, ties, weight_average


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
    # density 0.5 keeps the top-2 magnitudes of each task vector
    e1 = sd([4.0, -1.0, 3.0, 0.5])   # keeps 4, 3
    e2 = sd([-2.0, 5.0, -1.0, 0.1])  # keeps -2 (mag 2) and 5 -> top2 of |[-2,5,-1,0.1]| = 5, 2
    e3 = sd([1.0, 0.0, -6.0, 2.0])   # keeps -6, 2
    # trimmed: [4,0,3,0], [-2,5,0,0], [0,0,-6,2]
    # elected sign by summed mass: [+2 -> +, +5 -> +, -3 -> -, +2 -> +]
    # disjoint mean of agreeing entries: [4, 5, -6, 2]
    out = ties(base, [e1, e2, e3], scaling_factor=1.0, density=0.5)
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0, -6.0, 2.0]))
    out = ties(base, [e1, e2, e3], scaling_factor=0.3, density=0.5)
    assert torch.allclose(out["w"], 0.3 * torch.tensor([4.0, 5.0, -6.0, 2.0]))


def test_ties_density_one_and_disagreement():
    base = sd([1.0, 1.0])
    e1, e2 = sd([3.0, 0.0]), sd([0.0, 0.5])
    # tvs [2,-1], [-1,-0.5]; signs: [+1, -1]; agreeing means: [2, (-1-0.5)/2]
    out = ties(base, [e1, e2], scaling_factor=1.0, density=1.0)
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0 - 0.75]))


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


def test_mismatched_keys_and_unknown_method():
    with pytest.raises(ValueError, match="does not match"):
        task_arithmetic({"w": torch.zeros(1)}, [{"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="allowed"):
        merge("nope", {}, [{}])
