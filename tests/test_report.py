"""Tests of repulsor.report: report.html rendered in headless Chromium, report.md, compare folders.

The browser test opens the self-contained page with ``chromium --headless``: a screenshot
must not be blank (and must show the red WARN row), and ``--dump-dom`` after the page's load
event must record that every embedded figure decoded (``data-images-loaded="k/k"``) and hold
the run's numbers in its tables. It skips only when no chromium binary is installed
(CI installs Debian's ``chromium``).
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from repulsor import analyses
from repulsor.plots.curves import plot_robustness_curves
from repulsor import cli
from repulsor.compare.run import compare
from repulsor.compare.tables import fmt_pct
from repulsor.config import from_dict
from repulsor.errors import UserError
from repulsor.report.blocks import Heading, Para, Table, format_accuracy
from repulsor.report.build import build_report
from repulsor.report.render import render_html
from repulsor.report.run_section import suite_blocks
from repulsor.training.loop import train

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "width": 0.25}, "prototypes": {"dim": 16, "epochs": 20},
        "train": {"method": "prototype", "epochs": 2, "batch_size": 64, "lr": 0.05, "precision": "fp32", "eps": 0.1,
                  "alpha": 0.025, "val_n": 100, "attack_steps": 2, "val_attack_steps": 2},
        "eval": {"n": 100, "eps": 0.1}}

WARN_MESSAGE = "PGD's mean loss fell over its iterations (injected by the test)"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_args(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            "--mute-audio", f"--user-data-dir={profile}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny prototype run, copied with a failing sanity verdict and a precomputed analysis figure."""
    root = tmp_path_factory.mktemp("report-runs")
    original = train(from_dict(TINY), root / "tiny", quiet=True)
    copy = root / "tiny-warn"
    shutil.copytree(original, copy)
    results = json.loads((copy / "results.json").read_text())
    results["suites"]["quick"]["sanity"] = [
        {"name": "loss_rises", "ok": False, "message": WARN_MESSAGE, "value": -0.5},
        {"name": "deterministic", "ok": True, "message": "two forward passes agree", "value": 0.0},
    ]
    (copy / "results.json").write_text(json.dumps(results))
    # A figure "written before by the analysis": the report must reuse it, not recompute it.
    written = plot_robustness_curves({"precomputed": [{"eps": 0.1, "accuracy": 0.5}, {"eps": 0.2, "accuracy": 0.1}]},
                                              copy / "analysis" / "robustness_curve.png")
    return {"run": original, "warn_run": copy, "results": results, "analysis_png": Path(written["png"])}


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        def no_curve(*args, **kwargs):
            raise AssertionError("the robustness curve must come from RUN/analysis")

        mp.setattr(analyses, "robustness_curve", no_curve)
        result = build_report([run["warn_run"]], out, n=100)
    return {"out": out, **result}


