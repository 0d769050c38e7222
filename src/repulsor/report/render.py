"""Blocks to pages: a self-contained HTML file (figures as data URIs) and Markdown."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .blocks import Details, Figure, Heading, Para, Table, inline_html


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1120px;margin:1.5em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45;background:#fff}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #bbb;margin-top:2em;padding-bottom:.15em}
h3{margin-top:1.5em}h4{margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #c8c8c8;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold;background:#f6f6f6}
tr.warn td{background:#fde0e0;color:#9b0000;font-weight:bold}
p.warn{background:#fde0e0;color:#9b0000;border-left:5px solid #c00;padding:.5em .8em;font-weight:bold}
p.note{color:#555;font-style:italic}
figure{margin:1em 0 1.6em;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{font-size:.88em;color:#333;max-width:760px}
details{margin:.5em 0 1em}summary{cursor:pointer;font-weight:bold}
caption{text-align:left;caption-side:top;font-size:.88em;color:#333;padding:.2em 0}
pre{background:#f6f8fa;padding:.7em;overflow:auto;font-size:.85em;border:1px solid #e1e4e8}
code{background:#f3f3f3;padding:0 .2em}nav ul{columns:2}
"""


# Not needed to read the report: records for automated checks how many figures decoded.
IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } }
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
</script>"""


def _is_number(text: str) -> bool:
    # a number, optionally with a unit, or an accuracy with its interval: "84.0 [75.6, 89.9]"
    return bool(re.fullmatch(r"[-+]?[0-9.,]+\s*(%|s|min)?(\s*\[[0-9.]+,\s*[0-9.]+\])?", str(text).strip()))


def render_html(title: str, blocks: list) -> str:
    """A self-contained HTML page: figures as data URIs, inline CSS, no external resources."""
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 2 and b.anchor]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if len(toc) > 1:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{b.anchor}">{inline_html(b.text)}</a></li>' for b in toc)
                     + "</ul></nav>")
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
            parts.append(f"<h{block.level}{anchor}>{inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="warn"' if block.warn else ' class="note"' if block.note else ""
            parts.append(f"<p{cls}>{inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            rows = []
            if block.caption:
                rows.append(f"<caption>{inline_html(block.caption)}</caption>")
            rows.append("<thead><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in block.header) + "</tr></thead><tbody>")
            for i, row in enumerate(block.rows):
                cls = block.row_classes[i] if i < len(block.row_classes) else ""
                cells = "".join(f'<td class="num">{inline_html(c)}</td>' if _is_number(c) else f"<td>{inline_html(c)}</td>"
                                for c in row)
                rows.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
            parts.append("<table>" + "".join(rows) + "</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            alt = html.escape(re.sub(r"[*`]", "", block.caption.split(".")[0]), quote=True)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                         f"<figcaption>{inline_html(block.caption)}</figcaption></figure>")
        elif isinstance(block, Details):
            parts.append(f"<details><summary>{inline_html(block.summary)}</summary>"
                         f"<pre>{html.escape(block.text)}</pre></details>")
    parts += [IMAGE_CHECK_SCRIPT, "</body></html>", ""]
    return "\n".join(parts)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list, out: Path) -> str:
    """The report as Markdown; figures are linked relative to ``out``."""
    parts = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            parts += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Para):
            if block.warn:
                parts += [f"> **WARNING** {block.text}", ""]
            elif block.note:
                parts += [f"_{block.text}_", ""]
            else:
                parts += [block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                parts += [block.caption, ""]
            parts.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            parts.append("|" + "|".join("---" for _ in block.header) + "|")
            for i, row in enumerate(block.rows):
                cls = block.row_classes[i] if i < len(block.row_classes) else ""
                cells = [_md_cell(c) for c in row]
                if cls == "warn":
                    cells = [f"**{c}**" if c else c for c in cells]
                    cells[0] = "⚠ " + cells[0]
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
        elif isinstance(block, Figure):
            rel = block.path.relative_to(out).as_posix()
            alt = re.sub(r"[*`\[\]]", "", block.caption.split(".")[0])
            parts += [f"![{alt}]({rel})", "", f"_{block.caption}_" if "_" not in block.caption else block.caption, ""]
        elif isinstance(block, Details):
            parts += [f"<details><summary>{html.escape(block.summary)}</summary>", "", f"```{block.lang}",
                      block.text.rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(parts)
