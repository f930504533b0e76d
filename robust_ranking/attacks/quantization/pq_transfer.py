"""PQ-AG transferability (Feng et al., AAAI 2020, Tables 3 / 4): adversarial queries crafted
white-box on a source PQ ranker, measured on every target PQ ranker.

The query / database protocol of :mod:`attacks.quantization.pq_ag_attack`: every model encodes the
database once (its own hard codes); the attacked queries are crafted on the source against the
source's database codes, then ranked by each target against the target's database codes (SDC: the
target's codes of the adversarial queries; ADC: the target's features of them). Same family at
different bit budgets = bits transferability (Table 3); different backbones or training = model
transferability (Table 4). Runs from :mod:`evaluation.transfer` (``eval.py --source ... --ckpt ...
--suite configs/suites/pqag_transfer.yaml``).

DDP: ``collectives`` splits the attack batches and every encoding / measuring pass by whole batches
(:func:`attacks.universal.sharding.map_batches`), so every forward has its one-process shape and the
numbers equal world size 1's bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from robust_ranking.attacks.attack import frozen_eval
from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.quantization.pq_ag_attack import PQAGAttack, query_average_precision
from robust_ranking.attacks.universal.sharding import map_batches, single
from robust_ranking.data.retrieval_batch import collate_retrieval_batch

__all__ = ["PQTransferResult", "dataset_tensors", "encode_database", "pq_transfer_attack"]


def dataset_tensors(dataset: Dataset, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """A retrieval dataset (``query_set`` / ``database_set``) as ``(images [N, C, H, W], labels [N])``, in index order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_retrieval_batch)
    images, labels = zip(*[(batch[0], batch[1]) for batch in loader])
    return torch.cat(images), torch.cat(labels)


def encode_database(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256,
                    collectives: Any = None) -> Gallery:
    """The database as ``model``'s retrieval index stores it: ``Gallery(model.encode(images), labels)``."""
    with frozen_eval(model), torch.no_grad():
        codes = map_batches(collectives, images.shape[0], batch_size,
                            lambda s, e: {"codes": model.encode(images[s:e])})["codes"]
    return Gallery(codes, labels.to(codes.device))


@dataclass
class PQTransferResult:
    """Adversarial queries crafted on a source and their per-query AP on each target.

    Attributes:
        adversarial: ``[B, C, H, W]`` the queries crafted on the source.
        ap / ap_clean: target name -> ``{"ap_sdc": [B], "ap_adc": [B]}`` per-query AP of the
            adversarial / clean queries on that target (AP@topk when the attack has ``topk``).
    """

    adversarial: Tensor
    ap: dict[str, dict[str, Tensor]]
    ap_clean: dict[str, dict[str, Tensor]]


def pq_transfer_attack(
    source_model: nn.Module,
    target_models: Mapping[str, nn.Module],
    attack: PQAGAttack,
    query_images: Tensor,
    query_labels: Tensor,
    sample_indices: Tensor,
    databases: Mapping[str, Gallery],
    source_database: Gallery,
    batch_size: int = 250,
    *,
    progress: bool = False,
    collectives: Any = None,
) -> PQTransferResult:
    """Craft ``attack`` on ``source_model`` for the queries ``sample_indices``, measure on every target.

    Args:
        query_images / query_labels: ``[Q, C, H, W]`` / ``[Q]`` the whole query set.
        sample_indices: ``[B]`` the attacked queries (indices into the query set; they key the
            random start, as in the engine).
        databases: target name -> the target's database codes (:func:`encode_database`).
        source_database: the source's database codes.
        collectives: split the batches over the ranks of a DDP run; every rank gets the whole result.
    """
    if not isinstance(attack, PQAGAttack):
        raise ValueError(f"PQ transfer measures SDC / ADC mAP of PQ-AG queries, got {type(attack).__name__}")
    if not target_models:
        raise ValueError("target_models must name at least one model")
    for name, model in {"source": source_model, **target_models}.items():
        if "codebooks" not in getattr(model, "capabilities", frozenset()):
            raise ValueError(f"PQ transfer needs PQ rankers (capability 'codebooks'); {name} "
                             f"({type(model).__name__}) has none")
    sample_indices = torch.as_tensor(sample_indices).long()
    images, labels = query_images[sample_indices], query_labels[sample_indices]
    world = single(collectives).world_size
    bar = tqdm(total=math.ceil(math.ceil(len(sample_indices) / batch_size) / world), desc=f"transfer {attack.name}",
               unit="batch", leave=False, disable=not progress)

    def craft(start: int, stop: int) -> dict[str, Tensor]:
        res = attack(source_model, source_database, images[start:stop], sample_indices[start:stop],
                     query_labels=labels[start:stop])
        bar.update(1)
        return {"adversarial": res.adversarial.detach()}

    try:
        adversarial = map_batches(collectives, len(sample_indices), batch_size, craft)["adversarial"]
    finally:
        bar.close()
    ap, ap_clean = {}, {}
    for name, model in target_models.items():
        database = databases[name]
        with frozen_eval(model):
            for out, x in ((ap, adversarial), (ap_clean, images)):
                out[name] = map_batches(
                    collectives, len(sample_indices), batch_size,
                    lambda s, e, x=x, model=model, database=database: query_average_precision(
                        model, database, x[s:e], labels[s:e], attack.topk))
    return PQTransferResult(adversarial, ap, ap_clean)
