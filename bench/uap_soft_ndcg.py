"""Measurement study (not a robustness evaluation): UAP-IR's list-wise loss on CLEAN queries -- its soft
NDCG@10 at several temperatures against the exact NDCG@10 -- to choose the temperature ``tau``. No
attack runs; it checks the loss a suite option uses, so it lives in bench/ (docs/universal.md, docs/results/universal.md).

    OMP_NUM_THREADS=1 .venv/bin/python bench/uap_soft_ndcg.py

On the C2F1 CT model, the 250 fit queries of uap_retrieval.yaml (--num-samples 250, seed 0).
"""

from pathlib import Path

import torch

from robust_ranking.attacks.gallery import Gallery
from robust_ranking.attacks.transfer import embed_all
from robust_ranking.attacks.universal.uap_retrieval import UAPRetrieval
from robust_ranking.attacks.universal.universal_ranking_attack import fit_unseen_split
from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config
from robust_ranking.evaluation.data import gallery_tensors

torch.set_num_threads(1)
ckpt = Path("runs/fashion_mnist_ct/version_0/checkpoints/epoch06-recall1_0.9009.ckpt")
model_section, section, where = run_config(ckpt, None)
model = load_ranker(ckpt, model_section, where)
dm = instantiate(section, RetrievalDataModule, "data", "bench/uap_soft_ndcg.py")
dm.setup("test")
images, labels = gallery_tensors(dm)
gallery = Gallery(embed_all(model, images), labels)
fit, _ = fit_unseen_split(len(labels), size=250, seed=0)
with torch.no_grad():
    f = gallery.embeddings[fit]
    y = labels[fit]
    # exact NDCG@10 of the clean top-10 lists (self excluded by dropping the query's own entry)
    d = model.distance(f, gallery.embeddings)
    d[torch.arange(len(fit)), fit] = float("inf")
    top = d.topk(10, dim=1, largest=False).indices
    gain = (labels[top] == y[:, None]).float()
    disc = 1.0 / torch.log2(torch.arange(2, 12).float())
    ideal = (gain.sort(1, descending=True).values * disc).sum(1).clamp_min(1e-12)
    print(f"exact NDCG@10 (self excluded): {float(((gain * disc).sum(1) / ideal).mean()):.3f}")
    print(f"distance gap between rank 1 and rank 10: {float((d.gather(1, top)[:, 9] - d.gather(1, top)[:, 0]).mean()):.4f}")
    for tau in (0.01, 0.003, 0.001, 0.0003):
        loss = UAPRetrieval("list", eps=0.1, tau=tau)._loss_factory(model, gallery)
        print(f"tau={tau}: soft NDCG@10 = {float(loss(f, f, y).mean()):.3f}")
