"""Trust in the engine's numbers: non-finite values never score, sanity checks catch masked gradients.

Three broken models (NaN weights, one NaN gallery image, NaN only for perturbed inputs) must give
invalid results and no score; a model with masked gradients must fail the large-budget sanity
checks, while the vanilla tiny ranker passes them.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import Tensor, nn

from robust_ranking.attacks import CandidateAttack
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.evaluation.report import Report
from robust_ranking.evaluation.engine import InvalidInputError, RobustnessEvaluator
from robust_ranking.evaluation.score import RobustnessScore
from robust_ranking.evaluation.suite import SanitySettings, Suite, SuiteError

RANK_ATTACKS = [
    {"attack": "CA+", "epsilons": [0.1], "w": [1], "steps": 3},
    {"attack": "CA-", "epsilons": [0.1], "w": [1], "steps": 3},
    {"attack": "QA+", "epsilons": [0.1], "m": [1], "steps": 3},
    {"attack": "QA-", "epsilons": [0.1], "m": [1], "steps": 3},
]


def suite(sanity: object = False, num_samples: int = 12, attacks: list | None = None) -> Suite:
    return Suite.from_dict({"name": "trust", "num_samples": num_samples, "seed": 0, "batch_size": 6,
                            "sanity": sanity, "attacks": attacks or RANK_ATTACKS})


def run(model: nn.Module, dataset, s: Suite):
    return RobustnessEvaluator(s, progress=False).run(model, dataset)


class Wrapped(nn.Module):
    """A ranker whose ``embed`` passes its input through ``transform`` first (same distance)."""

    def __init__(self, inner: nn.Module, transform) -> None:
        super().__init__()
        self.inner, self.transform = inner, transform

    def embed(self, x: Tensor) -> Tensor:
        return self.transform(self.inner, x)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return self.inner.distance(a, b)


def nan_when_perturbed(inner: nn.Module, x: Tensor) -> Tensor:
    """NaN rows for inputs that are not on the 1/255 grid of the clean (uint8) images."""
    emb = inner.embed(x)
    off_grid = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(dim=1) > 1e-3)
    return torch.where(off_grid[:, None], torch.full_like(emb, math.nan), emb)


class StraightQuantization(torch.autograd.Function):
    """round() in the forward and a zero gradient: the textbook gradient masking."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return (x * 4).round() / 4

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)


def masked(inner: nn.Module, x: Tensor) -> Tensor:
    return inner.embed(StraightQuantization.apply(x))


# --------------------------------------------------------------------------- non-finite values
def test_nan_weights_make_every_configuration_invalid_and_the_score_none(tiny_ranker):
    model = copy.deepcopy(tiny_ranker.model)
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    res = run(model, tiny_ranker.datamodule.eval_set, suite(sanity=True))
    assert res.invalid == "100 of 100 gallery embeddings are NaN / inf"
    assert res.score.value is None and "invalid" in res.score.invalid
    assert all(r.invalid == res.invalid and math.isnan(r.mean) for r in res.results)
    assert res.clean is None and res.warnings  # the sanity checks are invalid too
    data = Report.from_results(res).data
    assert data["robustness_score"] is None and data["score_invalid"]
    assert all(row["mean"] is None and row["invalid"] for row in data["results"])
    markdown = Report(data).to_markdown()
    assert markdown.splitlines()[2].startswith("> **INVALID: no robustness score.**")
    assert "| 0.1 | invalid | invalid | invalid | invalid |" in markdown


def test_one_nan_image_is_refused_with_its_index(tiny_ranker):
    dataset = copy.deepcopy(tiny_ranker.datamodule.eval_set)
    dataset.images = dataset.images.float() / 255  # float images may hold a NaN
    dataset.images[17, 0, 3, 3] = math.nan
    with pytest.raises(InvalidInputError, match=r"1 of 100 images are not valid attack inputs .* indices 17$"):
        run(tiny_ranker.model, dataset, suite())


def test_attacks_refuse_nan_and_inf_images(tiny_ranker):
    model = tiny_ranker.model
    images = tiny_ranker.datamodule.eval_set.images[:2].float() / 255
    gallery = Gallery(model.embed(tiny_ranker.datamodule.eval_set.images.float() / 255).detach(),
                      tiny_ranker.datamodule.eval_set.labels)
    for bad in (math.nan, math.inf):
        x = images.clone()
        x[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="finite"):
            CandidateAttack("+", 1, eps=0.1)(model, gallery, x, torch.tensor([0, 1]))


