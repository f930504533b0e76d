"""eval.py's transfer (``--source``) and universal-suite modes on tiny CLI-trained checkpoints.

Two rankers trained with different seeds and backbones disagree on the ranking of X; the
transfer test checks through the CLI that each target column is measured with the target's own
model. Every shipped transfer / universal / UAP-IR suite runs here on a tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robust_ranking.cli import eval as eval_script
from run_helpers import REPO, train_in
from robust_ranking.evaluation.registry import ATTACKS
from robust_ranking.evaluation.suite import SUITE_KINDS, Suite
from robust_ranking.attacks.transfer import embed_all, transfer_attack
from robust_ranking.data import RetrievalDataModule
from robust_ranking.evaluation.checkpoints import instantiate, load_ranker, run_config
from robust_ranking.evaluation.data import gallery_tensors

TRANSFER_SUITES = sorted((REPO / "configs" / "suites").glob("transfer*.yaml"))
UNIVERSAL_SUITES = sorted([*(REPO / "configs" / "suites").glob("universal*.yaml"),
                           *(REPO / "configs" / "suites").glob("uap*.yaml")])

CONFIG = """
seed_everything: {seed}
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  logger:
    class_path: pytorch_lightning.loggers.TensorBoardLogger
    init_args: {{save_dir: runs, name: {name}}}
model:
  class_path: robust_ranking.lightning_modules.MetricRanker
  init_args:
    backbone:
      class_path: robust_ranking.lightning_modules.{backbone}
      init_args: {{embedding_dim: 16}}
    loss:
      class_path: pytorch_metric_learning.losses.TripletMarginLoss
      init_args:
        margin: 0.2
        distance: {{class_path: pytorch_metric_learning.distances.CosineSimilarity}}
data:
  class_path: robust_ranking.data.SyntheticDataModule
  init_args: {{test_per_class: 25, eval_batch_size: 64}}
