"""RobRank's ERS (evaluation.score.ERS) on fixed inputs, against the formula written out here
independently (RobRank tools/pjswipe.py, ``ersnormalize``), and how reports / TensorBoard show it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from robust_ranking.evaluation.report import Report
from robust_ranking.evaluation.score import ERS


@dataclass
class Row:
    attack: str
    eps: float
    mean: float
    metric: str
    clean: float | None = None
    direction: str | None = None
    invalid: str | None = None
    size_key: str | None = None
    size: int | None = None
    std: float = 0.0
    count: int = 10
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.attack} eps={self.eps:g}"


#: attack -> (metric, mean): raw RobRank-style quantities (ranks / recalls in percent, cos, shift)
RAW = {"CA+": ("rank", 12.5), "CA-": ("rank", 40.0), "QA+": ("rank", 7.25), "QA-": ("rank", 61.0),
       "TMA": ("cos", 0.83), "ES": ("shift", 1.37), "ES:R": ("recall@1", 22.0), "LTM": ("recall@1", 31.5),
       "GTM": ("recall@1", 44.0), "GTT": ("retain@4", 3.0)}


def rows(raw=RAW, eps=0.30196):
    direction = {"CA+": "+", "QA+": "+", "CA-": "-", "QA-": "-"}
    out = []
    for attack, (metric, mean) in raw.items():
        size_key = {"CA": "w", "QA": "m"}.get(attack[:2])
        out.append(Row(attack, eps, mean, metric, clean=50.0 if direction.get(attack) == "+" else 1.0,
                       direction=direction.get(attack), size_key=size_key, size=1 if size_key else None))
    return out


def expected_ers(raw) -> float:
    """pjswipe.py's ersnormalize, written out: the mean of the ten rescaled scores."""
    terms = [
        raw["CA+"][1] * 2.0,
        100.0 - raw["CA-"][1],
        raw["QA+"][1] * 2.0,
        100.0 - raw["QA-"][1],
        100.0 * (1.0 - raw["TMA"][1]),
        100.0 * (2.0 - raw["ES"][1]) / 2,
        raw["ES:R"][1],
        raw["LTM"][1],
        raw["GTM"][1],
        raw["GTT"][1],
    ]
    return sum(terms) / 10


def test_ers_equals_robranks_formula():
    ers = ERS.from_results(rows())
    # (25 + 60 + 14.5 + 39 + 17 + 31.5 + 22 + 31.5 + 44 + 3) / 10 = 28.75
    assert ers.value == pytest.approx(expected_ers(RAW)) and ers.value == pytest.approx(28.75)
    assert list(ers.terms) == ["CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT"]
    assert ers.terms["ES:D"] == pytest.approx(31.5) and ers.terms["TMA"] == pytest.approx(17.0)
    assert ers.missing == () and ers.reason is None


def test_clean_eps_zero_rows_are_ignored():
    clean = [Row(r.attack, 0.0, -123.0, r.metric) for r in rows()]
    assert ERS.from_results(clean + rows()).value == pytest.approx(expected_ers(RAW))


def test_missing_terms_are_named():
    partial = [r for r in rows() if r.attack not in ("TMA", "GTT")]
    ers = ERS.from_results(partial)
    assert ers.value is None and ers.missing == ("TMA", "GTT")
    assert "missing ERS term(s): TMA, GTT" in ers.reason
    assert len(ers.terms) == 8  # the others are still reported
    assert ERS.from_results([]).missing == ("CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT")


def test_several_configurations_or_invalid_results_give_no_ers():
    extra = rows(eps=0.1)[:1]  # a second CA+ configuration
    ers = ERS.from_results(rows() + extra)
    assert ers.value is None and "CA+ has 2 configurations" in ers.reason
    broken = rows()
    broken[5] = Row("ES", 0.30196, math.nan, "shift")
    assert "ES:D" in ERS.from_results(broken).reason and ERS.from_results(broken).value is None
    broken[5] = Row("ES", 0.30196, 1.0, "shift", invalid="3 of 10 embeddings are NaN")
    assert "NaN" in ERS.from_results(broken).reason


class _Results:
    """The engine's RobustnessResults, as much as Report.from_results reads."""

    def __init__(self, results):
        from robust_ranking.evaluation import Suite
        from robust_ranking.evaluation.score import RobustnessScore

        self.suite = Suite.from_dict({"name": "t", "attacks": [{"attack": "ES", "epsilons": [0.1]}]})
        self.results, self.skipped, self.sanity, self.warnings = results, [], [], []
        self.world_size, self.gallery_size, self.num_samples, self.attacked_indices = 1, 100, 10, list(range(10))
        self.score, self.clean = RobustnessScore.from_results(results), None
        self.wall_s = self.embed_wall_s = 0.0


def test_report_and_tensorboard():
    from robust_ranking.evaluation.tensorboard import hparam_metrics, scalar_values

    full = _Results(rows())
    report = Report.from_results(full, include_environment=False)
    assert report.data["ers"]["value"] == pytest.approx(expected_ers(RAW))
    assert report.data["robustness_score"] == full.score.value  # beside the existing score, unchanged
    markdown = report.to_markdown()
    assert "**ERS 28.8**" in markdown and "ES:D 31.5" in markdown
    assert scalar_values(full)["robust/ers"] == pytest.approx(expected_ers(RAW))
    assert hparam_metrics(None, full.score, report.data["ers"]["value"])["hparams/ers"] == pytest.approx(
        expected_ers(RAW))
    assert "hparams/ers" not in hparam_metrics(None, full.score)

    partial = _Results([r for r in rows() if r.attack != "LTM"])
    data = Report.from_results(partial, include_environment=False).data
    assert data["ers"]["value"] is None and data["ers"]["missing"] == ["LTM"]
    assert "**ERS: none** (missing ERS term(s): LTM)" in Report(data).to_markdown()
    assert "robust/ers" not in scalar_values(partial)

    eccv_only = _Results([r for r in rows() if r.attack in ("CA+", "CA-", "QA+", "QA-", "ES")])
    assert "ERS" not in Report.from_results(eccv_only, include_environment=False).to_markdown()


def test_the_comparison_table_has_an_ers_column_when_a_report_has_ers():
    full = Report.from_results(_Results(rows()), include_environment=False)
    partial = Report.from_results(_Results([r for r in rows() if r.attack != "LTM"]), include_environment=False)
    header, _, first, second = Report.comparison_markdown([full, partial]).splitlines()[2:6]
    assert header.startswith("| checkpoint | robustness score | ERS | clean R@1 |")
    assert first.split("|")[3].strip() == f"{expected_ers(RAW):.1f}"
    assert second.split("|")[3].strip() == "–"  # no ERS: a missing term
    eccv_only = Report.from_results(_Results([r for r in rows() if r.attack in ("CA+", "CA-", "QA+", "QA-", "ES")]),
                                    include_environment=False)
    assert "ERS" not in Report.comparison_markdown([eccv_only, eccv_only]).splitlines()[2]
