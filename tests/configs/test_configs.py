"""The configs compose from overlays, and composing changed no number.

Layout (configs/README.md): ``configs/base/trainer.yaml`` (trainer settings shared by all), model
overlays ``configs/models/*.yaml`` (each includes the base), data overlays ``configs/data/*.yaml``
(``--data``), the defense ``configs/defenses/max_shift.yaml`` (``--trainer.callbacks``) and budgets
``configs/budgets/*.yaml`` (a later ``--config``). The paper configs ``configs/*.yaml`` are named
stacks: a ``config:`` include of a model overlay plus a few dotted keys.

``tests/golden/configs/<name>.yaml`` are frozen copies of the paper configs as full files, from before
the split. Every paper config, and the overlay stack written in its header, must resolve
(``train.py fit ... --print_config``) to exactly what its frozen copy resolves to; both are resolved
with the current code, so a new default in a library class does not break the comparison, while any
change of a config value does. To change a config on purpose, change its frozen copy too.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from run_helpers import REPO, resolved_config

CONFIGS = REPO / "configs"
GOLDEN = REPO / "tests" / "golden" / "configs"
PAPER_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
OVERLAYS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and p.parent.name != "suites")
#: keys of a config whose string value names another file, relative to the config's folder
FILE_KEYS = ("config", "data", "model", "trainer.callbacks")
#: where commands are documented
DOCUMENTS = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]


@lru_cache(maxsize=None)
def golden(name: str, *extra: str) -> dict:
    return resolved_config("--config", str(GOLDEN / f"{name}.yaml"), *extra)


def header_commands(config: Path) -> list[list[str]]:
    """The ``python train.py fit ...`` lines in a config's header comments, as argument lists."""
    commands = []
    for line in config.read_text().splitlines():
        match = re.match(r"#\s*python train\.py fit (.+)$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


def absolute(args: list[str]) -> list[str]:
    return [str(REPO / a) if a.startswith("configs/") else a for a in args]


def referenced_files(config: Path) -> list[Path]:
    """Files a config pulls in (``config:`` include, ``data:`` / ``trainer.callbacks:`` paths)."""
    spec = yaml.safe_load(config.read_text())
    if not isinstance(spec, dict):
        return []
    return [config.parent / spec[key] for key in FILE_KEYS if isinstance(spec.get(key), str)]


def reachable(config: Path) -> set[Path]:
    """Every file a config pulls in, directly or through its includes."""
    seen: set[Path] = set()
    todo = [config]
    while todo:
        for ref in referenced_files(todo.pop()):
            ref = ref.resolve()
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


def include_chain(config: Path) -> list[Path]:
    """The files a config includes with ``config:``, nearest first."""
    chain = []
    spec = yaml.safe_load(config.read_text())
    while isinstance(spec, dict) and isinstance(spec.get("config"), str):
        config = (config.parent / spec["config"]).resolve()
        chain.append(config)
        spec = yaml.safe_load(config.read_text())
    return chain


# ------------------------------------------------------------------ numbers unchanged
def test_every_paper_config_has_a_frozen_original():
    assert [p.name for p in PAPER_CONFIGS] == sorted(p.name for p in GOLDEN.glob("*.yaml"))
    # 19 ECCV 2020 / hashing / PQ configs + fashion_mnist_cta / _cthm (ACT, HM) + 6 CUB / Cars / SOP ResNet-18 configs
    assert len(PAPER_CONFIGS) == 27


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_and_its_stack_resolve_to_the_frozen_original(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # includes are relative to the including file, not to the cwd
    expected = golden(config.stem)
    assert resolved_config("--config", str(config)) == expected
    commands = header_commands(config)
    assert commands[0] == ["--config", f"configs/{config.name}"], "the header starts with its own command"
    stacks = commands[1:]
    assert stacks, f"{config.name}: the header shows the overlay stack it stands for"
    for stack in stacks:
        assert not any(a == f"configs/{config.name}" for a in stack)
        assert resolved_config(*absolute(stack)) == expected, " ".join(stack)
    assert expected["trainer"]["logger"]["init_args"]["name"] == config.stem


@pytest.mark.parametrize("name", ["fashion_mnist_ct", "fashion_mnist_ctd", "fashion_mnist_dch_16",
                                  "fashion_mnist_dpqn_24bit"])
def test_quickstart_budget_stacks_on_every_model_family(name):
    budget = ("--config", str(CONFIGS / "budgets" / "quickstart.yaml"))
    resolved = resolved_config("--config", str(CONFIGS / f"{name}.yaml"), *budget)
    assert resolved == golden(name, *budget)
    assert resolved["trainer"]["max_epochs"] == 2
    assert resolved["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"] == 2


# ------------------------------------------------------------------ the include rules
@pytest.mark.parametrize("config", [*PAPER_CONFIGS, *OVERLAYS], ids=lambda p: str(p.relative_to(CONFIGS)))
def test_includes_follow_the_rules_jsonargparse_needs(config):
    """jsonargparse reads ``config: <file>`` inside a config file, but only as the FIRST key and only
    one file (a list is silently ignored); a nested block after it REPLACES that whole section of the
    included file (e.g. ``trainer:`` would drop the logger), so later keys must be dotted
    (``trainer.max_epochs: 5``) unless the included files never set the section."""
    spec = yaml.safe_load(config.read_text())
    for key in FILE_KEYS:
        if isinstance(spec, dict) and isinstance(spec.get(key), str):
            assert (config.parent / spec[key]).is_file(), f"{config.name}: {key}: {spec[key]} does not exist"
    if not isinstance(spec, dict) or "config" not in spec:
        return
    keys = list(spec)
    assert keys[0] == "config", f"{config.name}: config: must be the first key"
    assert isinstance(spec["config"], str), f"{config.name}: config: takes one file"
    included = {key.split(".")[0] for path in include_chain(config) for key in yaml.safe_load(path.read_text())}
    for key in keys[1:]:
        assert "." in key or key not in included, (
            f"{config.name}: '{key}:' after an include replaces the included '{key}' section; use dotted keys")


def test_every_overlay_is_used_by_a_paper_config_or_is_a_budget():
    """So the paper-config tests (here and the fast_dev_run in test_train_cli.py) exercise every overlay."""
    used = set().union(*(reachable(p) for p in PAPER_CONFIGS))
    unused = [p for p in OVERLAYS if p.resolve() not in used and p.parent.name != "budgets"]
    assert not unused, f"overlays no paper config uses: {unused}"


# ------------------------------------------------------------------ documented commands
def documented_commands() -> list[tuple[str, list[str]]]:
    """``train.py fit|validate|test --config ...`` commands of the README, the Makefile and docs/."""
    found = []
    for doc in DOCUMENTS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for match in re.finditer(r"train\.py (fit|validate|test) ([^`|>&#\n]*)", text):
            args = match.group(2).strip()
            if "--config" in args and "<" not in args:
                found.append((f"{doc.name}: {match.group(0).strip()}", [match.group(1), *shlex.split(args)]))
    return found


def test_documented_config_paths_exist():
    paths = set()
    for doc in [*DOCUMENTS, *sorted((REPO / "tests").rglob("*.py"))]:
        paths |= set(re.findall(r"configs/[\w/.-]+?\.yaml", doc.read_text()))
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert not missing, missing


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: c[0][:90])
def test_documented_commands_parse(command, tmp_path, monkeypatch):
    """Every documented command line still parses; one made only of paper configs and budgets resolves
    to what it resolved to with the frozen originals."""
    _, (subcommand, *args) = command
    args = [a for a in args if a != "--print_config"]
    monkeypatch.chdir(tmp_path)
    resolved = resolved_config(*absolute(args), subcommand=subcommand)
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    if all(Path(c).parent.name in ("configs", "budgets") for c in configs):
        frozen = [f"{GOLDEN}/{Path(a).name}" if a in configs and Path(a).parent.name == "configs" else a for a in args]
        assert resolved == resolved_config(*absolute(frozen), subcommand=subcommand)


def test_readme_shows_the_stacks():
    training = REPO.joinpath("README.md").read_text()
    for overlay in ("configs/models/", "configs/data/", "configs/defenses/max_shift.yaml", "configs/budgets/"):
        assert overlay in training
