"""Every merge method in one place: a ``MergeMethod`` record per method, in ``METHODS``.

A record declares the method's name, its parameters (default, check, allowed values),
whether it reads the calibration set (``needs_calibration_data``: the run hands it the
models and the batches) and the task pool's class heads (``needs_heads``), its
in-memory function (``featcal.merge.<method>``) and its streaming form
(``featcal.merge.streaming_methods``; None: in memory only).

A ``merge`` config names a record by ``_target_`` (``conf/merge/ties.yaml``:
``_target_: featcal.merge.registry.TIES``); Hydra calls the record with the node's
parameters and gets a ``Merge``: the record bound to them, called like a merge function,
``merge(base_sd, expert_sds, exclude=..., **data)``. The run, the streaming merge and the
LLM adapter ask the ``Merge`` (``needs_calibration_data``, ``needs_heads``,
``streaming()``, ``identity()``). ``as_merge`` accepts what Python callers pass besides
(a registered function or a ``functools.partial`` of one, a user's own merge function).

``python -m featcal.merge.registry`` lists the methods and their parameters.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from featcal.config import non_negative_number, number_in
from featcal.merge.adamerging import adamerging
from featcal.merge.base import BOOL, DENSITY, DROP_RATE, SCALING, SEED
from featcal.merge.dare import dare
from featcal.merge.regmean import _SOLVE_DTYPES, GRAM_REDUCTIONS, regmean
from featcal.merge.task_arithmetic import task_arithmetic
from featcal.merge.ties import MERGE_FUNCS, ties
from featcal.merge.weight_average import weight_average
from featcal.merge.streaming_methods import StreamingMethod, global_ties, per_tensor


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its default (the function's), ``check(value)``
    and the ``allowed`` text a failing check reports (``"key=value: allowed"``)."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    allowed: str


@dataclass(frozen=True)
class MergeMethod:
    """A merge method (module docstring). Calling the record binds parameters: a ``Merge``."""

    name: str
    summary: str
    function: Callable[..., dict]
    params: tuple[Param, ...] = ()
    needs_calibration_data: bool = False
    needs_heads: bool = False
    streaming: Callable[[Mapping[str, Any]], StreamingMethod] | None = None
    registered: bool = True

    def __post_init__(self):
        # what ``featcal.strict`` reads for the keys a ``merge`` node may hold
        sig = inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
                                 for p in self.params])
        object.__setattr__(self, "__signature__", sig)

    def validate_config(self, node: Mapping[str, Any]) -> list[str]:
        """``["key=value: allowed"]`` for every parameter of ``node`` failing its check,
        in the declared order (the run's config validation, before any model loads)."""
        return [f"{p.name}={node[p.name]!r}: {p.allowed}" for p in self.params if p.name in node and not p.check(node[p.name])]

    def __call__(self, **params: Any) -> "Merge":
        """Bind ``params`` (a config node's keys; its descriptive ``name`` is left out)."""
        params.pop("name", None)
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"merge '{self.name}' takes no parameter(s) {unknown}; "
                            f"its parameters: {', '.join(sorted(known)) or 'none'}")
        return Merge(self, params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def __reduce__(self):  # a registered record pickles by name (its checks are lambdas)
        if self.registered:
            return _registered, (self.name,)
        return super().__reduce__()


@dataclass(frozen=True)
class Merge:
    """A merge method bound to its parameters (``params``: as given, like a partial's
    keywords; ``arguments()``: with the defaults filled in)."""

    method: MergeMethod
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __reduce__(self):
        return Merge, (self.method, dict(self.params))

    def __call__(self, base, experts, **kwargs: Any) -> dict:
        """The in-memory merge: ``function(base, experts, **params, **kwargs)`` (keywords of
        the call win, as with a partial): ``exclude=`` and, for methods that need them, the
        run's data (``backbone=, base_model=, expert_models=, calib=, device=``, ``heads=``)."""
        return self.method.function(base, experts, **{**self.params, **kwargs})

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def needs_calibration_data(self) -> bool:
        return self.method.needs_calibration_data

    @property
    def needs_heads(self) -> bool:
        return self.method.needs_heads

    def arguments(self) -> dict[str, Any]:
        return {**self.method.defaults(), **self.params}

    def streaming(self) -> StreamingMethod:
        """The streaming form bound to the parameters; ValueError for in-memory-only methods."""
        if self.method.streaming is None:
            if self.method.needs_calibration_data:
                raise ValueError(f"merge '{self.name}' needs calibration data and model activations: "
                                 "it has no streaming version")
            streamable = ", ".join(n for n, m in METHODS.items() if m.streaming is not None)
            raise ValueError(f"merge '{self.name}' has no streaming version (streaming: {streamable})")
        return self.method.streaming({k: v for k, v in self.params.items() if k != "exclude"})

    def identity(self) -> dict[str, Any]:
        """What a merge result depends on besides its inputs: the function's dotted path and
        the given parameters (``repr``): the key of a streamed merge's cached folder."""
        fn = self.method.function
        return {"merge": getattr(fn, "__module__", "") + "." + getattr(fn, "__name__", str(fn)),
                "kwargs": {k: repr(v) for k, v in sorted(self.params.items())}}


# ============================================================================ the methods


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _one_of(values) -> Callable[[Any], bool]:
    return lambda x: x in values


def _trim_counts_ok(v: Any) -> bool:
    v = v or {}
    return isinstance(v, dict) and all(_is_int(c) and c >= 1 for c in v.values())


def _trim_globs_ok(v: Any) -> bool:
    v = v or []
    return isinstance(v, (list, tuple)) and all(isinstance(g, str) and g for g in v)


_SCALING = Param("scaling_factor", 0.3, *SCALING)

WEIGHT_AVERAGE = MergeMethod(
    "weight_average", "mean of the experts' weights", weight_average,
    streaming=per_tensor(weight_average),
)
TASK_ARITHMETIC = MergeMethod(
    "task_arithmetic", "θ₀ + λ·Σ_t τ_t (Ilharco et al., 2023)", task_arithmetic,
    params=(_SCALING,), streaming=per_tensor(task_arithmetic),
)
TIES = MergeMethod(
    "ties", "global top-density trim per task, elected signs, disjoint merge, θ₀ + λ·that (Yadav et al., 2023)",
    ties,
    params=(
        _SCALING,
        Param("density", 0.2, *DENSITY),
        Param("merge_func", "sum", _one_of(MERGE_FUNCS), f"allowed: {', '.join(MERGE_FUNCS)}"),
        Param("trim_extra_zeros", 0, lambda x: _is_int(x) and x >= 0,
              "must be an integer >= 0 (zero task-vector entries added to the trim)"),
        Param("trim_count", None, _trim_counts_ok,
              "must map state-dict keys to integers >= 1 (times counted in the trim)"),
        Param("trim_also", None, _trim_globs_ok, "must be a list of key globs (excluded keys counted in the trim)"),
    ),
    streaming=global_ties,
)
DARE = MergeMethod(
    "dare", "drop task-vector entries with probability p, rescale by 1/(1-p), θ₀ + λ·Σ (Yu et al., 2024)",
    dare,
    params=(_SCALING, Param("drop_rate", 0.5, *DROP_RATE), Param("rescale", True, *BOOL), Param("seed", 0, *SEED)),
    streaming=per_tensor(dare),
)
REGMEAN = MergeMethod(
    "regmean", "per-Linear closed form from the experts' input Gram matrices (Jin et al., 2023)", regmean,
    params=(
        Param("reduce_non_diagonal_ratio", 0.95, number_in(0.0, 1.0), "must be a number in [0, 1]"),
        Param("solve_dtype", "float32", _one_of(_SOLVE_DTYPES), f"allowed: {', '.join(_SOLVE_DTYPES)}"),
        Param("gram", "mean", _one_of(GRAM_REDUCTIONS),
              "allowed: mean (X^T X / N_t per task, the references), sum"),
    ),
    needs_calibration_data=True,
)
ADAMERGING = MergeMethod(
    "adamerging", "layer-wise coefficients trained by entropy minimisation on unlabeled data (Yang et al., 2024)",
    adamerging,
    params=(
        Param("init", 0.3, non_negative_number, "must be a number >= 0"),
        Param("lr", 1e-3, non_negative_number, "must be a number >= 0"),
        Param("steps", 100, lambda x: _is_int(x) and x >= 0, "must be an integer >= 0"),
        Param("clamp", True, lambda x: isinstance(x, bool), "must be true or false"),
        Param("batches_per_task", 1, lambda x: _is_int(x) and x >= 1,
              "must be an integer >= 1 (batches per task in each step's loss)"),
        Param("seed", 0, lambda x: _is_int(x) and x >= 0, "must be a non-negative integer"),
    ),
    needs_calibration_data=True,
    needs_heads=True,
)

#: every merge method, by name
METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    WEIGHT_AVERAGE, TASK_ARITHMETIC, TIES, DARE, REGMEAN, ADAMERGING)}
_BY_FUNCTION = {m.function: m for m in METHODS.values()}


