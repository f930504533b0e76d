"""``robust_ranking.cli.kmeans_pq``: k-means PQ checkpoints of a trained ranker that eval.py loads."""

from __future__ import annotations

import pytest
import torch
import yaml

from robust_ranking.cli import kmeans_pq
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config
from robust_ranking.data import RetrievalDataModule
from robust_ranking.lightning_modules import KMeansPQRanker


def test_a_checkpoint_per_code_length_that_the_engine_rebuilds(tiny_run, tmp_path):
    out = tmp_path / "kmeans"
    paths = kmeans_pq.main(["--ckpt", str(tiny_run["ckpt"]), "--out", str(out), "--bits", "4", "8",
                            "--num_codebooks", "2", "--num_queries", "20"])
    assert paths == [out / "4bit/checkpoints/kmeans.ckpt", out / "8bit/checkpoints/kmeans.ckpt"]
    config = yaml.safe_load((out / "8bit/config.yaml").read_text())
    assert config["data"]["init_args"]["protocol"] == "query_database"
    assert config["data"]["init_args"]["num_queries"] == 20 and config["data"]["init_args"]["database"] == "test_rest"

    # eval.py's path: the run config next to the checkpoint rebuilds the model, the state dict loads strictly
    model_section, data_section, where = run_config(paths[1], None)
    model = load_ranker(paths[1], model_section, where)
    assert isinstance(model, KMeansPQRanker) and model.codebooks.shape[:2] == (2, 16)
    datamodule = instantiate(data_section, RetrievalDataModule, "data", where)
    datamodule.setup("test")
    assert len(datamodule.database_set) == 100 - 20
    # the codebooks were fitted on the source ranker's embeddings of that database
    images = torch.stack([datamodule.database_set[i][0] for i in range(len(datamodule.database_set))])
    source = load_ranker(tiny_run["ckpt"], *run_config(tiny_run["ckpt"], None)[::2]).eval()
    with torch.no_grad():
        refit = KMeansPQRanker.fit(source, source.embed(images), num_bits=8, num_codebooks=2, seed=0)
    assert torch.equal(refit.codebooks, model.codebooks)


@pytest.mark.parametrize("args, expected", [
    (["--bits", "5", "--num_codebooks", "2"], "--bits 5: must be a positive multiple of --num_codebooks 2"),
    (["--ckpt", "/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, capsys, args, expected):
    argv = ["--ckpt", str(tiny_run["ckpt"]), "--out", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as info:
        kmeans_pq.main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and line == f"kmeans_pq: error: {expected}"
    assert not (tmp_path / "out").exists()
