"""TensorBoard from every evaluation: eval.py sub-runs per checkpoint (scalars, images at every eps,
retrieval strips with legends, curves, hparams with real metrics), hashing strips and PR curves,
the embedding projector, hp_metric from validation. Events are read back with EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from robust_ranking.callbacks import EmbeddingProjector, RobustnessEvaluation
from robust_ranking.cli import eval as eval_script
from robust_ranking.data import SyntheticDataModule
from robust_ranking.lightning_modules import DCHRanker, LeNet
from run_helpers import fit_with_adam

SUITE = """
name: tb-test
num_samples: 6
seed: 0
batch_size: 6
sanity: false
attacks:
  - {attack: CA+, epsilons: [0.03, 0.1], w: [1], steps: 2}
  - {attack: QA-, epsilons: [0.03, 0.1], m: [1, 2], steps: 2}
"""

RUN_CONFIG = """
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone: {class_path: robust_ranking.lightning_modules.LeNet, init_args: {embedding_dim: 16}}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args: {margin: 0.2, distance: {class_path: pytorch_metric_learning.distances.CosineSimilarity}}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {test_per_class: 25, eval_batch_size: 64, seed: 0}
"""

SIZES = {"images": 0, "scalars": 0, "tensors": 0}


def events(log_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance=SIZES).Reload()


def hparams_session(log_dir: Path) -> tuple[dict, list[str]]:
    """The hparams logged in ``log_dir`` and the metric tags the HParams tab compares."""
    acc = events(log_dir)
    data = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(data["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(data["_hparams_/session_start_info"]).session_start_info
    params = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.hparams.items()}
    return params, [m.name.tag for m in exp.metric_infos]


def save_run(tiny_ranker, root: Path, name: str) -> Path:
    run = root / name / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(RUN_CONFIG)
    torch.save({"state_dict": tiny_ranker.model.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


def test_eval_writes_a_tensorboard_sub_run_per_checkpoint(tiny_ranker, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    a = save_run(tiny_ranker, tmp_path, "run")
    b = a.with_name("other.ckpt")
    b.write_bytes(a.read_bytes())
    reports = eval_script.main(["--ckpt", str(a), str(b), "--suite", str(suite), "--accelerator", "cpu",
                                "--no-progress"])
    out = a.parent.parent / "robustness"
    logdir = out / "tensorboard"
    assert sorted(p.name for p in logdir.iterdir()) == ["last.tb-test", "other.tb-test"]  # one sub-run each

    acc = events(logdir / "last.tb-test")
    tags = acc.Tags()
    cells = {"robust/CA+/eps=0.03/w=1", "robust/CA+/eps=0.1/w=1", "robust/QA-/eps=0.03/m=1", "robust/QA-/eps=0.1/m=2"}
    assert cells | {"robust/score", "robust/score/CA+", "robust/score/QA-"} <= set(tags["scalars"])
    data = reports[0].data
    assert acc.Scalars("robust/score")[0].value == pytest.approx(data["robustness_score"])
    # images at EVERY eps (smallest w / m), three rows each: clean / adversarial / perturbation
    for attack, size in (("CA+", "w=1"), ("QA-", "m=1")):
        for eps in ("0.03", "0.1"):
            tag = f"robust_images/{attack} eps={eps} {size} (clean|adv|perturbation)"
            assert tag in tags["images"]
            picture = acc.Images(tag)[0]
            assert (picture.height, picture.width) == (3 * 30 + 2, 6 * 30 + 2)  # 3 rows x 6 of 28 + 2 padding
    # retrieval strips of the query attack at every eps, with their text legend; none for CA
    for eps in ("0.03", "0.1"):
        assert f"robust_strips/QA- eps={eps} m=1 (before|after)" in tags["images"]
        assert f"robust_strips/QA- eps={eps} m=1 legend/text_summary" in tags["tensors"]
    assert not [t for t in tags["images"] if t.startswith("robust_strips/CA")]
    legend = acc.Tensors("robust_strips/QA- eps=0.1 m=1 legend/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "before the attack" in legend and "targets:" in legend and "query " in legend
    # rank-vs-eps curves per attack as figures
    assert {"robust_curves/CA+", "robust_curves/QA-"} <= set(tags["images"])
    # hparams with the real metrics
    params, metric_tags = hparams_session(logdir / "last.tb-test")
    assert {"hparams/clean_recall@1", "hparams/clean_map", "hparams/robust_score", "hparams/robust_score/CA+",
            "hparams/robust_score/QA-"} <= set(metric_tags)
    assert params["suite"] == "tb-test" and params["checkpoint"] == str(a) and params["model"] == "MetricRanker"
    assert acc.Scalars("hparams/clean_recall@1")[0].value == pytest.approx(data["clean"]["recall@1"])
    assert acc.Scalars("hparams/robust_score/QA-")[0].value == pytest.approx(data["score_per_attack"]["QA-"])
    assert "hp_metric" not in tags["scalars"]  # no -1 placeholder

    # the curves as PNG beside the Markdown, linked from it and named in the JSON
    png = out / "last.tb-test.curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](last.tb-test.curves.png)" in (out / "last.tb-test.md").read_text()
    assert json.loads((out / "last.tb-test.json").read_text())["figures"] == ["last.tb-test.curves.png"]

    # a re-run replaces the sub-run's events instead of adding a second copy
    eval_script.main(["--ckpt", str(a), "--suite", str(suite), "--accelerator", "cpu", "--no-progress",
                      "--overwrite"])
    assert len(list((logdir / "last.tb-test").glob("events.out.tfevents.*"))) == 1


UNIVERSAL_SUITE = """
name: tb-universal
kind: universal
num_samples: 8
seed: 0
batch_size: 4
attacks:
  - {attack: I-CA+, epsilons: [0.03, 0.1], w: [1], epochs: 1}
  - {attack: UAP-IR:label, epsilons: [0.1], epochs: 1, input_size: [28, 28]}