# ============================================================================ lookup


def _registered(name: str) -> MergeMethod:
    return METHODS[name]


def _unregistered(fn: Callable[..., Any], chain: list[Any]) -> MergeMethod:
    """A record for a merge function outside the registry (a user's own): its attributes
    ``needs_calibration_data`` / ``needs_heads`` (on it or a partial around it) say what it
    reads; no declared parameters, no streaming form."""
    def flag(attr: str) -> bool:
        return any(bool(getattr(f, attr, False)) for f in chain)

    return MergeMethod(getattr(fn, "__name__", repr(fn)), "a merge function outside the registry", fn,
                       needs_calibration_data=flag("needs_calibration_data"), needs_heads=flag("needs_heads"),
                       registered=False)


def as_merge(obj: Any) -> Merge:
    """The ``Merge`` for what a config builds or a caller passes: a ``Merge`` as is; a record
    (its defaults); a registered function or a ``functools.partial`` of one (its keywords
    bound); any other merge function (or partial) as an unregistered method."""
    if isinstance(obj, Merge):
        return obj
    if isinstance(obj, MergeMethod):
        return obj()
    if not callable(obj):
        from featcal.errors import ConfigError

        raise ConfigError(f"merge: {obj!r} is not a merge method (conf/merge/*.yaml name one of "
                          f"featcal.merge.registry's records: {', '.join(METHODS)})")
    fn, keywords, chain = obj, {}, [obj]
    while isinstance(fn, functools.partial) and not fn.args:
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
        chain.append(fn)
    if isinstance(fn, MergeMethod):
        return fn(**keywords)
    method = _BY_FUNCTION.get(fn)
    if method is not None:
        return Merge(method, keywords)
    if isinstance(fn, functools.partial):  # positional arguments bound: call it as given
        return Merge(_unregistered(obj, chain), {})
    return Merge(_unregistered(fn, chain), keywords)


def build_merge(node: Mapping[str, Any]) -> Merge:
    """The ``Merge`` of a resolved ``merge`` config node. A ``_target_`` naming a record is
    called with the node's parameters; one naming any other function (a user's merge,
    ``merge._target_=my.module.fn``) is bound to them as a partial."""
    from hydra.utils import get_object, instantiate

    data = {k: v for k, v in dict(node).items() if k != "name"}
    if not isinstance(get_object(str(data["_target_"])), MergeMethod):
        data["_partial_"] = True
    return as_merge(instantiate(data))


def describe() -> str:
    """One paragraph per registered method: name, what it needs, parameters and defaults."""
    out = []
    for m in METHODS.values():
        needs = [w for w, on in (("calibration data", m.needs_calibration_data), ("class heads", m.needs_heads)) if on]
        flags = ["streaming" if m.streaming is not None else "in memory only"] + [f"needs {w}" for w in needs]
        out.append(f"{m.name}: {m.summary} [{'; '.join(flags)}]")
        out.extend(f"    {p.name} = {p.default!r}: {p.allowed}" for p in m.params)
    return "\n".join(out)


if __name__ == "__main__":
    print(describe())
