"""The README's main job: the weak and the strong number side by side, and safe to run twice."""

import pytest

from repulsor import cli
from repulsor.config import to_dict
from repulsor.demo import DEMO_SUITES, demo_config, run_demo
from repulsor.errors import UserError
from repulsor.training.folder import run_status

# A short demo: two epochs, and an eps at which APGD-CE fools every point, so that the cascade's
# later attacks (Square's 5000 queries) have nothing left to attack.
SHORT = ["train.epochs=2", "eval.n=40", "eval.eps=0.3", "train.val_n=50"]


@pytest.mark.slow
def test_demo_shows_both_suites_and_a_second_run_reuses_the_first(tmp_path, capsys):
    out = tmp_path / "demo"
    first = run_demo(out, overrides=SHORT, quiet=True)
    assert first["status"] == "trained" and run_status(out) == "finished"
    suites = first["results"]["suites"]
    assert set(DEMO_SUITES) <= set(suites)
    # The same points for both suites, each with its own record.
    assert suites["quick"]["n"] == suites["standard"]["n"] == 40
    assert suites["quick"]["clean_accuracy"] == suites["standard"]["clean_accuracy"]
    text = first["text"]
    assert "quick (pgd-20)" in text and "standard (apgd-ce, apgd-t, fab-t, square)" in text
    assert f"{100 * suites['standard']['robust_accuracy']:5.1f}%" in text
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    # Again, through the command line exactly as the README runs it: nothing is retrained.
    argv = ["demo", "--out", str(out), "--quiet"] + [f"--set={o}" for o in SHORT]
    assert cli.main(argv) == 0
    assert "quick (pgd-20)" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert run_demo(out, overrides=SHORT, quiet=True)["status"] == "reused"


@pytest.mark.slow
def test_an_interrupted_demo_continues(tmp_path):
    out = tmp_path / "demo"
    # A demo stopped after training, before its evaluations: the next run evaluates only.
    from repulsor.training.loop import train

    train(demo_config(SHORT), out, quiet=True)
    assert not (out / "results.json").exists()
    result = run_demo(out, overrides=SHORT, quiet=True)
    assert result["status"] == "reused" and set(DEMO_SUITES) <= set(result["results"]["suites"])


def test_demo_refuses_a_folder_holding_another_run(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    other = demo_config(["train.epochs=3"])
    (out / "config.toml").write_text(__import__("tomli_w").dumps(to_dict(other)))
    with pytest.raises(UserError, match="holds another run than this demo"):
        run_demo(out, overrides=SHORT, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.toml"]


def test_demo_config_takes_overrides():
    cfg = demo_config(["eval.n=12", "train.device=cpu"])
    assert cfg.eval.n == 12 and cfg.train.device == "cpu" and cfg.train.method == "prototype"
    assert not cfg.eval.after_train  # the demo runs its two suites itself


@pytest.mark.slow
def test_demo_written_to_a_log_has_no_progress_bar_frames(tmp_path):
    """Redirected to a file (CI, nohup, SLURM), the README's main job writes lines, not a bar's
    carriage-return redraws: one line per epoch and per attack, and the summary."""
    import subprocess
    import sys

    log = tmp_path / "demo.log"
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "repulsor", "demo", "--out", str(tmp_path / "demo")],
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) < 100, len(lines)
    assert any(line.startswith("epoch=") or " epoch=" in line for line in lines)  # the epoch lines stay
    assert any("apgd-ce: accuracy after" in line for line in lines)  # and one line per attack