"""


def test_universal_suites_write_the_same_kinds_of_entries(tiny_ranker, tmp_path):
    suite = tmp_path / "universal.yaml"
    suite.write_text(UNIVERSAL_SUITE)
    ckpt = save_run(tiny_ranker, tmp_path, "run")
    eval_script.main(["--ckpt", str(ckpt), "--suite", str(suite), "--accelerator", "cpu", "--no-progress"])
    out = ckpt.parent.parent / "robustness"
    data = json.loads((out / "last.tb-universal.json").read_text())
    log_dir = out / "tensorboard" / "last.tb-universal"
    tags = events(log_dir).Tags()
    acc = events(log_dir)
    for label in ("I-CA+ eps=0.03 w=1 epochs=1", "I-CA+ eps=0.1 w=1 epochs=1"):
        picture = acc.Images(f"robust_images/{label} (clean|adv|perturbation)")[0]
        assert (picture.height, picture.width) == (3 * 30 + 2, 8 * 30 + 2)  # 3 rows x 8 unseen images
        assert f"robust_images/{label} legend/text_summary" in tags["tensors"]
    first = data["results"][0]
    assert acc.Scalars("robust/I-CA+_eps=0.03_w=1_epochs=1/unseen/rank")[0].value == pytest.approx(first["unseen"]["rank"])
    assert {"robust_curves/I-CA+", "robust_curves/UAP-IR:label"} <= set(tags["images"])
    params, metric_tags = hparams_session(log_dir)
    assert params["suite"] == "tb-universal" and params["model"] == "MetricRanker"
    assert {"hparams/clean_recall@1", "hparams/clean_map", "hparams/I-CA+_eps=0.1"} <= set(metric_tags)
    assert acc.Scalars("hparams/clean_map")[0].value == pytest.approx(data["clean"]["map"])


HASHING_SUITE = """
name: tb-hashing
num_samples: 4
seed: 0
batch_size: 4
attacks:
  - {attack: HAG, epsilons: [0.1, 0.3], steps: 3, check_every: 3, topk: 16}
  - {attack: DHTA, epsilons: [0.3], steps: 3, check_every: 3, alpha: 0.01, topk: 16, target_label: random}
