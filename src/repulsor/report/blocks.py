"""A report as a list of blocks: headings, paragraphs, tables, figures and folded text.

Text in blocks is "inline Markdown lite": **bold**, `code` and [links](url) are rendered in
HTML, the rest is escaped; the Markdown output keeps it as it is.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


def format_accuracy(value) -> str:
    """An accuracy in [0, 1] as the report prints it: ``97.78%`` (a dash when missing)."""
    if value is None:
        return "–"
    return f"{100 * float(value):.2f}%"


def fmt_seconds(seconds) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str
    warn: bool = False
    note: bool = False


@dataclass
class Table:
    header: list
    rows: list
    row_classes: list = field(default_factory=list)  # "" | "warn" | "total", one per row
    caption: str = ""


@dataclass
class Figure:
    path: Path  # a PNG inside the output folder
    caption: str


@dataclass
class Details:
    summary: str
    text: str
    lang: str = ""


def inline_html(text: str) -> str:
    escaped = html.escape(str(text))
    escaped = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


GUIDE = Path(__file__).resolve().parents[3] / "docs" / "reading-the-report.md"


def guide_link(out: Path) -> str:
    """A Markdown link from the report folder to the reading guide (plain text where it is not installed)."""
    if not GUIDE.is_file():
        return "`docs/reading-the-report.md` in the repulsor repository"
    return f"[docs/reading-the-report.md]({os.path.relpath(GUIDE, out.resolve())})"
