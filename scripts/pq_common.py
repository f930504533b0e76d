"""Shared helpers of the PQ scripts (``scripts/pq_eval.py``, ``scripts/pq_ag_table.py``).

Model specs on the command line (``LABEL=SPEC``):

- ``pq:<ckpt>`` -- a checkpoint of a PQ ranker: a :class:`lightning_modules.DPQNRanker` of
  ``train.py``, or a :class:`lightning_modules.KMeansPQRanker` of ``scripts/pq_kmeans_checkpoint.py``;
- ``kmeans:<ckpt>:<bits>[:<M>]`` -- any ranker checkpoint (e.g. a metric ranker) plus k-means PQ
  codebooks of ``bits`` bits in ``M`` codebooks (default 4) fitted on the database embeddings
  (:meth:`lightning_modules.KMeansPQRanker.fit`, faiss, seed 0).

A checkpoint is rebuilt from the ``model`` section of its run's ``config.yaml`` (LightningCLI
saves it next to ``checkpoints/``) and its state dict is loaded strictly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data import FashionMNISTDataModule  # noqa: E402
from evaluation import checkpoints  # noqa: E402
from evaluation.errors import EvaluationError  # noqa: E402
from lightning_modules import KMeansPQRanker, Ranker  # noqa: E402


@dataclass
class Split:
    """Images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]`` of the query set or the database."""

    images: Tensor
    labels: Tensor


def run_config(ckpt: str | Path) -> dict:
    """The ``config.yaml`` of a checkpoint's run (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
    ckpt = Path(ckpt)
    config = (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "config.yaml"
    if not ckpt.is_file() or not config.is_file():
        raise SystemExit(f"error: need a checkpoint and its run config.yaml: {ckpt} / {config}")
    return yaml.safe_load(config.read_text())


def load_ranker(ckpt: str | Path) -> Ranker:
    """The ranker of a checkpoint (CPU, eval mode): :func:`evaluation.checkpoints.load_ranker`, the one
    safe loader (weights_only, allow-listed class paths) with the run config's ``model`` as fallback."""
    ckpt = Path(ckpt)
    run_config(ckpt)  # the scripts need the run config (its data section) as well: refuse early without it
    try:
        model_section, _, where = checkpoints.run_config(ckpt, None)
        return checkpoints.load_ranker(ckpt, model_section, where).eval()
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None


def query_database(num_queries: int = 1000, database: str = "test_rest", seed: int = 0) -> tuple[Split, Split]:
    """The Fashion-MNIST query set and database of docs/dpqn.md (1000 test queries, seed 0;
    the other 9000 test images are the database)."""
    dm = FashionMNISTDataModule(protocol="query_database", num_queries=num_queries, database=database, seed=seed,
                                eval_batch_size=1000)
    dm.setup()

    def stack(loader) -> Split:
        images, labels = zip(*[(x, y) for x, y, _ in loader])
        return Split(torch.cat(images), torch.cat(labels))

    return stack(dm.query_dataloader()), stack(dm.database_dataloader())


@torch.no_grad()
def batched(fn, images: Tensor, batch_size: int = 1000) -> Tensor:
    """``fn`` over ``images`` in batches, concatenated."""
    return torch.cat([fn(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])


def build_model(spec: str, database: Split, return_embeddings: bool = False) -> Ranker | tuple[Ranker, Tensor | None]:
    """A PQ ranker from a ``pq:<ckpt>`` / ``kmeans:<ckpt>:<bits>[:<M>]`` spec (see module doc).

    ``return_embeddings``: also return the database embeddings the k-means codebooks were fitted
    on (``None`` for ``pq:`` specs), so that callers can quantize them instead of embedding the
    database a second time (what dominates the cost of a large backbone on CPU)."""
    kind, _, rest = spec.partition(":")
    if kind == "pq":
        model = load_ranker(rest)
        if "codebooks" not in model.capabilities:
            raise SystemExit(f"error: {rest} holds a {type(model).__name__} without codebooks; use kmeans:{rest}:<bits>")
        return (model, None) if return_embeddings else model
    if kind == "kmeans":
        parts = rest.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            path, bits, num_codebooks = parts[0], int(parts[1]), int(parts[2])
        else:
            path, _, bits_text = rest.rpartition(":")
            if not bits_text.isdigit():
                raise SystemExit(f"error: bad model spec {spec!r}: kmeans:<ckpt>:<bits>[:<M>]")
            bits, num_codebooks = int(bits_text), 4
        ranker = load_ranker(path)
        embeddings = batched(ranker.embed, database.images)
        model = KMeansPQRanker.fit(ranker, embeddings, num_bits=bits, num_codebooks=num_codebooks).eval()
        return (model, embeddings) if return_embeddings else model
    raise SystemExit(f"error: bad model spec {spec!r}: pq:<ckpt> or kmeans:<ckpt>:<bits>[:<M>]")


def parse_models(items: list[str]) -> list[tuple[str, str]]:
    """``["LABEL=SPEC", ...]`` -> ``[(label, spec), ...]``."""
    out = []
    for item in items:
        label, sep, spec = item.partition("=")
        if not sep or not label or not spec:
            raise SystemExit(f"error: --model wants LABEL=SPEC, got {item!r}")
        out.append((label, spec))
    return out
