"""Attack suites: the shipped YAMLs parse; every mistake is one clear line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from robust_ranking.evaluation.registry import ATTACKS, UNIVERSAL_ATTACKS, AttackRegistry
from robust_ranking.attacks.ranking.max_shift_attack import MaxShiftAttack
from robust_ranking.evaluation.suite import SUITE_KINDS, Suite, SuiteError
from run_helpers import REPO

SUITES = sorted((REPO / "configs" / "suites").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, registry: AttackRegistry = ATTACKS) -> str:
    with pytest.raises(SuiteError) as info:
        Suite.from_yaml(path, registry=registry)
    message = str(info.value)
    assert "\n" not in message, "suite errors must be one line"
    assert str(path) in message, "suite errors must name the file"
    return message


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_shipped_suite_parses(path):
    suite = Suite.from_yaml(path, kinds=SUITE_KINDS)
    assert suite.name == path.stem
    registry = UNIVERSAL_ATTACKS if suite.kind == "universal" else ATTACKS
    assert suite.attacks and all(spec.attack in registry for spec in suite.attacks)
    assert list(suite.configurations())


def test_universal_suites_are_refused_by_ranking_runners(tmp_path):
    text = "kind: universal\nattacks: [{attack: I-CA+, epsilons: [0.3], w: 1, epochs: 2}]\n"
    path = write(tmp_path, text)
    message = error_of(path, registry=None)
    assert "a universal suite cannot run here" in message and "eval.py" in message
    suite = Suite.from_yaml(path, kinds=SUITE_KINDS)
    assert suite.kind == "universal" and suite.num_samples == -1 and suite.fit_size(10_000) == 500
    assert suite.to_dict()["kind"] == "universal" and "kind" not in Suite.from_yaml(SUITES[0]).to_dict()
    # universal entries take the schedule keys, not the PGD ones
    bad = write(tmp_path, "kind: universal\nattacks: [{attack: I-CA+, epsilons: [0.3], steps: 3}]\n", "b.yaml")
    with pytest.raises(SuiteError, match="unknown key 'steps'.*allowed keys: attack, epochs, epsilons"):
        Suite.from_yaml(bad, kinds=SUITE_KINDS)
    with pytest.raises(SuiteError, match=r"unknown attack 'CA\+' \(did you mean 'I-CA\+'\?\)"):
        Suite.from_yaml(write(tmp_path, "kind: universal\nattacks: [{attack: CA+, epsilons: [0.3]}]\n", "c.yaml"),
                        kinds=SUITE_KINDS)
    with pytest.raises(SuiteError, match="disjoint unseen set"):
        Suite.from_yaml(path, kinds=SUITE_KINDS).with_overrides(num_samples=6).check_gallery(10)
    with pytest.raises(SuiteError, match="resize_range must be"):
        Suite.from_yaml(write(tmp_path, "kind: universal\nattacks: [{attack: 'UAP-IR:list', epsilons: [0.1], "
                                        "resize_range: [2, 1]}]\n", "d.yaml"), kinds=SUITE_KINDS)


def test_eccv_suite_is_the_paper_protocol():
    suite = Suite.from_yaml(REPO / "configs/suites/eccv2020_28x28.yaml")
    assert suite.num_samples == 1000 and suite.seed == 0
    for spec in suite.attacks:
        assert spec.epsilons == (0.01, 0.03, 0.1, 0.3)
        assert spec.sizes == ((1, 2, 5, 10) if spec.attack != "ES" else ())
        assert "alpha" not in spec.options and "steps" not in spec.options  # the ECCV step rules
    xi = {spec.attack: spec.options.get("xi") for spec in suite.attacks}
    assert xi["QA+"] == 1 and xi["QA-"] == 100
    assert len(list(suite.configurations())) == 4 * 4 * 4 + 4


def test_defense_check_suite_is_a_subset_of_the_eccv_suite_at_t250():
    """Its cells must be the full suite's (same samples, attack settings) to be read beside it."""
    full = Suite.from_yaml(REPO / "configs/suites/eccv2020_28x28.yaml").with_overrides(num_samples=250)
    check = Suite.from_yaml(REPO / "configs/suites/eccv2020_28x28_defense_check.yaml")
    assert (check.num_samples, check.seed, check.batch_size) == (full.num_samples, full.seed, full.batch_size)

    def cells(suite):
        return {(c.attack, c.eps, c.size): dict(c.options) for c in suite.configurations()}

    full_cells, check_cells = cells(full), cells(check)
    assert set(check_cells) == {(a, eps, 1) for a in ("CA+", "CA-", "QA+") for eps in (0.1, 0.3)}
    for key, options in check_cells.items():
        assert options == full_cells[key], key


def test_robrank_profile_budget():
    suite = Suite.from_yaml(REPO / "configs/suites/robrank_profile.yaml")
    for spec in suite.attacks:
        assert spec.epsilons == (pytest.approx(77 / 255),)
        assert spec.options["alpha"] == pytest.approx(3 / 255) and spec.options["steps"] == 32
        assert spec.sizes in ((1,), ())


