"""Every committed result names code that can be checked out, or is listed in results/PROVENANCE.md;
and a record made from uncommitted code says so (issue 27)."""

import json
import re
from pathlib import Path

import pytest

from repulsor import runtime
from repulsor.store import run as store

ROOT = Path(__file__).resolve().parents[1]


def _versions(obj, found: set) -> set:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "code_version" and isinstance(value, str):
                found.add(value)
            else:
                _versions(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _versions(value, found)
    return found


def test_every_dirty_version_under_results_is_listed_with_its_change():
    listed = set(re.findall(r"`([^`]+\.dirty)`", (ROOT / "results" / "PROVENANCE.md").read_text()))
    unlisted = {}
    for path in sorted((ROOT / "results").rglob("*.json")):
        if path.name not in ("results.json", "training.json", "comparison.json", "ablation.json"):
            continue
        for version in _versions(json.loads(path.read_text()), set()):
            if version.endswith(".dirty") and version not in listed:
                unlisted.setdefault(version, []).append(str(path.relative_to(ROOT)))
    assert not unlisted, f"dirty code versions not in results/PROVENANCE.md: {unlisted}"


def test_a_record_from_uncommitted_code_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store, "provenance", lambda: {"code_version": "9.9.9+gabc1234.dirty", "code_diff": "d1ff"})
    store.record_suite(tmp_path, "quick", {"attacks": [], "robust_accuracy": 0.0}, {"n": 1})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["code_diff"] == "d1ff" and results["suites"]["quick"]["code_diff"] == "d1ff"
    assert "WARN suite quick: produced from uncommitted changes (9.9.9+gabc1234.dirty, diff d1ff)" \
        in (tmp_path / "log.txt").read_text()
    assert "produced from uncommitted changes" in capsys.readouterr().err
    monkeypatch.setattr(store, "provenance", lambda: {"code_version": "9.9.9+gabc1234"})
    store.record_suite(tmp_path, "paper", {"attacks": [], "robust_accuracy": 0.0}, {"n": 1})
    results = json.loads((tmp_path / "results.json").read_text())
    assert "code_diff" not in results and "code_diff" not in results["suites"]["paper"]


@pytest.mark.parametrize("record, expected", [
    ({"code_version": "0.6.0+gabc"}, None),
    ({"code_version": "0.6.0+gabc.dirty", "code_diff": "12"}, "produced from uncommitted changes (0.6.0+gabc.dirty, diff 12)"),
    ({"code_version": "0.5.0+gabc.dirty"}, "produced from uncommitted changes (0.5.0+gabc.dirty)"),
    ({}, None),
])
def test_the_warning_names_the_version_and_the_diff(record, expected):
    assert runtime.provenance_warning(record) == expected


def test_the_code_version_of_this_checkout_is_well_formed():
    version = runtime.code_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+g[0-9a-f]+(\.dirty)?)?", version), version
    made = runtime.provenance()
    assert ("code_diff" in made) == version.endswith(".dirty")


def test_wilson_interval_against_values_computed_by_hand():
    from repulsor.formats import accuracy_with_interval, wilson_interval

    low, high = wilson_interval(0, 500)  # 0/n: the upper end is z^2 / (n + z^2)
    assert low == 0 and high == pytest.approx(1.959964 ** 2 / (500 + 1.959964 ** 2), rel=1e-6)
    low, high = wilson_interval(500, 500)  # n/n: the mirror image
    assert high == 1 and low == pytest.approx(500 / (500 + 1.959964 ** 2), rel=1e-6)
    # 84 of 100: centre (0.84 + z^2/200) / (1 + z^2/100) = 0.827422, half width 0.071625
    assert wilson_interval(84, 100) == pytest.approx((0.755797, 0.899047), abs=1e-5)
    # small n: 1 of 3: centre (1/3 + z^2/6) / (1 + z^2/3) = 0.426916, half width 0.365424
    assert wilson_interval(1, 3) == pytest.approx((0.061492, 0.792340), abs=1e-5)
    assert accuracy_with_interval(0.84, 100) == "84.0 [75.6, 89.9]"
    assert accuracy_with_interval(0.0, 500) == "0.0 [0.0, 0.8]"
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_every_recorded_accuracy_sits_beside_its_interval(tmp_path):
    result = {"n": 500, "clean_accuracy": 0.9, "robust_accuracy": 0.0,
              "attacks": [{"name": "apgd-ce", "n": 500, "accuracy": 0.0}]}
    merged = store.record_suite(tmp_path, "standard", result, {"n": 500, "clean_accuracy": 0.9})
    suite = merged["suites"]["standard"]
    assert suite["robust_accuracy"] == 0.0 and suite["robust_accuracy_ci95"] == [0.0, pytest.approx(0.0076243, abs=2e-6)]
    assert suite["attacks"][0]["accuracy_ci95"][1] == pytest.approx(0.0076243, abs=2e-6)
    assert merged["clean_accuracy"] == 0.9 and len(merged["clean_accuracy_ci95"]) == 2
    old = store.with_intervals({"accuracy": 0.5}, None)
    assert old == {"accuracy": 0.5}  # no n, no interval: older records are shown without one


def test_paired_counts_and_the_exact_mcnemar_test_against_hand_values():
    from repulsor.paired import discordant, mcnemar_exact, paired_sentence

    assert discordant([0, 1, 2, 5], [1, 2, 3], n=5) == (1, 1)  # index 5 lies outside the first 5 points
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact(5, 5) == 1.0
    text = paired_sentence("pgd-20", [0, 1, 2, 3, 4, 5], "standard", [0], 10)
    assert "0 survive standard but not pgd-20 and 5 the other way round" in text and "p = 0.0625" in text
