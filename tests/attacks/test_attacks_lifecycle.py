"""Attack lifecycle (robust_ranking/attacks/attack.py): model state, gradients, inference mode, validation."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust_ranking.attacks import (
    Attack,
    AttackResult,
    CandidateAttack,
    Gallery,
    MaxShiftAttack,
    NotApplicableError,
    QueryAttack,
    max_shift_perturb,
)


class TinyRanker(nn.Module):
    """Untrained contract-following model with BatchNorm and Dropout (mode matters)."""

    def __init__(self, capabilities: set[str] | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 8))
        if capabilities is not None:
            self.capabilities = capabilities

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.body(x)), dim=-1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return 1.0 - a @ b.transpose(-1, -2)


def _setup(n: int = 30) -> tuple[TinyRanker, Tensor, Gallery]:
    torch.manual_seed(0)
    model = TinyRanker()
    x = torch.rand(n, 1, 6, 6)
    model.eval()
    with torch.no_grad():
        gallery = Gallery(model.embed(x), torch.arange(n) % 3)
    return model, x, gallery


ATTACKS = [
    CandidateAttack("+", 2, eps=0.05, steps=3),
    CandidateAttack("-", 1, eps=0.05, steps=3, random_start=True),
    QueryAttack("+", 2, eps=0.05, steps=3, G=2),
    QueryAttack("-", 1, eps=0.05, steps=3),
    MaxShiftAttack(0.05, steps=3),
]


def _state(model: nn.Module) -> tuple[list[bool], list[bool], dict[str, Tensor]]:
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_model_state_restored_and_no_parameter_grads(attack: Attack) -> None:
    model, x, gallery = _setup()
    model.train()
    model.head[0].eval()  # a deliberately mixed mode must survive
    model.head[1].weight.requires_grad_(False)  # as must per-parameter flags
    before = _state(model)
    result = attack(model, gallery, x[:5], torch.arange(5))
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1]
    for k, v in before[2].items():  # BatchNorm running stats untouched (eval mode while attacking)
        assert torch.equal(after[2][k], v), k
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(result, AttackResult) and not result.adversarial.requires_grad


def test_state_restored_when_the_attack_fails() -> None:
    model, x, gallery = _setup()
    model.train()

    class Broken(Attack):
        name = "broken"

        def perturb(self, model, gallery, images, sample_indices, query_labels=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Broken(0.1)(model, gallery, x[:2], torch.arange(2))
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_under_inference_mode(attack: Attack) -> None:
    model, x, _ = _setup()
    reference = attack(model, _setup()[2], x[:4], torch.arange(4))
    with torch.inference_mode():
        # Everything created here is an inference tensor, as inside trainer.test.
        x_inf = x.clone()
        gallery = Gallery(model.embed(x_inf), torch.arange(len(x_inf)))
        idx = torch.arange(4)
        assert x_inf.is_inference() and gallery.embeddings.is_inference()
        result = attack(model, gallery, x_inf[:4], idx)
    torch.testing.assert_close(result.adversarial, reference.adversarial)
    for k, v in reference.metrics.items():
        torch.testing.assert_close(result.metrics[k], v, equal_nan=True)
    assert all(p.grad is None for p in model.parameters())


def test_attack_under_no_grad() -> None:
    model, x, gallery = _setup()
    with torch.no_grad():
        result = CandidateAttack("+", 1, eps=0.05, steps=2)(model, gallery, x[:3], torch.arange(3))
    assert result.perturbation.abs().max() > 0


def test_max_shift_perturb_leaves_mode_and_flags_alone() -> None:
    model, x, _ = _setup()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    x_adv = max_shift_perturb(model, x[:6], 0.05, 0.01, 3)
    assert model.training and all(m.training for m in model.modules())  # not switched to eval
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x[:6]).abs().max() <= 0.05 + 1e-6
    model.eval()
    with torch.inference_mode():
        x_inf = x[:6].clone()
        out = max_shift_perturb(model, x_inf, 0.05, 0.01, 3, random_start=True)
    assert not model.training and (out - x[:6]).abs().max() <= 0.05 + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_capabilities_and_not_applicable() -> None:
    class NeedsCodebooks(Attack):
        name = "needs-codebooks"
        needs: ClassVar[frozenset[str]] = frozenset({"codebooks"})

        def perturb(self, model, gallery, images, sample_indices, query_labels=None):
            return AttackResult(images, torch.zeros_like(images))

    model, x, gallery = _setup()
    with pytest.raises(NotApplicableError, match="codebooks"):
        NeedsCodebooks(0.1)(model, gallery, x[:2], torch.arange(2))
    assert not issubclass(NotApplicableError, ValueError)
    pq_model = TinyRanker(capabilities={"codebooks"})
    NeedsCodebooks(0.1)(pq_model, gallery, x[:2], torch.arange(2))  # no error
    for attack in ATTACKS:  # the ECCV attacks need nothing
        assert attack.needs == frozenset()


def test_defaults_follow_the_paper() -> None:
    qa_plus, qa_minus = QueryAttack("+", eps=0.1), QueryAttack("-", eps=0.1)
    assert (qa_plus.xi, qa_minus.xi, qa_plus.G, qa_plus.m) == (1.0, 100.0, 5, 1)
    ca = CandidateAttack("-", eps=0.03)
    assert (ca.w, ca.alpha, ca.steps, ca.random_start, ca.percent) == (1, 1 / 255, 15, False, 1.0)
    assert ca.hparams["attack"] == "CA-" and qa_minus.name == "QA-" and MaxShiftAttack(0.1).name == "ES"
    assert "eps=0.03" in repr(ca)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CandidateAttack("+", eps=-0.1), "eps"),
        (lambda: CandidateAttack("+", eps=1.5), "eps"),
        (lambda: CandidateAttack("+", eps=math.nan), "eps"),
        (lambda: CandidateAttack("+", eps="0.1"), "eps"),
        (lambda: CandidateAttack("+", eps=0.1, steps=0), "steps"),
        (lambda: CandidateAttack("+", eps=0.1, steps=2.5), "steps"),
        (lambda: CandidateAttack("+", eps=0.1, alpha=0.0), "alpha"),
        (lambda: CandidateAttack("+", eps=0.1, alpha=-0.01), "alpha"),
        (lambda: CandidateAttack("+", 0, eps=0.1), "w must"),
        (lambda: CandidateAttack("*", eps=0.1), "direction"),
        (lambda: CandidateAttack("-", eps=0.1, percent=0), "percent"),
        (lambda: QueryAttack("+", 0, eps=0.1), "m must"),
        (lambda: QueryAttack("+", eps=0.1, G=-1), "G must"),
        (lambda: QueryAttack("-", eps=0.1, xi=-1.0), "xi"),
        (lambda: QueryAttack("-", eps=0.1, xi=math.inf), "xi"),
        (lambda: MaxShiftAttack(2.0), "eps"),
        (lambda: MaxShiftAttack(0.1, random_start=1), "random_start"),
        (lambda: MaxShiftAttack(0.1, seed=0.5), "seed"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_bad_call_inputs_raise_value_errors() -> None:
    model, x, gallery = _setup(n=10)
    attack = CandidateAttack("+", 2, eps=0.05, steps=1)
    with pytest.raises(ValueError, match="sample_indices must be gallery indices"):
        attack(model, gallery, x[:2], torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"sample_indices must be \[B=2\]"):
        attack(model, gallery, x[:2], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        attack(model, gallery, x[:2], torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, gallery, x[:2] * 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="Gallery"):
        attack(model, gallery.embeddings, x[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="w=12"):
        CandidateAttack("+", 12, eps=0.05)(model, gallery, x[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="m=5 targets"):
        QueryAttack("+", 5, eps=0.05, G=5)(model, gallery, x[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        Gallery(torch.zeros(4, 3), torch.zeros(5))