def test_roundtrip_to_dict(tmp_path):
    suite = Suite.from_yaml(REPO / "configs/suites/quick.yaml")
    again = Suite.from_dict(suite.to_dict(), source="copy")
    assert again.to_dict() == suite.to_dict()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("attacks: [{attack: CA+, epsilon: [0.1]}]", "unknown key 'epsilon' (did you mean 'epsilons'?)"),
        ("attacks: [{attack: CA+, epsilons: [0.1], W: [1]}]", "unknown key 'W' (did you mean 'w'?)"),
        ("attacks: [{attack: QA+, epsilons: [0.1], w: [1]}]", "unknown key 'w'"),
        ("num_sample: 10\nattacks: [{attack: ES, epsilons: [0.1]}]", "unknown key 'num_sample' (did you mean 'num_samples'?)"),
        ("attacks: [{attack: CA, epsilons: [0.1]}]", "unknown attack 'CA'"),
        ("attacks: [{attack: XX, epsilons: [0.1]}]", "known attacks: CA+, CA-, QA+, QA-, ES"),
        ("attacks: [{attack: CA+, epsilons: [1.5]}]", "outside [0, 1]"),
        ("attacks: [{attack: CA+, epsilons: [-0.1]}]", "outside [0, 1]"),
        ("attacks: [{attack: CA+, epsilons: [0.1], w: [0]}]", "w must be integers >= 1"),
        ("attacks: [{attack: QA-, epsilons: [0.1], m: [2, -1]}]", "m must be integers >= 1"),
        ("attacks: [{attack: CA+, epsilons: [0.1, 0.1]}]", "duplicates"),
        ("attacks: [{attack: CA+}]", "missing key 'epsilons'"),
        ("attacks: [{epsilons: [0.1]}]", "missing key 'attack'"),
        ("attacks: []", "attacks must be a non-empty list"),
        ("num_samples: 0\nattacks: [{attack: ES, epsilons: [0.1]}]", "num_samples must be an integer >= 1 or -1"),
        ("batch_size: 0\nattacks: [{attack: ES, epsilons: [0.1]}]", "batch_size must be an integer >= 1"),
        ("attacks: [{attack: ES, epsilons: [0.1], alpha: -1}]", "alpha must be a finite number > 0"),
        ("attacks: [{attack: ES, epsilons: [0.1], steps: 0}]", "steps must be an integer >= 1"),
        ("attacks: [{attack: QA+, epsilons: [0.1], percent: 0}]", "percent must be in (0, 100]"),
        ("attacks: [{attack: CA+, epsilons: [0.1]]", "not valid YAML"),
        ("- just a list", "a suite must be a mapping"),
    ],
)
def test_bad_suites_give_one_line_errors(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_unknown_key_lists_the_allowed_keys(tmp_path):
    message = error_of(write(tmp_path, "attacks: [{attack: QA-, epsilons: [0.1], zi: 10}]"))
    assert "attacks[0] (QA-)" in message
    assert "allowed keys: G, alpha, attack, epsilons, m, percent, random_start, reduction, steps, xi" in message


def test_missing_file():
    with pytest.raises(SuiteError, match="does not exist"):
        Suite.from_yaml("no/such/suite.yaml")


def test_w_or_m_larger_than_the_gallery(tmp_path):
    suite = Suite.from_yaml(write(tmp_path, "attacks: [{attack: CA+, epsilons: [0.1], w: [1, 10]}]"))
    suite.check_gallery(11)  # 10 queries besides the candidate
    with pytest.raises(SuiteError, match=r"w=10 needs a gallery of more than 10 items, but the gallery has 10"):
        suite.check_gallery(10)
    qa = Suite.from_yaml(write(tmp_path, "attacks: [{attack: QA+, epsilons: [0.1], m: [5], G: 5}]", "qa.yaml"))
    qa.check_gallery(11)
    with pytest.raises(SuiteError, match=r"m=5 plus G=5 semantics-preserving candidates"):
        qa.check_gallery(10)


def test_defaults_and_overrides(tmp_path):
    suite = Suite.from_yaml(write(tmp_path, "attacks: [{attack: CA-, epsilons: 0.1}]", "mine.yaml"))
    assert suite.name == "mine" and suite.num_samples == 1000 and suite.batch_size == 250 and suite.seed == 0
    assert suite.attacks[0].sizes == (1,) and suite.attacks[0].epsilons == (0.1,)
    assert suite.num_attacked(50) == 50 and suite.with_overrides(num_samples=-1).num_attacked(50) == 50
    assert suite.with_overrides(num_samples=7, batch_size=3).num_attacked(50) == 7
    with pytest.raises(SuiteError, match="num_samples"):
        suite.with_overrides(num_samples=0)


def test_registry_extension_declares_keys_and_needs(tmp_path):
    registry = AttackRegistry(list(ATTACKS))
    registry.register("PQ-dummy", lambda eps, size, seed, **o: MaxShiftAttack(eps, seed=seed, **o),
                      needs={"codebooks"}, options={"bits"}, metric="shift")
    path = write(tmp_path, "attacks: [{attack: PQ-dummy, epsilons: [0.1], bits: 8}]")
    with pytest.raises(SuiteError, match="unknown attack 'PQ-dummy'"):
        Suite.from_yaml(path)  # not in the default registry
    # 'bits' is accepted by the entry but not by the attack: the build check reports it now.
    with pytest.raises(SuiteError, match="attacks\\[0\\] \\(PQ-dummy\\): .*bits"):
        Suite.from_yaml(path, registry=registry)
    suite = Suite.from_dict({"attacks": [{"attack": "PQ-dummy", "epsilons": [0.1]}]}, registry=registry)
    assert registry.get("PQ-dummy").needs == frozenset({"codebooks"}) and suite.attacks[0].attack == "PQ-dummy"
    with pytest.raises(ValueError, match="already registered"):
        registry.register("CA+", lambda **kw: None)