def test_report_is_self_contained_and_complete(report, run):
    page = (report["out"] / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) >= 8  # training, validation, curve, confusion, prototypes x2, adversarial, neighbours
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:|//|file:)", page) and "<link" not in page and "@import" not in page
    assert "<details><summary>Resolved config" in page and "[train]" in page
    results = run["results"]
    assert results["code_version"] in page
    assert "Protocol: data set <strong>digits</strong>, test split, first n = 100" in page
    for word in ("eps = 0.1,", "seed 0", "fp32"):
        assert word in page
    assert re.search(r'<tr class="warn">.*WARN.*' + re.escape("loss_rises"), page)
    assert "tr.warn td{background:#fde0e0;color:#9b0000" in page
    # The Markdown twin links PNG files that exist beside it.
    md = (report["out"] / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(sources)
    assert all((report["out"] / link).is_file() and link.endswith(".png") for link in links)
    assert "⚠ **WARN**" in md and "```toml" in md and format_accuracy(results["clean_accuracy"]) in md
    assert report["seconds"] < 60


def test_report_reuses_analysis_files(report, run):
    copied = report["out"] / "figures" / "tiny-warn" / "robustness_curve.png"
    assert copied.read_bytes() == run["analysis_png"].read_bytes()


def test_report_renders_in_chromium(report, run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (CI installs Debian's chromium: apt-get install -y chromium)")
    page = report["out"] / "report.html"
    n_images = len(re.findall(r"<img\s", page.read_text()))
    dom = subprocess.run(_chromium_args(binary, tmp_path / "profile-dom") + ["--virtual-time-budget=5000",
                                                                             "--dump-dom", page.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run: " + dom[:300]
    assert int(loaded.group(2)) == n_images and int(loaded.group(1)) == n_images, loaded.group(0)
    # The tables hold the run's numbers as the page formats them.
    results = run["results"]
    quick = results["suites"]["quick"]
    cell = '<td class="num">{}</td>'
    assert cell.format(format_accuracy(results["clean_accuracy"])) in dom
    for entry in quick["attacks"]:
        assert cell.format(format_accuracy(entry["accuracy"])) in dom
    assert cell.format(format_accuracy(quick["robust_accuracy"])) in dom
    assert WARN_MESSAGE in dom
    # The screenshot is not blank, and the red WARN row of the overview is in plain sight.
    shot = tmp_path / "shot.png"
    subprocess.run(_chromium_args(binary, tmp_path / "profile-shot") + ["--window-size=1200,1400",
                                                                        f"--screenshot={shot}", page.as_uri()],
                   check=False, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32).reshape(-1, 3))
    assert pixels.std(0).max() > 20, "the screenshot is a single colour"
    assert len(torch.unique(pixels, dim=0)) > 50
    warn_bg = torch.tensor([0xFD, 0xE0, 0xE0], dtype=torch.float32)
    assert ((pixels - warn_bg).abs().max(1).values <= 6).sum() > 500, "no red WARN row visible"


def test_compare_report(tmp_path, capsys):
    cfg = {"compare": {"methods": ["ce", "prototype"], "suites": ["quick"], "curve_n": 50,
                       "curve_eps": [0.05, 0.1, 0.15], "transfer": False}, **{k: v for k, v in TINY.items()}}
    cfg["train"] = {k: v for k, v in TINY["train"].items() if k != "method"}
    compare(cfg, tmp_path / "cmp", quiet=True)
    assert cli.main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "rep"), "--n", "100", "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "rep" / "report.html").read_text()
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "Tables 2-3: methods on digits" in page
    assert "cmp / method run <code>ce</code>" in page and "cmp / method run <code>prototype</code>" in page
    for name in ("ce", "prototype"):  # the rows of tables.md, as compare formats them
        run = comparison["runs"][name]
        n = comparison["protocol"]["suite_n"]["quick"]  # each accuracy with its 95% interval
        assert f'<td class="num">{fmt_pct(run["clean_accuracy"], n)}</td>' in page
        assert f'<td class="num">{fmt_pct(run["pgd20_ce"], n)}</td>' in page
    figures = tmp_path / "rep" / "figures"
    assert (figures / "compare-cmp" / "robustness_curves.png").is_file()
    assert (figures / "compare-cmp" / "epochs.png").is_file()
    assert (figures / "cmp-prototype" / "embedding_pca.png").is_file()
    assert not (figures / "cmp-ce" / "embedding_pca.png").exists()  # linear head: no prototypes
    binary = _chromium()
    if binary is not None:
        dom = subprocess.run(_chromium_args(binary, tmp_path / "profile") + ["--virtual-time-budget=5000",
                                                                             "--dump-dom",
                                                                             (tmp_path / "rep" / "report.html").as_uri()],
                             check=False, capture_output=True, text=True, timeout=120).stdout
        k, total = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom).groups()
        assert k == total and int(total) >= 6


def test_report_user_errors(run, tmp_path, capsys):
    with pytest.raises(UserError, match="not a folder"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(UserError, match="folder being reported on"):
        build_report([run["run"]], run["run"])
    assert cli.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repulsor: error:") and len(err.strip().splitlines()) == 1


def test_tables_and_escaping():
    blocks = [Heading(3, "Table 1"), Table(["a", "b"], [["1", "<x>"]]), Para("Protocol: **n** = 5.")]
    page = render_html("t", blocks + [Table(["h"], [["<script>alert(1)</script>"]], ["warn"])])
    assert "&lt;x&gt;" in page and "<strong>n</strong>" in page and "<script>alert" not in page


def test_overview_headlines_the_largest_sample_and_names_every_n():
    from repulsor.formats import format_eps
    from repulsor.report.run_section import overview_accuracies

    results = {"suites": {"standard": {"n": 200, "clean_accuracy": 1.0, "robust_accuracy": 0.5},
                          "quick": {"n": 10000, "clean_accuracy": 0.987, "robust_accuracy": 0.9}}}
    clean, worst = overview_accuracies(results)
    assert clean == "98.70% (n=10000)"
    assert worst == "quick: 90.00% (n=10000), standard: 50.00% (n=200)"
    assert overview_accuracies(None) == ("–", "–")
    # eps in grey levels only where it is a whole number of them (MNIST's 0.3 is not 76.5/255).
    assert format_eps(8 / 255, "linf") == "0.03137 (8/255)"
    assert format_eps(0.3, "linf") == "0.3" and format_eps(0.5, "l2") == "0.5"


def test_one_epoch_training_plot_has_whole_epoch_and_rate_axes(tmp_path):
    import matplotlib.image as mpimg

    from repulsor.plots.curves import plot_training_curves

    record = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.9, "lr": 1e-11}
    png = plot_training_curves([record], tmp_path / "training.png", peak_lr=0.05)["png"]
    assert mpimg.imread(png).shape[0] > 100  # written and readable


def test_guide_is_a_link_relative_to_the_report(tmp_path):
    from repulsor.report.blocks import GUIDE, guide_link, inline_html

    link = guide_link(tmp_path / "report")
    if GUIDE.is_file():
        html = inline_html(link)
        target = re.search(r'href="([^"]+)"', html).group(1)
        assert (tmp_path / "report" / target).resolve() == GUIDE
    else:
        assert "docs/reading-the-report.md" in link


def test_not_applicable_attacks_and_randomised_models_are_shown_plainly():
    entry = {"name": "apgd-ce", "attack": "apgd", "loss": "ce", "steps": 100, "restarts": 1, "n_attacked": 0,
             "accuracy": 0.9, "seconds": 0.0, "status": "not applicable", "reason": "no input gradient"}
    square = dict(entry, name="square", attack="square", loss="", steps=5000, n_attacked=90, accuracy=0.4,
                  seconds=3.0, status="done")
    res = {"suite": "standard", "n": 100, "norm": "linf", "eps": 0.1, "seed": 0, "clean_accuracy": 0.9,
           "robust_accuracy": 0.4, "votes": 10, "randomised": True, "attacks": [entry, square],
           "sanity": [{"name": "shattered_gradients", "ok": False, "value": 1.0,
                       "message": "shattered gradients: ... wrap the non-differentiable step with repulsor.bpda(...)"}]}
    blocks = suite_blocks("standard", res, {"dataset": "digits", "split": "test"})
    page = render_html("t", blocks)
    assert "apgd-ce: not applicable (no input gradient)" in page
    assert "Not applicable to this model, so not run: apgd-ce (no input gradient)" in page
    assert "all 10 forward passes classify it correctly" in page
    assert "repulsor.bpda" in page
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.row_classes[1] == "warn" and table.rows[1][6] == "–"  # no accuracy claimed for it
    assert table.rows[2][6] != "–"


def test_report_re_renders_from_its_figure_data_without_the_model(run, tmp_path, monkeypatch):
    from repulsor.evaluation import run as evaluation_run
    from repulsor.store import run as store

    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    out = tmp_path / "out"
    build_report([copy], out, n=50, neighbours=False)
    first = (out / "report.md").read_text()
    assert len(list((out / "figures").rglob("figures.safetensors"))) == 1

    # No model and no test data: the sections are drawn from the files alone.
    (copy / "model.safetensors").unlink()

    def refused(*args, **kwargs):
        raise AssertionError("the report loaded the model or the data to re-render")

    monkeypatch.setattr(store, "load_model", refused)
    monkeypatch.setattr(evaluation_run, "load_test_split", refused)
    build_report([copy], out, n=50, neighbours=False)
    second = (out / "report.md").read_text()
    assert "the model was not loaded" in second and "Figures skipped" not in second
    images = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")
    assert images.findall(second) == images.findall(first)
    numbers = re.compile(r"clean [0-9.]+%, PGD-20 [0-9.]+% on these points")
    assert numbers.findall(second) == numbers.findall(first) != []

    # Another protocol (other points) is never drawn from the data of the first.
    monkeypatch.undo()
    build_report([copy], out, n=40, neighbours=False)
    assert "Figures skipped" in (out / "report.md").read_text()
    # Nor under another batch size (the attack's seeds derive from the batch) or other test data.
    for override in ("eval.batch_size=7", f"data.test_dir={tmp_path}"):
        build_report([copy], out, n=50, neighbours=False, overrides=[override])
        assert "Figures skipped" in (out / "report.md").read_text(), override