"""

SUITE = """
name: transfer-test
num_samples: 12
seed: 0
batch_size: 5
attacks:
  - {attack: CA+, epsilons: [0.1], w: [1], steps: 3}
  - {attack: QA-, epsilons: [0.1], m: [2], steps: 3}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny rankers on the same synthetic X: LeNet (seed 0) and C2F1 (seed 1)."""
    root = tmp_path_factory.mktemp("transfer")
    for name, backbone, seed in (("tiny_a", "LeNet", 0), ("tiny_b", "C2F1", 1)):
        (root / f"{name}.yaml").write_text(CONFIG.format(seed=seed, name=name, backbone=backbone))
        train_in(root, ["fit", "--config", str(root / f"{name}.yaml")])
    (root / "suite.yaml").write_text(SUITE)
    out = {"root": root, "suite": root / "suite.yaml"}
    for name in ("tiny_a", "tiny_b"):
        (out[name],) = (root / "runs" / name / "version_0" / "checkpoints").glob("*.ckpt")
    return out


def run_eval(args: list[str]) -> list:
    return eval_script.main([*args, "--accelerator", "cpu", "--no-progress"])


def _gallery(ckpt: Path) -> tuple:
    model = load_ranker(ckpt, None, "test")
    # the run's own data section, as eval.py reads it
    dm = instantiate(run_config(ckpt, None)[1], RetrievalDataModule, "data", "test")
    dm.setup("test")
    images, labels = gallery_tensors(dm)
    return model, images, labels


def test_transfer_is_measured_on_the_target_model(runs, tmp_path):
    a, b = runs["tiny_a"], runs["tiny_b"]
    (data,) = run_eval(["--source", str(a), "--ckpt", str(a), str(b), "--suite", str(runs["suite"]),
                        "--output-dir", str(tmp_path)])
    assert data["sources"] == {"tiny_a": str(a)} and list(data["targets"]) == ["tiny_a", "tiny_b"]
    assert data["num_samples"] == 12 and data["gallery_size"] == 100

    # Recompute in-process: the same attacked samples, crafted on A, measured on each target directly.
    model_a, images, labels = _gallery(a)
    model_b = load_ranker(b, None, "test")
    indices = torch.tensor(data["attacked_indices"])
    for row in data["results"]:
        size = row.get("w", row.get("m"))
        attack = ATTACKS.get(row["attack"]).build(row["eps"], size, 0, steps=3)
        res = transfer_attack(model_a, {"tiny_a": model_a, "tiny_b": model_b}, attack, images, labels, indices, 5)
        cells = row["matrix"]["tiny_a"]
        for target in ("tiny_a", "tiny_b"):
            assert cells[target]["rank"] == pytest.approx(float(res.rank[target].double().mean()), abs=1e-6)
            assert cells[target]["rank_clean"] == pytest.approx(float(res.rank_clean[target].double().mean()),
                                                                abs=1e-6)
        # The two models disagree, so a column computed with the source would repeat the diagonal.
        assert cells["tiny_b"]["rank_clean"] != pytest.approx(cells["tiny_a"]["rank_clean"], abs=1e-3)
        assert cells["tiny_b"]["rank"] != pytest.approx(cells["tiny_a"]["rank"], abs=1e-3)

    # The target's clean ranks are the target model's own: CA clean rank recomputed by sorting B's distances.
    ca = next(r for r in data["results"] if r["attack"] == "CA+")
    res = transfer_attack(model_a, {"tiny_b": model_b}, ATTACKS.get("CA+").build(0.1, 1, 0, steps=3), images, labels,
                          indices, 5)
    emb_b = embed_all(model_b, images)
    d = model_b.distance(emb_b[res.targets[:, 0]], emb_b)  # [T, N] query -> X on B
    n = images.shape[0]
    below = []
    for row, (q, c) in enumerate(zip(res.targets[:, 0].tolist(), indices.tolist())):
        others = [x for x in range(n) if x not in (q, c)]
        below.append(float((d[row, others] < d[row, c]).sum()) * 100 / n)  # ECCV: / |X|, strict <
    assert ca["matrix"]["tiny_a"]["tiny_b"]["rank_clean"] == pytest.approx(sum(below) / len(below), abs=1e-3)


def test_full_matrix_markdown_and_json(runs, tmp_path):
    a, b = str(runs["tiny_a"]), str(runs["tiny_b"])
    (data,) = run_eval(["--source", a, b, "--ckpt", a, b, "--suite", str(runs["suite"]),
                        "--output-dir", str(tmp_path)])
    assert set(data["results"][0]["matrix"]) == {"tiny_a", "tiny_b"}
    on_disk = json.loads((tmp_path / "transfer_transfer-test.json").read_text())
    assert on_disk["results"] == data["results"]
    markdown = (tmp_path / "transfer_transfer-test.md").read_text()
    assert "| From \\ To | tiny_a | tiny_b |" in markdown and "**CA+ transfer, ε = 0.1 w=1" in markdown
    assert markdown.count("\n| tiny_b | ") == len(data["results"]) and "→" in markdown  # one row per source


def test_gallery_subset(runs, tmp_path):
    a, b = str(runs["tiny_a"]), str(runs["tiny_b"])
    (data,) = run_eval(["--source", a, "--ckpt", a, b, "--suite", str(runs["suite"]), "--gallery-size", "50",
                        "--output-dir", str(tmp_path)])
    assert data["gallery_size"] == 50 and len(set(data["gallery_subset"])) == 50
    assert max(data["gallery_subset"]) < 100 and max(data["attacked_indices"]) < 50
    assert not list(tmp_path.glob("*.partial.*")), "progress files are removed at the end"


@pytest.mark.parametrize("suite", TRANSFER_SUITES, ids=lambda p: p.stem)
def test_shipped_transfer_suites_run(runs, tmp_path, suite):
    a, b = str(runs["tiny_a"]), str(runs["tiny_b"])
    (data,) = run_eval(["--source", a, "--ckpt", a, b, "--suite", str(suite), "--num-samples", "3",
                        "--batch-size", "3", "--output-dir", str(tmp_path)])
    parsed = Suite.from_yaml(suite)
    assert [r["attack"] for r in data["results"]] == [c.attack for c in parsed.configurations()]
    for row in data["results"]:
        diag = row["matrix"]["tiny_a"]["tiny_a"]
        moved = diag["rank"] - diag["rank_clean"]
        assert (moved < 0) if row["attack"].endswith("+") else (moved > 0), row  # white-box diagonal works


@pytest.mark.parametrize("suite", UNIVERSAL_SUITES, ids=lambda p: p.stem)
def test_shipped_universal_suites_run(runs, tmp_path, suite):
    (data,) = run_eval(["--ckpt", str(runs["tiny_a"]), "--suite", str(suite), "--num-samples", "6",
                        "--batch-size", "6", "--output-dir", str(tmp_path)])
    parsed = Suite.from_yaml(suite, kinds=SUITE_KINDS)
    assert parsed.kind == "universal"
    assert len(data["results"]) == len(list(parsed.configurations()))
    assert data["fit_size"] == 6 and not set(data["fit_indices"]) & set(data["unseen_indices"])
    stem = f"{runs['tiny_a'].stem}.{parsed.name}"
    assert json.loads((tmp_path / f"{stem}.json").read_text())["results"] == data["results"]
    markdown = (tmp_path / f"{stem}.md").read_text()
    perturbations = torch.load(tmp_path / f"{stem}.pt")
    assert len(perturbations) == len(data["results"])
    for row, r in zip(data["results"], perturbations.values()):
        assert r.shape == (1, 28, 28) and float(r.abs().max()) <= row["eps"] + 1e-6  # one shared r within eps
        assert len(row["history"]) == row["hparams"]["epochs"]
        assert row["fit"] and row["unseen"]
    if parsed.name.startswith("uap"):
        assert "| attack |" in markdown and "| resize range | set | mAP clean | mAP | mP@10 clean | mP@10 | mDR |" \
            in markdown
        for row, config in zip(data["results"], parsed.configurations()):
            assert 0.0 <= row["unseen"]["mAP"] <= 1.0 and row["options"] == dict(config.options)
            assert tuple(row["resize_range"] or ()) == tuple(config.options.get("resize_range") or ())
            assert set(row["unseen_at_scale"]) == {f"{s:g}" for s in config.options.get("eval_scales", [1.0])}
    else:
        header = next(line for line in markdown.splitlines() if line.startswith("| ε | set |"))
        assert all(spec.attack in header for spec in parsed.attacks)
        if parsed.name == "universal_eccv2020":
            assert header == "| ε | set | I-CA+ w=1 | I-CA- w=1 | I-QA+ m=1 | I-QA- m=1 |"
    assert list((tmp_path / "tensorboard" / stem).glob("events.out.tfevents.*"))


def test_universal_cli_moves_ranks_in_direction(runs, tmp_path):
    suite = tmp_path / "u.yaml"
    suite.write_text("name: u\nkind: universal\nnum_samples: 20\nbatch_size: 10\nattacks:\n"
                     "  - {attack: I-CA+, epsilons: [0.3], w: [1], epochs: 5}\n"
                     "  - {attack: I-QA-, epsilons: [0.3], m: [1], epochs: 5}\n")
    (data,) = run_eval(["--ckpt", str(runs["tiny_a"]), "--suite", str(suite), "--output-dir", str(tmp_path)])
    ca, qa = data["results"]
    assert ca["fit"]["rank"] < ca["fit"]["rank_clean"] and qa["fit"]["rank"] > qa["fit"]["rank_clean"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_source", "checkpoint {tmp}/missing.ckpt does not exist"),
        ("universal_source", "is a universal suite; transfer takes per-sample CA / QA attacks"),
        ("es_transfer", "ES cannot be transferred"),
        # --devices N works in both modes (tests/evaluation/test_universal_transfer_ddp.py); a half precision does not.
        ("precision_transfer", "--precision bf16: transfer runs attack in 32-bit precision"),
        ("precision_universal", "--precision bf16: universal suites attack in 32-bit precision"),
        ("universal_typo", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("universal_too_big", "needs a fit set and a disjoint unseen set of that size, but the gallery has 100"),
        ("fixed_input", "the model does not take 14x14 inputs"),
        ("bad_kind", "kind must be one of ranking, universal"),
        ("gallery_too_big", "--gallery-size 1000 is larger than X (100 items)"),
    ],
)
def test_errors_are_one_line_and_exit_2(runs, tmp_path, capsys, case, expected):
    a = str(runs["tiny_a"])
    suite = runs["suite"]
    args = ["--ckpt", a]
    universal = {
        "universal_source": "{attack: I-CA+, epsilons: [0.1]}",
        "precision_universal": "{attack: I-CA+, epsilons: [0.1]}",
        "universal_typo": "{attack: I-CA+, epsilons: [0.1], epoch: 3}",
        "universal_too_big": "{attack: I-CA+, epsilons: [0.1]}",
        "fixed_input": "{attack: 'UAP-IR:list', epsilons: [0.1], resize_range: [0.5, 1.0]}",
    }
    if case in universal:
        suite = tmp_path / "u.yaml"
        size = 60 if case == "universal_too_big" else 5
        suite.write_text(f"kind: universal\nnum_samples: {size}\nattacks: [{universal[case]}]\n")
    if case == "missing_source":
        args += ["--source", str(tmp_path / "missing.ckpt")]
    elif case == "universal_source":
        args += ["--source", a]
    elif case == "es_transfer":
        suite = tmp_path / "es.yaml"
        suite.write_text("attacks: [{attack: CA+, epsilons: [0.1]}, {attack: ES, epsilons: [0.1]}]\n")
        args += ["--source", a]
    elif case == "precision_transfer":
        args += ["--source", a, "--precision", "bf16"]
    elif case == "precision_universal":
        args += ["--precision", "bf16"]
    elif case == "gallery_too_big":
        args += ["--source", a, "--gallery-size", "1000"]
    elif case == "bad_kind":
        suite = tmp_path / "k.yaml"
        suite.write_text("kind: universa\nattacks: [{attack: CA+, epsilons: [0.1]}]\n")
    with pytest.raises(SystemExit) as info:
        run_eval([*args, "--suite", str(suite), "--output-dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith("/")]
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), err
    assert expected.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists(), "errors must come before any work"
