"""Transfer (black-box) ranking attacks, ECCV 2020 Sec. 5.1 / Table 5.

Zhou et al., "Adversarial Ranking Attack and Defense", ECCV 2020, Table 5: adversarial
candidates (CA) / queries (QA) are crafted white-box on a *source* model and used unchanged
against *target* models; "we report the rank of the same c with respect to the same q across
different models". So a target's number is recomputed from scratch with the target's own
embeddings: the same adversarial images, the same targets Q / C (indices into X), the target
model's embedding of X as the gallery, and the normalized rank of Sec. 4 with the same
exclusions as the white-box attacks (:mod:`attacks.ranks`). The diagonal (source = target)
equals the white-box attack.

Under DDP (``collectives``, see :mod:`attacks.universal.sharding`) the attacked samples are split
by whole attack batches (rank r crafts batches r, r + W, ... of ``batch_size``), the adversarial
images and targets are gathered back in sample order by copying, and every embedding pass is split
the same way: every forward runs at the shape it has in one process, so the numbers are those of
world size 1, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.attacks.ranking.candidate_attack import CandidateAttack
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.ranking.query_attack import QueryAttack
from robust_ranking.attacks.ranks import normalized_rank, self_and_target_mask
from robust_ranking.attacks.universal.sharding import map_batches, single

__all__ = ["TransferResult", "embed_all", "measure_on", "transfer_attack", "transfer_matrix", "transfer_markdown"]


@torch.no_grad()
def embed_all(model: nn.Module, images: Tensor, batch_size: int = 256, collectives: Any = None) -> Tensor:
    """``model.embed`` of ``images`` in batches, in eval mode (state restored).

    ``collectives``: the batches are split over the ranks and gathered (same result on every rank).
    """
    with frozen_eval(model):
        return map_batches(collectives, images.shape[0], batch_size,
                           lambda s, e: {"embedding": model.embed(images[s:e])})["embedding"]


@torch.no_grad()
def measure_on(
    model: nn.Module,
    attack: CandidateAttack | QueryAttack,
    gallery: Gallery,
    images: Tensor,
    sample_indices: Tensor,
    targets: Tensor,
    batch_size: int = 256,
    collectives: Any = None,
) -> Tensor:
    """Per-sample normalized rank (percent) of ``images`` on ``model`` for the given targets.

    CA: ``mean_{q in Q} R(q, c~)`` with ``c~ = images`` and ``Q = targets``; QA:
    ``mean_{c in C} R(q~, c)`` with ``q~ = images`` and ``C = targets``. ``gallery`` holds
    ``model``'s own clean embeddings of X.
    """
    n = len(gallery)
    emb = embed_all(model, images, batch_size, collectives)  # [B, D]
    sample_indices, targets = sample_indices.to(emb.device), targets.to(emb.device)
    if isinstance(attack, CandidateAttack):
        q_emb = gallery.embeddings[targets]  # [B, w, D]
        d_qx = model.distance(q_emb, gallery.embeddings)  # [B, w, N]
        d_qc = model.distance(q_emb, emb[:, None, :]).squeeze(-1)  # [B, w]
        return normalized_rank(d_qc, d_qx, self_and_target_mask(targets, sample_indices, n)).mean(-1)
    d_x = model.distance(emb[:, None, :], gallery.embeddings).squeeze(1)  # [B, N]
    excluded = self_and_target_mask(sample_indices, targets, n)
    return normalized_rank(d_x.gather(1, targets), d_x[:, None, :], excluded).mean(-1)


@dataclass
class TransferResult:
    """Adversarial examples crafted on a source model and measured on each target.

    Attributes:
        adversarial: ``[B, C, H, W]`` images crafted on the source.
        targets: ``[B, k]`` the source attack's targets (Q for CA, C for QA).
        rank / rank_clean: target name -> ``[B]`` normalized ranks (percent) of the adversarial
            / clean images on that target.
    """

    adversarial: Tensor
    targets: Tensor
    rank: dict[str, Tensor]
    rank_clean: dict[str, Tensor]


def transfer_attack(
    source_model: nn.Module,
    target_models: Mapping[str, nn.Module],
    attack: CandidateAttack | QueryAttack,
    gallery_images: Tensor,
    gallery_labels: Tensor,
    sample_indices: Tensor,
    batch_size: int = 256,
    *,
    source_gallery: Gallery | None = None,
    target_galleries: Mapping[str, Gallery] | None = None,
    progress: bool = False,
    collectives: Any = None,
) -> TransferResult:
    """Craft ``attack`` on ``source_model`` for the X members ``sample_indices``, measure on every target.

    Args:
        gallery_images: ``[N, C, H, W]`` the whole X (each model embeds it itself).
        gallery_labels: ``[N]``.
        sample_indices: ``[B]`` attacked candidates (CA) / queries (QA), indices into X.
        source_gallery / target_galleries: each model's clean embeddings of X, when the caller
            already has them (several attacks / sources reuse them; embedding X with a
            ResNet-18 on a CPU costs minutes). Missing ones are computed here.
        progress: a tqdm bar over the attack batches on the source.
        collectives: split the attack batches (and the embedding passes) over the ranks of a DDP
            run; every rank gets the whole result.
    """
    if not isinstance(attack, (CandidateAttack, QueryAttack)):
        raise ValueError(f"transfer measures normalized ranks: needs a CandidateAttack or QueryAttack, "
                         f"got {type(attack).__name__}")
    if not target_models:
        raise ValueError("target_models must name at least one model")
    sample_indices = torch.as_tensor(sample_indices).long()
    if source_gallery is None:
        source_gallery = Gallery(embed_all(source_model, gallery_images, batch_size, collectives), gallery_labels)
    target_galleries = target_galleries or {}
    images = gallery_images[sample_indices]
    world = single(collectives).world_size
    bar = tqdm(total=math.ceil(math.ceil(len(sample_indices) / batch_size) / world), desc=f"transfer {attack.name}",
               unit="batch", leave=False, disable=not progress)

    def craft(start: int, stop: int) -> dict[str, Tensor]:
        res = attack(source_model, source_gallery, images[start:stop], sample_indices[start:stop])
        bar.update(1)
        return {"adversarial": res.adversarial.detach(), "targets": res.targets}

    try:
        crafted = map_batches(collectives, len(sample_indices), batch_size, craft)
    finally:
        bar.close()
    adv, tgt = crafted["adversarial"], crafted["targets"]
    rank, rank_clean = {}, {}
    for name, model in target_models.items():
        gallery = target_galleries.get(name)
        if gallery is None:
            gallery = Gallery(embed_all(model, gallery_images, batch_size, collectives), gallery_labels)
        rank[name] = measure_on(model, attack, gallery, adv, sample_indices, tgt, batch_size, collectives)
        rank_clean[name] = measure_on(model, attack, gallery, images, sample_indices, tgt, batch_size, collectives)
    return TransferResult(adv, tgt, rank, rank_clean)


def transfer_matrix(
    models: Mapping[str, nn.Module],
    attack: CandidateAttack | QueryAttack,
    gallery_images: Tensor,
    gallery_labels: Tensor,
    sample_indices: Tensor,
    batch_size: int = 256,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Table 5: ``matrix[from][to] = (mean clean rank, mean adversarial rank)`` on ``to``."""
    return {
        src: {
            tgt: (float(res.rank_clean[tgt].mean()), float(res.rank[tgt].mean()))
            for tgt in models
        }
        for src, res in (
            (src, transfer_attack(model, models, attack, gallery_images, gallery_labels, sample_indices, batch_size))
            for src, model in models.items()
        )
    }


def transfer_markdown(matrix: Mapping[str, Mapping[str, tuple[float, float]]], title: str = "") -> str:
    """A "From \\ To" Markdown table, cells ``clean→adversarial`` (percent, one decimal)."""
    targets = list(next(iter(matrix.values())).keys()) if matrix else []
    lines = [f"**{title}**", ""] if title else []
    lines.append("| From \\ To | " + " | ".join(targets) + " |")
    lines.append("| --- |" + " --- |" * len(targets))
    for src, row in matrix.items():
        lines.append(f"| {src} | " + " | ".join(f"{row[t][0]:.1f}→{row[t][1]:.1f}" for t in targets) + " |")
    return "\n".join(lines) + "\n"
