"""The RobustnessEvaluation callback: the single-process ``trainer.test`` path (inference mode)
logs scalars, images and reports; during ``fit`` it runs every N epochs, never in the sanity check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from robust_ranking.evaluation.engine import RobustnessEvaluator
from robust_ranking.evaluation.suite import SuiteError
from robust_ranking.callbacks import RobustnessEvaluation

SUITE = """
name: callback-test
num_samples: 12
seed: 0
batch_size: 6
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1, 2], steps: 3}
  - {attack: QA+, epsilons: [0.1], m: [1], steps: 3}
  - {attack: ES, epsilons: [0.1], steps: 2}
"""


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:
    kwargs = dict(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                  enable_model_summary=False, use_distributed_sampler=False, logger=False, enable_checkpointing=False)
    kwargs.update(overrides)
    return kwargs


def test_trainer_test_logs_scalars_images_and_report(tiny_ranker, suite_file, tmp_path, monkeypatch):
    seen_inference_mode = []
    original_run = RobustnessEvaluator.run

    def spy(self, *args, **kwargs):
        seen_inference_mode.append(torch.is_inference_mode_enabled())
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(RobustnessEvaluator, "run", spy)
    callback = RobustnessEvaluation(suite=str(suite_file), report_dir=str(tmp_path / "reports"), num_images=4,
                                    strip_queries=2, strip_topk=4, progress=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, inference_mode=True), callbacks=[callback])
    (metrics,) = trainer.test(tiny_ranker.model, datamodule=tiny_ranker.datamodule, verbose=False)

    assert seen_inference_mode == [True], "the single-process test loop runs under torch.inference_mode"
    expected = {"robust/CA+/eps=0.1/w=1", "robust/CA+/eps=0.1/w=2", "robust/QA+/eps=0.1/m=1", "robust/ES/eps=0.1",
                "robust/score"}
    assert expected <= set(metrics)
    results = callback.last_results
    assert metrics["robust/CA+/eps=0.1/w=2"] == pytest.approx(results.find("CA+", 0.1, 2).mean)
    assert metrics["robust/score"] == pytest.approx(results.score.value)
    assert callback.history == [("test", 0)]

    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert expected <= set(events.Tags()["scalars"])
    images = events.Tags()["images"]
    assert any(tag.startswith("robust_images/CA+ eps=0.1 w=1") for tag in images)
    assert any(tag.startswith("robust_images/ES eps=0.1") for tag in images)
    strip = [tag for tag in images if tag.startswith("robust_strips/QA+ eps=0.1 m=1")]
    assert strip and not [tag for tag in images if tag.startswith("robust_strips/CA")]  # CA perturbs candidates
    picture = events.Images(strip[0])[0]
    # 2 queries x (before / after / targets) = 6 rows of 1 + 4 tiles (28 + 4 frame + 2 padding pixels)
    assert (picture.height, picture.width) == (6 * 34 + 2, 5 * 34 + 2)
    assert "robust_strips/QA+ eps=0.1 m=1 legend/text_summary" in events.Tags()["tensors"]  # add_text

    data = json.loads((tmp_path / "reports" / "test.json").read_text())
    assert data["num_samples"] == 12 and len(data["results"]) == 4
    assert data["clean"]["recall@1"] == pytest.approx(metrics["test/recall@1"])  # the ranker's own metric
    assert (tmp_path / "reports" / "test.md").read_text().startswith("# Robustness: test epoch 0")


def _fit(tiny_ranker, suite_file, tmp_path, every_n_epochs: int, max_epochs: int) -> RobustnessEvaluation:
    callback = RobustnessEvaluation(suite=str(suite_file), every_n_epochs=every_n_epochs, num_samples=4,
                                    log_images=False, progress=False)
    model = tiny_ranker.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, limit_train_batches=2,
                                          num_sanity_val_steps=1), callbacks=[callback])
    try:
        trainer.fit(model, datamodule=tiny_ranker.datamodule)
    finally:  # the fixture's model is shared: undo the training
        model.load_state_dict(state)
        model.eval()
    return callback


def test_fit_runs_every_n_epochs_and_not_in_the_sanity_check(tiny_ranker, suite_file, tmp_path):
    assert _fit(tiny_ranker, suite_file, tmp_path, every_n_epochs=1, max_epochs=2).history == [("val", 0), ("val", 1)]
    callback = _fit(tiny_ranker, suite_file, tmp_path, every_n_epochs=2, max_epochs=3)
    assert callback.history == [("val", 1)]
    assert "robust/score" in callback.scalars(callback.last_results)


def test_suite_errors_surface_when_the_callback_is_built(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [{attack: CA+, epsilon: [0.1]}]")
    with pytest.raises(SuiteError, match="did you mean 'epsilons'"):
        RobustnessEvaluation(suite=str(bad))
    with pytest.raises(ValueError, match="every_n_epochs"):
        RobustnessEvaluation(suite=str(bad), every_n_epochs=0)


def test_w_too_large_fails_in_setup_before_training(tiny_ranker, tmp_path):
    suite = tmp_path / "big.yaml"
    suite.write_text("attacks: [{attack: CA+, epsilons: [0.1], w: [500]}]")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[RobustnessEvaluation(suite=str(suite))])
    with pytest.raises(SuiteError, match="w=500 needs a gallery of more than 500 items, but the gallery has 100"):
        trainer.fit(tiny_ranker.model, datamodule=tiny_ranker.datamodule)
    assert trainer.global_step == 0


def test_fast_dev_run_runs_every_configuration_on_a_few_samples(tiny_ranker, suite_file, tmp_path):
    """A fast_dev_run exercises the loop (as Lightning's other shortcuts): every configuration runs,
    on FAST_DEV_RUN_SAMPLES samples, without the sanity checks; the suite itself is unchanged."""
    from robust_ranking.callbacks.robustness_evaluation import FAST_DEV_RUN_SAMPLES

    callback = RobustnessEvaluation(suite=str(suite_file), progress=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, fast_dev_run=1), callbacks=[callback])
    trainer.test(tiny_ranker.model, datamodule=tiny_ranker.datamodule, verbose=False)
    results = callback.last_results
    assert [r.label for r in results.results] == ["CA+ eps=0.1 w=1", "CA+ eps=0.1 w=2", "QA+ eps=0.1 m=1", "ES eps=0.1"]
    assert results.num_samples == FAST_DEV_RUN_SAMPLES and all(r.count == FAST_DEV_RUN_SAMPLES for r in results.results)
    assert not results.sanity and callback.suite.num_samples == 12
