"""bench/defense_side_by_side.sh (docs/results/defenses.md): the commands it runs parse, every arm of a
family warm-starts from that family's base and trains the same budget, and the defenses get the stated
adversary. DRY_RUN=1 prints the commands instead of running them."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from robust_ranking.evaluation.options import resolve_suite
from run_helpers import REPO, resolved_config

SCRIPT = REPO / "bench" / "defense_side_by_side.sh"
DEFENSES = {
    "max_shift": "robust_ranking.callbacks.MaxShiftAdversarialTraining",
    "act": "robust_ranking.callbacks.AntiCollapseTripletTraining",
    "hm": "robust_ranking.callbacks.HardnessManipulationTraining",
}


def dry_run(out: Path, *stages: str, arms: str = "max_shift hm") -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "python", "DEFENSE_ARMS": arms}
    done = subprocess.run(["bash", str(SCRIPT), str(out), *stages], capture_output=True, text=True, env=env,
                          check=True, timeout=60)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_training_command_parses_and_arms_share_one_budget(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    commands = dry_run(tmp_path / "out", arms="act hm")
    trains = {c[c.index("--trainer.logger.init_args.name") + 1]: c[3:] for c in commands if c[1] == "train.py"}
    assert sorted(trains) == sorted(["ct_base", "ct_vanilla", "ct_max_shift", "ct_act", "ct_hm", "dch_base",
                                     "dch_vanilla", "dch_act", "dch_hm", "dpqn_base", "dpqn_vanilla", "dpqn_act",
                                     "dpqn_hm"])
    for name, argv in trains.items():
        config = resolved_config(*argv)
        family, arm = name.split("_", 1)
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "out")
        if arm == "base":
            assert config["trainer"]["max_epochs"] == (1 if family == "ct" else 2)
            continue
        assert config["trainer"]["max_epochs"] == 1
        assert config["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"] == 1
        callbacks = {cb["class_path"]: cb.get("init_args", {}) for cb in config["trainer"]["callbacks"]}
        warm = callbacks["robust_ranking.callbacks.WarmStart"]["ckpt_path"]
        assert warm == str(tmp_path / "out" / f"{family}_base" / "version_0" / "checkpoints" / "last.ckpt")
        defenses = [path for path in callbacks if path in DEFENSES.values()]
        if arm == "vanilla":
            assert defenses == []
            continue
        assert defenses == [DEFENSES[arm]]
        adversary = callbacks[DEFENSES[arm]]
        assert math.isclose(adversary["eps"], 77 / 255) and math.isclose(adversary["alpha"], 10 / 255)
        assert adversary["steps"] == 10
        if arm == "hm":  # the margin is a hardness in the ranker's distance units: 10% of its range
            assert adversary["margin"] == {"ct": 0.2, "dch": 3.2, "dpqn": 0.4}[family]


def test_the_evaluations_use_shipped_suites_on_every_arm(tmp_path: Path) -> None:
    commands = [c for c in dry_run(tmp_path, "ct-eval", "dch-eval", "dpqn-eval") if c[1] == "eval.py"]
    suites = [c[c.index("--suite") + 1] for c in commands]
    assert suites == ["robrank_ers_28", "eccv2020_28x28_defense_check", "sdha_defense_check", "pqag_table"]
    for command, suite in zip(commands, suites):
        assert resolve_suite(suite).is_file()
        ckpts = command[command.index("--ckpt") + 1:]
        arms = [Path(c).parents[2].name.split("_", 1)[1] for c in ckpts]
        assert arms == (["vanilla", "max_shift", "act", "hm"] if suite in ("robrank_ers_28", "eccv2020_28x28_defense_check")
                        else ["vanilla", "max_shift", "hm"])


@pytest.mark.parametrize("stage", ["ct-nothing", "gan-base"])
def test_an_unknown_stage_fails(tmp_path: Path, stage: str) -> None:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "python"}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), stage], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode != 0 and "unknown stage" in done.stderr
