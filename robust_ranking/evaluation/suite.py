"""Attack suites: a YAML list of attack specs, parsed and validated before any work starts.

Format (``configs/suites/*.yaml``)::

    name: eccv2020_28x28
    description: ECCV 2020 Tables 1-3 protocol for 28x28 data
    num_samples: 1000        # T attacked samples (the same T for every attack); -1 = whole gallery
    seed: 0                  # picks the T samples and seeds every target draw / random start
    batch_size: 250          # attack instances per forward / backward
    attacks:
      - {attack: CA+, epsilons: [0.01, 0.03, 0.1, 0.3], w: [1, 2, 5, 10]}
      - {attack: QA-, epsilons: [0.01, 0.03, 0.1, 0.3], m: [1, 2, 5, 10], xi: 100}
      - {attack: ES, epsilons: [0.01, 0.03, 0.1, 0.3]}

Per-attack keys: ``attack`` (a name of :data:`evaluation.registry.ATTACKS`), ``epsilons``
(L-inf budgets in [0, 1] pixel units), the target count ``w`` (CA) / ``m`` (QA) (a list or one
integer, default 1), and optionally ``alpha`` / ``steps`` (default: the ECCV 2020 step rules of
Sec. 4), ``random_start``, and for QA ``xi`` / ``G`` / ``percent``, for CA ``percent``.

Universal suites (``kind: universal``) list universal attacks instead (:data:`evaluation.registry.
UNIVERSAL_ATTACKS`: ``I-CA+`` / ``I-CA-`` / ``I-QA+`` / ``I-QA-`` / ``UAP-IR:label`` / ``UAP-IR:pair`` /
``UAP-IR:list``) with their schedule keys (``epochs``, ``step``, ``momentum``) and options; there
``num_samples`` is the size of the fit set and of the disjoint unseen set (-1: 5% of X each, the
ECCV Table 6 protocol) and ``batch_size`` the fit batch. They run through ``eval.py`` only (one
perturbation is fitted per configuration, not the per-batch protocol of the robustness engine),
so :meth:`Suite.from_yaml` refuses them unless the caller accepts ``kinds=("ranking", "universal")``.

Every mistake is a :class:`SuiteError` with one line naming the file, the entry and, for an
unknown key, the allowed keys plus a "did you mean" suggestion. Option values are checked by
building every configuration's attack once (the attacks validate their own arguments), so a
suite that parses will run. Checks that need the gallery (``w`` / ``m`` larger than it) are in
:meth:`Suite.check_gallery`, which the engine calls before the first attack.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from robust_ranking.evaluation.registry import (
    ATTACKS,
    UNIVERSAL_ATTACKS,
    AttackEntry,
    AttackRegistry,
    did_you_mean,
    resolve_tanh_scale,
)

__all__ = ["AttackConfig", "AttackSpec", "SUITE_KINDS", "SanitySettings", "Suite", "SuiteError"]

TOP_LEVEL_KEYS = ("name", "description", "kind", "num_samples", "seed", "batch_size", "sanity", "traces",
                  "attacks")
_DEFAULTS = {"description": "", "num_samples": 1000, "seed": 0, "batch_size": 250}
#: ``kind`` values: per-sample ranking attacks (the engine) or universal perturbations (eval.py).
SUITE_KINDS: tuple[str, ...] = ("ranking", "universal")
_REGISTRIES = {"ranking": ATTACKS, "universal": UNIVERSAL_ATTACKS}


class SuiteError(ValueError):
    """A suite that does not parse or does not fit the gallery (one-line message)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SanitySettings:
    """The large-budget sanity checks of a ranking suite (the ``sanity:`` key).

    For every scored rank attack of the suite (CA+, CA-, QA+, QA-) the engine runs one extra
    configuration at budget ``eps`` (default 1.0: the whole pixel range, i.e. no real bound)
    on the first ``num_samples`` attacked samples, with ``steps`` PGD steps of size ``alpha``.
    An attack that works must then nearly always succeed: "+" attacks must bring the mean
    normalized rank to at most ``max_rank_plus`` percent, "-" attacks to at least
    ``min_rank_minus`` percent. A failure is a warning at the top of the report: a broken
    attack or gradient masking (Carlini et al., "On Evaluating Adversarial Robustness", 2019).
    The results are kept apart from the tables and never enter the robustness score.

    YAML: ``sanity: false`` switches the checks off; ``sanity: {eps: 1.0, steps: 50, ...}``
    overrides single fields. The defaults (100 steps of 0.01, 50 samples) come from
    ``bench/sanity_budget.py``: on a vanilla model 30 steps, or larger steps, left CA+ short of 5%.
    """

    enabled: bool = True
    eps: float = 1.0
    steps: int = 100
    alpha: float = 0.01
    num_samples: int = 50
    max_rank_plus: float = 5.0
    min_rank_minus: float = 90.0

    @classmethod
    def parse(cls, value: Any, where: str) -> SanitySettings:
        """From the suite's ``sanity`` value (bool, mapping or absent); one-line :class:`SuiteError`."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if not isinstance(value, Mapping):
            raise SuiteError(f"{where}: sanity must be true, false or a mapping of "
                             f"{', '.join(cls.__dataclass_fields__)}, got {value!r}")
        fields = list(cls.__dataclass_fields__)
        for key in value:
            if key not in fields:
                raise SuiteError(f"{where}: sanity: unknown key {key!r}{did_you_mean(str(key), fields)}; "
                                 f"allowed keys: {', '.join(fields)}")
        out = cls(**value)
        checks = [
            (isinstance(out.enabled, bool), "enabled must be true or false"),
            (_is_number(out.eps) and 0 < out.eps <= 1, "eps must be in (0, 1]"),
            (_is_int(out.steps) and out.steps >= 1, "steps must be an integer >= 1"),
            (_is_number(out.alpha) and out.alpha > 0, "alpha must be a number > 0"),
            (_is_int(out.num_samples) and out.num_samples >= 1, "num_samples must be an integer >= 1"),
            (_is_number(out.max_rank_plus) and 0 <= out.max_rank_plus <= 100, "max_rank_plus must be in [0, 100]"),
            (_is_number(out.min_rank_minus) and 0 <= out.min_rank_minus <= 100, "min_rank_minus must be in [0, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise SuiteError(f"{where}: sanity: {message}, got {value!r}")
        return replace(out, eps=float(out.eps), alpha=float(out.alpha), max_rank_plus=float(out.max_rank_plus),
                       min_rank_minus=float(out.min_rank_minus))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class AttackConfig:
    """One cell of the result tables: an attack at one epsilon and one w / m."""

    spec_index: int
    attack: str
    eps: float
    size_key: str | None
    size: int | None
    options: Mapping[str, Any]

    @property
    def label(self) -> str:
        """``"CA+ eps=0.1 w=2"`` (for progress bars and errors)."""
        size = f" {self.size_key}={self.size}" if self.size_key else ""
        return f"{self.attack} eps={self.eps:g}{size}"


@dataclass(frozen=True)
class AttackSpec:
    """One ``attacks:`` entry: an attack name, its epsilons, its w / m values and options."""

    attack: str
    epsilons: tuple[float, ...]
    size_key: str | None = None
    sizes: tuple[int, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def configurations(self, index: int) -> Iterator[AttackConfig]:
        """Every ``(eps, size)`` pair, eps-major (the row order of the paper's tables)."""
        for eps in self.epsilons:
            for size in self.sizes or (None,):
                yield AttackConfig(index, self.attack, eps, self.size_key, size, dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attack": self.attack, "epsilons": list(self.epsilons)}
        if self.size_key is not None:
            out[self.size_key] = list(self.sizes)
        out.update(self.options)
        return out


@dataclass(frozen=True)
class Suite:
    """A validated attack suite (see the module docstring for the format).

    Attributes:
        name, description: for reports.
        num_samples: T, the number of attacked gallery samples (the same T for every attack);
            -1 means the whole gallery (the paper's ``T = |X|``). A T larger than the gallery
            is clamped to it by the engine (the report records the T used).
        seed: selects the T samples and seeds every target draw and random start.
        batch_size: attack instances per forward / backward pass.
        attacks: the attack specs, in file order (the column order of the tables).
        source: the file the suite came from (``None`` for in-memory suites).
        kind: ``"ranking"`` (per-sample attacks, the default) or ``"universal"``.
        sanity: the large-budget sanity checks (:class:`SanitySettings`; ranking suites).
        traces: gather each attacked sample's per-check trajectory (iteration grid, AP and l2 at
            every check, and its per-sample metric values) into the result rows (``trace``), for
            the attacks that record one (the hashing attacks: SDHA Tables 2-4's "l2 at a preset
            mAP" and "mAP at an l2 budget", printed by ``scripts/sdha_tables.py``). Ranking
            suites; the numbers of the results do not change.
    """

    name: str
    attacks: tuple[AttackSpec, ...]
    description: str = ""
    num_samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    source: str | None = None
    kind: str = "ranking"
    sanity: SanitySettings = field(default_factory=SanitySettings)
    traces: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path: str | Path, registry: AttackRegistry | None = None,
                  kinds: Collection[str] = ("ranking",)) -> Suite:
        """Read and validate a suite file; every problem is a one-line :class:`SuiteError`.

        ``registry=None`` picks the registry of the suite's ``kind``; ``kinds`` are the kinds
        the caller can run (the robustness engine and callback: ranking suites only).
        """
        path = Path(path)
        if not path.is_file():
            raise SuiteError(f"suite file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            first = " ".join(str(err).split())
            raise SuiteError(f"{path}: not valid YAML: {first}") from None
        return cls.from_dict(data, source=str(path), registry=registry, kinds=kinds)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None, registry: AttackRegistry | None = None,
                  kinds: Collection[str] = ("ranking",)) -> Suite:
        """Validate a parsed suite (a mapping as in the YAML format); see :meth:`from_yaml`."""
        where = source or "<suite>"

        def fail(message: str) -> SuiteError:
            return SuiteError(f"{where}: {message}")

        if not isinstance(data, Mapping):
            raise fail(f"a suite must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise fail(f"unknown key {key!r}{did_you_mean(str(key), list(TOP_LEVEL_KEYS))}; "
                           f"allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
        kind = data.get("kind", "ranking")
        if kind not in SUITE_KINDS:
            raise fail(f"kind must be one of {', '.join(SUITE_KINDS)}, got {kind!r}")
        if kind not in kinds:
            raise fail(f"a {kind} suite cannot run here (this runner takes {' / '.join(kinds)} suites); "
                       "run it with eval.py --ckpt CKPT --suite FILE")
        registry = _REGISTRIES[kind] if registry is None else registry
        # Universal suites: num_samples is the fit-set size; the default -1 is Table 6's 5% of X.
        values = {**_DEFAULTS, **({"num_samples": -1} if kind == "universal" else {}), **data}
        name = values.get("name", Path(source).stem if source else "suite")
        if not isinstance(name, str) or not name:
            raise fail(f"name must be a non-empty string, got {name!r}")
        if not isinstance(values["description"], str):
            raise fail(f"description must be a string, got {values['description']!r}")
        num_samples = values["num_samples"]
        if not _is_int(num_samples) or (num_samples < 1 and num_samples != -1):
            raise fail(f"num_samples must be an integer >= 1 or -1 (whole gallery), got {num_samples!r}")
        seed = values["seed"]
        if not _is_int(seed) or seed < 0:
            raise fail(f"seed must be an integer >= 0, got {seed!r}")
        batch_size = values["batch_size"]
        if not _is_int(batch_size) or batch_size < 1:
            raise fail(f"batch_size must be an integer >= 1, got {batch_size!r}")
        raw_attacks = data.get("attacks")
        if not isinstance(raw_attacks, list) or not raw_attacks:
            raise fail("attacks must be a non-empty list of attack entries")
        specs = tuple(_parse_spec(raw, i, where, registry) for i, raw in enumerate(raw_attacks))
        if kind != "ranking" and "sanity" in data:
            raise fail("sanity checks apply to ranking suites only; remove the 'sanity' key")
        sanity = SanitySettings.parse(data.get("sanity"), where)
        traces = data.get("traces", False)
        if not isinstance(traces, bool):
            raise fail(f"traces must be true or false, got {traces!r}")
        if traces and kind != "ranking":
            raise fail("traces apply to ranking suites only; remove the 'traces' key")
        suite = cls(name=name, attacks=specs, description=values["description"], num_samples=num_samples,
                    seed=seed, batch_size=batch_size, source=source, kind=kind, sanity=sanity, traces=traces)
        suite._check_options(registry)
        return suite

    def with_overrides(self, num_samples: int | None = None, batch_size: int | None = None,
                       sanity: bool | None = None) -> Suite:
        """A copy with ``num_samples`` / ``batch_size`` replaced and the sanity checks switched on / off
        (``None`` keeps the suite's value)."""
        where = self.source or "<suite>"
        if num_samples is not None and (not _is_int(num_samples) or (num_samples < 1 and num_samples != -1)):
            raise SuiteError(
                f"{where}: num_samples must be an integer >= 1 or -1 (whole gallery), got {num_samples!r}")
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise SuiteError(f"{where}: batch_size must be an integer >= 1, got {batch_size!r}")
        return replace(
            self,
            num_samples=self.num_samples if num_samples is None else num_samples,
            batch_size=self.batch_size if batch_size is None else batch_size,
            sanity=self.sanity if sanity is None else replace(self.sanity, enabled=bool(sanity)),
        )

    # ------------------------------------------------------------------ use
    def configurations(self) -> Iterator[AttackConfig]:
        """Every configuration of every spec, in suite order."""
        for index, spec in enumerate(self.attacks):
            yield from spec.configurations(index)

    def num_attacked(self, gallery_size: int) -> int:
        """The T actually used for a gallery of ``gallery_size`` items."""
        return gallery_size if self.num_samples == -1 else min(self.num_samples, gallery_size)

    def fit_size(self, gallery_size: int) -> int:
        """Universal suites: the size of the fit set and of the unseen set (-1: 5% of X, Table 6)."""
        return max(1, round(0.05 * gallery_size)) if self.num_samples == -1 else self.num_samples

    def check_gallery(self, gallery_size: int, registry: AttackRegistry | None = None) -> None:
        """Raise :class:`SuiteError` if some w / m cannot be drawn from a gallery of this size.

        CA needs ``w`` queries other than the candidate (``w <= |X| - 1``); QA needs ``m``
        targets plus the ``G`` semantics-preserving candidates other than the query
        (``m + G <= |X| - 1``).
        """
        where = self.source or "<suite>"
        registry = _REGISTRIES[self.kind] if registry is None else registry
        if gallery_size < 2:
            raise SuiteError(f"{where}: the gallery has {gallery_size} item(s); attacks need at least 2")
        if self.kind == "universal" and 2 * self.fit_size(gallery_size) > gallery_size:
            raise SuiteError(f"{where}: num_samples={self.fit_size(gallery_size)} needs a fit set and a disjoint "
                             f"unseen set of that size, but the gallery has {gallery_size} items")
        default_g = 0 if self.kind == "universal" else 5  # I-QA defaults to G = 0 (Table 6), QA to 5
        for index, spec in enumerate(self.attacks):
            if spec.size_key is None or not spec.sizes:
                continue
            largest = max(spec.sizes)
            # QA also draws G semantics-preserving candidates (default 5) besides q and its m targets.
            takes_g = spec.attack in registry and "G" in registry.get(spec.attack).options
            extra = int(spec.options.get("G", default_g)) if takes_g else 0
            if largest + extra > gallery_size - 1:
                plus = f" plus G={extra} semantics-preserving candidates" if extra else ""
                raise SuiteError(
                    f"{where}: attacks[{index}] ({spec.attack}): {spec.size_key}={largest}{plus} needs a "
                    f"gallery of more than {largest + extra} items, but the gallery has {gallery_size}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The suite as YAML-able data (what reports store as "the exact suite")."""
        kind = {"kind": self.kind} if self.kind != "ranking" else {}  # ranking reports stay as they were
        return {
            "name": self.name,
            "description": self.description,
            **kind,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            **({"sanity": self.sanity.to_dict()} if self.kind == "ranking" else {}),
            **({"traces": True} if self.traces else {}),  # reports of suites without traces stay as they were
            "attacks": [spec.to_dict() for spec in self.attacks],
        }

    def _check_options(self, registry: AttackRegistry) -> None:
        """Build each configuration's attack once, so bad option values fail now, not mid-run."""
        where = self.source or "<suite>"
        for config in self.configurations():
            entry = registry.get(config.attack)
            try:
                # tanh_scale_factor: auto is resolved by the engine per model; any number validates it here.
                entry.build(config.eps, config.size, self.seed, **resolve_tanh_scale(config.options, 1.0))
            except (TypeError, ValueError) as err:
                message = " ".join(str(err).split())
                where_attack = f"{where}: attacks[{config.spec_index}] ({config.attack})"
                raise SuiteError(f"{where_attack}: {message}") from None


def _parse_spec(raw: Any, index: int, where: str, registry: AttackRegistry) -> AttackSpec:
    prefix = f"{where}: attacks[{index}]"
    if not isinstance(raw, Mapping):
        raise SuiteError(f"{prefix}: an attack entry must be a mapping like {{attack: CA+, epsilons: [0.1]}}")
    name = raw.get("attack")
    if name is None:
        raise SuiteError(f"{prefix}: missing key 'attack'; known attacks: {', '.join(registry.names())}")
    if name not in registry:
        raise SuiteError(f"{prefix}: {registry.unknown_message(name)}")
    entry: AttackEntry = registry.get(name)
    prefix = f"{prefix} ({name})"
    allowed = sorted(entry.allowed_keys)
    for key in raw:
        if key not in entry.allowed_keys:
            raise SuiteError(f"{prefix}: unknown key {key!r}{did_you_mean(str(key), allowed)}; "
                             f"allowed keys: {', '.join(allowed)}")

    epsilons = raw.get("epsilons")
    if epsilons is None:
        raise SuiteError(f"{prefix}: missing key 'epsilons' (a list of L-inf budgets in [0, 1])")
    epsilons = epsilons if isinstance(epsilons, list) else [epsilons]
    if not epsilons:
        raise SuiteError(f"{prefix}: epsilons must not be empty")
    for eps in epsilons:
        if not _is_number(eps) or not 0.0 <= eps <= 1.0:
            raise SuiteError(f"{prefix}: epsilon {eps!r} is outside [0, 1] (budgets are in pixel units)")
    if len(set(epsilons)) != len(epsilons):
        raise SuiteError(f"{prefix}: epsilons {epsilons} contain duplicates")

    sizes: list[int] = []
    if entry.size_key is not None:
        value = raw.get(entry.size_key, [1])
        sizes = value if isinstance(value, list) else [value]
        if not sizes:
            raise SuiteError(f"{prefix}: {entry.size_key} must not be empty")
        for size in sizes:
            if not _is_int(size) or size < 1:
                raise SuiteError(f"{prefix}: {entry.size_key} must be integers >= 1, got {size!r}")
        if len(set(sizes)) != len(sizes):
            raise SuiteError(f"{prefix}: {entry.size_key} values {sizes} contain duplicates")

    options = {key: raw[key] for key in raw if key not in ("attack", "epsilons", entry.size_key)}
    return AttackSpec(attack=name, epsilons=tuple(float(e) for e in epsilons), size_key=entry.size_key,
                      sizes=tuple(sizes), options=options)