def test_nan_only_for_perturbed_inputs_invalidates_the_attacks_not_the_clean_metrics(tiny_ranker):
    model = Wrapped(tiny_ranker.model, nan_when_perturbed)
    res = run(model, tiny_ranker.datamodule.eval_set, suite())
    assert res.invalid is None and res.clean is not None and res.clean["recall@1"] > 0.5
    for r in res.results:
        assert r.invalid is not None and r.invalid.startswith("12 of 12 clean / adversarial embeddings are NaN"), r
    assert res.score.value is None and res.score.invalid.startswith("4 scored configuration(s) invalid: CA+")


def test_score_refuses_nan_instead_of_dropping_it():
    from types import SimpleNamespace as R

    score = RobustnessScore.from_results([R(attack="CA+", eps=0.1, mean=10.0, clean=50.0, direction="+", invalid=None),
                                          R(attack="QA+", eps=0.1, mean=math.nan, clean=50.0, direction="+",
                                            invalid=None)])
    assert score.value is None and "QA+" in score.invalid


# --------------------------------------------------------------------------- sanity checks
def test_vanilla_model_passes_the_sanity_checks(tiny_ranker):
    res = run(tiny_ranker.model, tiny_ranker.datamodule.eval_set, suite(sanity={"num_samples": 12}))
    assert [c.result.attack for c in res.sanity] == ["CA+", "CA-", "QA+", "QA-"]
    assert all(c.passed for c in res.sanity), [(c.result.label, c.result.mean) for c in res.sanity]
    assert all(c.result.eps == 1.0 and c.result.count == 12 and c.result.hparams["steps"] == 100 for c in res.sanity)
    assert res.sanity[2].result.hparams["G"] == 0  # no SP term holding the unbounded QA back
    assert res.warnings == []
    # Sanity results are reported apart and never scored: the score is the one without them.
    plain = run(tiny_ranker.model, tiny_ranker.datamodule.eval_set, suite())
    assert res.score == plain.score and [r.mean for r in res.results] == [r.mean for r in plain.results]
    data = json.loads(Report.from_results(res).to_json())
    assert [row["passed"] for row in data["sanity"]] == [True] * 4 and data["warnings"] == []


def test_masked_gradients_fail_the_sanity_checks(tiny_ranker):
    model = Wrapped(tiny_ranker.model, masked)
    res = run(model, tiny_ranker.datamodule.eval_set, suite(sanity={"num_samples": 12, "steps": 10}))
    assert not any(c.passed for c in res.sanity)
    assert all(c.result.diagnostics["zero_or_nonfinite_grad_fraction"] == 1.0 for c in res.sanity)
    assert all(r.diagnostics["zero_grad"] == 12 for r in res.results)
    assert any(w.startswith("sanity check failed: CA+ eps=1 w=1") for w in res.warnings)
    assert any("zero or NaN / inf at the first step for 100%" in w for w in res.warnings)
    markdown = Report.from_results(res).to_markdown()
    top = markdown.split("\n\n")[1]  # the block right under the title
    assert top.startswith("> **Warning:** sanity check failed")
    assert "| CA+ w=1 | 1 | 10 | 12 |" in markdown and "| **no** |" in markdown


def test_sanity_settings_parse_and_refuse_bad_values():
    assert suite(sanity=False).sanity.enabled is False
    assert suite(sanity=True).sanity == SanitySettings()
    assert Suite.from_dict({"attacks": RANK_ATTACKS}).sanity.enabled  # on by default
    assert suite(sanity={"eps": 0.5, "steps": 7}).sanity.steps == 7
    for bad, message in [({"steps": 0}, "steps must be an integer >= 1"), ({"eps": 2}, "eps must be in"),
                         ({"step": 3}, "did you mean 'steps'"), ("yes", "sanity must be true, false or a mapping")]:
        with pytest.raises(SuiteError, match=message):
            suite(sanity=bad)
    assert suite(sanity=True).with_overrides(sanity=False).sanity.enabled is False
