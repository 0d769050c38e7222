"""The state one report's sections share while it is built."""

from __future__ import annotations

import re
from pathlib import Path

from ..evaluation import run as evaluation_run
from ..runtime import resolve_device


class ReportContext:
    """What every section of one report shares: the output folder, the settings of the command,
    the test points (loaded once per data set), the overview rows and the section names."""

    def __init__(self, out: Path, *, n: int | None, data_dir, device, quiet: bool, neighbours: bool,
                 overrides: list[str] = ()):
        self.out = out
        self.n = n  # None: each run's eval.n
        self.overrides = list(overrides)  # eval.* and data folders, for every run of the report
        self.data_dir = data_dir
        self.device = resolve_device(device)
        self.quiet = quiet
        self.neighbours = neighbours
        self.slugs: set[str] = set()
        self.timings: dict[str, float] = {}
        self.overview: list[list[str]] = []
        self.overview_classes: list[str] = []
        self._test: dict = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[report] {text}", flush=True)

    def slug(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
        slug, i = base, 2
        while slug in self.slugs:
            slug, i = f"{base}-{i}", i + 1
        self.slugs.add(slug)
        return slug

    def test_split(self, cfg, n: int):
        """The first n test points of the run's data set (cached across runs)."""
        key = (cfg.data.name, self.data_dir or cfg.data.test_dir or cfg.data.data_dir, cfg.data.split_seed)
        if key not in self._test:
            self._test[key] = evaluation_run.load_test_split(cfg, None, self.data_dir)[:2]
        x, y = self._test[key]
        return evaluation_run.first_points(x, y, n, cfg.data.name, say=lambda text: self.say(f"note: {text}"))
