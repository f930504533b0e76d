"""Transfer attacks (ECCV 2020 Table 5): crafted on a source model, measured on the target model."""

from __future__ import annotations

import pytest
import torch

from robust_ranking.attacks import CandidateAttack, Gallery, MaxShiftAttack, QueryAttack
from robust_ranking.attacks.transfer import measure_on, transfer_attack, transfer_markdown, transfer_matrix
from tests.conftest import train_tiny_ranker

EPS = 0.1


@pytest.fixture(scope="module")
def models(tiny_ranker):
    other = train_tiny_ranker(epochs=1, seed=1).model  # another init and schedule: a different ranker
    ds = tiny_ranker.datamodule.eval_set
    return {"src": tiny_ranker.model, "tgt": other}, ds.images.float() / 255.0, ds.labels


ATTACKED = torch.arange(0, 100, 4)  # 25 attacked samples


def direct_rank(model, attack, x, y, adv, idx, targets) -> torch.Tensor:
    """Reference: rank by a full sort on ``model``'s own embeddings, sample by sample."""
    with torch.no_grad():
        emb, emb_adv = model.embed(x), model.embed(adv)
    out = []
    for b, i in enumerate(idx.tolist()):
        ranks = []
        for t in targets[b].tolist():
            if isinstance(attack, CandidateAttack):  # query t, adversarial candidate b
                d_all = model.distance(emb[t : t + 1], emb)[0]
                d_tgt = model.distance(emb[t : t + 1], emb_adv[b : b + 1])[0, 0]
            else:  # adversarial query b, candidate t
                d_all = model.distance(emb_adv[b : b + 1], emb)[0]
                d_tgt = d_all[t]
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[[i, t]] = False
            ranks.append(100.0 * float((d_all[keep] < d_tgt).sum()) / len(y))
        out.append(sum(ranks) / len(ranks))
    return torch.tensor(out)


@pytest.mark.parametrize("attack", [CandidateAttack("+", 1, eps=EPS), QueryAttack("+", 1, eps=EPS),
                                    CandidateAttack("-", 2, eps=EPS), QueryAttack("-", 1, eps=EPS, G=0)],
                         ids=["CA+", "QA+", "CA-", "QA-"])
def test_transfer_measures_on_the_target_model(models, attack):
    ms, x, y = models
    res = transfer_attack(ms["src"], {"src": ms["src"], "tgt": ms["tgt"]}, attack, x, y, ATTACKED)
    # the diagonal is the white-box attack: the source's own metric
    with torch.no_grad():
        gallery = Gallery(ms["src"].embed(x), y)
    white = attack(ms["src"], gallery, x[ATTACKED], ATTACKED)
    assert torch.equal(res.adversarial, white.adversarial)
    assert torch.allclose(res.rank["src"], white.metrics["rank"])
    moved = (res.rank["src"] - res.rank_clean["src"]).abs().mean()
    assert moved > 10  # the attack moves ranks a lot on the source
    # the target numbers are a recomputation with the target's own embeddings ...
    for key, images in (("rank", res.adversarial), ("rank_clean", x[ATTACKED])):
        ref = direct_rank(ms["tgt"], attack, x, y, images, ATTACKED, res.targets)
        assert torch.allclose(getattr(res, key)["tgt"], ref, atol=1e-4)
    # ... and not the source's numbers (the two models disagree)
    assert not torch.allclose(res.rank["tgt"], res.rank["src"])
    assert (res.rank["tgt"] - res.rank_clean["tgt"]).abs().mean() < moved  # black-box is weaker


def test_transfer_matrix_markdown(models):
    ms, x, y = models
    matrix = transfer_matrix(ms, CandidateAttack("-", 1, eps=EPS), x, y, ATTACKED[:8])
    assert set(matrix) == {"src", "tgt"} and all(set(row) == {"src", "tgt"} for row in matrix.values())
    md = transfer_markdown(matrix, title="CA- transfer")
    assert "| From \\ To | src | tgt |" in md and md.count("→") == 4


def test_measure_on_matches_white_box_metric(models):
    ms, x, y = models
    attack = QueryAttack("-", 2, eps=EPS, G=0)
    with torch.no_grad():
        gallery = Gallery(ms["tgt"].embed(x), y)
    white = attack(ms["tgt"], gallery, x[ATTACKED], ATTACKED)
    got = measure_on(ms["tgt"], attack, gallery, white.adversarial, ATTACKED, white.targets)
    assert torch.allclose(got, white.metrics["rank"])


def test_transfer_rejects_non_rank_attacks(models):
    ms, x, y = models
    with pytest.raises(ValueError, match="CandidateAttack or QueryAttack"):
        transfer_attack(ms["src"], ms, MaxShiftAttack(EPS), x, y, ATTACKED)
    with pytest.raises(ValueError, match="at least one"):
        transfer_attack(ms["src"], {}, CandidateAttack("+", eps=EPS), x, y, ATTACKED)