"""


@pytest.fixture(scope="module")
def tiny_dch() -> tuple[DCHRanker, SyntheticDataModule]:
    datamodule = SyntheticDataModule(test_per_class=12, num_queries=8, protocol="query_database",
                                     eval_batch_size=64, seed=0)
    datamodule.setup()
    torch.manual_seed(0)
    model = DCHRanker(LeNet(embedding_dim=16), hash_bits=16)
    fit_with_adam(model, datamodule, 1)
    return model.eval(), datamodule


def trainer(tmp_path: Path, logger, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, enable_checkpointing=False,
                      logger=logger, callbacks=callbacks, **kwargs)


def test_hashing_attacks_get_grids_and_strips_at_every_eps(tiny_dch, tmp_path):
    model, datamodule = tiny_dch
    suite = tmp_path / "hashing.yaml"
    suite.write_text(HASHING_SUITE)
    callback = RobustnessEvaluation(suite=str(suite), num_images=3, strip_queries=2, strip_topk=5, progress=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer(tmp_path, logger, [callback]).test(model, datamodule=datamodule, verbose=False)
    logger.experiment.flush()
    tags = events(Path(logger.log_dir)).Tags()
    for label in ("HAG eps=0.1", "HAG eps=0.3", "DHTA eps=0.3"):
        assert f"robust_images/{label} (clean|adv|perturbation)" in tags["images"]
        assert f"robust_strips/{label} (before|after)" in tags["images"]
    assert {"robust_curves/HAG", "robust_curves/DHTA"} <= set(tags["images"])
    picture = events(Path(logger.log_dir)).Images("robust_strips/DHTA eps=0.3 (before|after)")[0]
    assert (picture.height, picture.width) == (2 * 3 * 34 + 2, 6 * 34 + 2)  # before / after / targets rows
    _, metric_tags = hparams_session(Path(logger.log_dir))
    assert {"hparams/clean_map", "hparams/robust_score", "hparams/robust_score/HAG"} <= set(metric_tags)


def test_training_logs_hp_metric_projector_and_hamming_pr_curve(tiny_dch, tmp_path):
    model, datamodule = tiny_dch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    projector = EmbeddingProjector(every_n_epochs=2, num_samples=10)
    logger = TensorBoardLogger(str(tmp_path), name="tb")  # default_hp_metric: Lightning's -1 first
    try:
        trainer(tmp_path, logger, [projector], max_epochs=2, limit_train_batches=1,
                num_sanity_val_steps=1).fit(model, datamodule=datamodule)
    finally:
        model.load_state_dict(state)
        model.eval()
    assert projector.history == [1]
    logger.experiment.flush()
    acc = events(Path(logger.log_dir))
    hp = [e.value for e in acc.Scalars("hp_metric")]
    val_map = [e.value for e in acc.Scalars("val/map")]
    assert hp[0] == -1 and hp[1:] == pytest.approx(val_map) and len(hp) == 3  # mAP for a hashing ranker
    assert "hashing/pr_curve_figure" in acc.Tags()["images"]
    assert "hashing/pr_curve" in acc.Tags()["tensors"]
    pr = acc.Tensors("hashing/pr_curve")[0].tensor_proto
    assert [d.size for d in pr.tensor_shape.dim] == [6, 17]  # tp fp tn fn precision recall x radii 0..16
    projector_dir = Path(logger.log_dir) / "00002"
    assert (projector_dir / "embeddings" / "tensors.tsv").is_file() or any(Path(logger.log_dir).rglob("sprite.png"))
    assert (Path(logger.log_dir) / "projector_config.pbtxt").is_file()


def test_the_shipped_logger_setting_gives_hp_metric_without_the_placeholder(tiny_dch, tmp_path):
    """configs/base/trainer.yaml: ``default_hp_metric: false``: no -1 anywhere; the ranker opens the
    HParams session itself with its main metric at the first validation."""
    model, datamodule = tiny_dch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    try:
        trainer(tmp_path, logger, [], max_epochs=2, limit_train_batches=1, num_sanity_val_steps=1).fit(
            model, datamodule=datamodule)
    finally:
        model.load_state_dict(state)
        model.eval()
    logger.experiment.flush()
    acc = events(Path(logger.log_dir))
    hp = [e.value for e in acc.Scalars("hp_metric")]
    val_map = [e.value for e in acc.Scalars("val/map")]
    assert -1 not in hp and hp[-len(val_map):] == pytest.approx(val_map)  # each validation, no placeholder
    params, metric_tags = hparams_session(Path(logger.log_dir))
    assert metric_tags == ["hp_metric"] and params["hash_bits"] == 16


def test_metric_ranker_hp_metric_is_recall_at_1(tiny_ranker):
    assert tiny_ranker.model.main_metric == "recall@1"
    assert DCHRanker(LeNet(embedding_dim=16), hash_bits=16).main_metric == "map"


def test_scalars_are_synced_without_warnings(tiny_ranker, tmp_path, recwarn):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    callback = RobustnessEvaluation(suite=str(suite), log_images=False, progress=False)
    trainer(tmp_path, False, [callback]).test(tiny_ranker.model, datamodule=tiny_ranker.datamodule, verbose=False)
    assert not [w for w in recwarn if "sync_dist" in str(w.message)]
