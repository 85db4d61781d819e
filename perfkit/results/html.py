"""A device page as one self-contained HTML file: the README's markdown as HTML, its tables sortable by a click,
its plots embedded, so the one file can be mailed or archived.

Only the markdown the report writes is understood (headings, paragraphs, lists, tables, inline code, bold,
emphasis, links and PNG images): this is the report's own view, not a markdown renderer.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from string import Template

HTML_SCRIPT = r"""
function cellValue(td) {
  const text = td.textContent.trim();
  const number = text.match(/^(reference|no difference \()?\s*([-+]?[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?)/i);
  if (text.startsWith("reference")) return 1.0;
  return number && number[2] !== undefined ? parseFloat(number[2]) : text.toLowerCase();
}
function sortTable(table, column, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a.cells[column]), y = cellValue(b.cells[column]);
    // Numbers before text ("—", statuses) whichever the direction, so cells without a value stay last.
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
    const order = x < y ? -1 : x > y ? 1 : 0;
    return descending ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
  table.dataset.sortedBy = column + (descending ? ",desc" : ",asc");
}
document.querySelectorAll("table.sortable").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, column) => {
    th.title = "click to sort";
    th.addEventListener("click", () => sortTable(table, column, table.dataset.sortedBy === column + ",asc"));
  });
});
// index.html#sort=TABLE,COLUMN[,desc] opens with that table sorted (a link can share a view).
const wanted = location.hash.match(/^#sort=(\d+),(\d+)(,desc)?$/);
const target = wanted && document.querySelectorAll("table.sortable")[+wanted[1]];
if (target && +wanted[2] < target.tHead.rows[0].cells.length) sortTable(target, +wanted[2], !!wanted[3]);
document.body.dataset.ready = "1";
"""
HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; }
code { background: #f6f6f6; padding: 0 3px; }
img { max-width: 100%; }
"""
PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title><style>$style</style></head><body>
$body
<script>$script</script>
</body></html>
""")
"""The page around the converted body; ``$title`` is escaped, the rest is HTML already."""


def _inline_html(text: str, folder: Path) -> str:
    """The inline markdown the report writes (code, bold, emphasis, links, images) as escaped HTML."""
    out = html.escape(text, quote=False)

    def image(match: re.Match) -> str:
        path = folder / match.group(2)
        if not path.exists():
            return html.escape(match.group(1))
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{match.group(1)}" src="data:image/png;base64,{data}">'

    out = re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", image, out)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<i>\1</i>", out)


def _split_row(line: str) -> list[str]:
    """A markdown table row's cells, ``\\|`` inside a cell unescaped."""
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [c.strip().replace("\\|", "|") for c in cells]


def _table_html(table: list[list[str]], folder: Path) -> list[str]:
    """A markdown table (header, separator, rows) as a sortable HTML table."""
    head, rows = table[0], table[2:]
    return ['<table class="sortable"><thead><tr>' + "".join(f"<th>{_inline_html(c, folder)}</th>" for c in head)
            + "</tr></thead><tbody>",
            *("<tr>" + "".join(f"<td>{_inline_html(c, folder)}</td>" for c in row) + "</tr>" for row in rows),
            "</tbody></table>"]


def _block_html(line: str, folder: Path) -> str | None:
    """One markdown line that is not a table row as HTML; None for a blank line or a code fence."""
    if not line.strip() or line.startswith("```"):
        return None
    heading = re.match(r"^(#{1,6}) (.*)$", line)
    if heading:
        level = len(heading.group(1))
        return f"<h{level}>{_inline_html(heading.group(2), folder)}</h{level}>"
    if line.lstrip().startswith("- "):
        return f"<ul><li>{_inline_html(line.lstrip()[2:], folder)}</li></ul>"
    return f"<p>{_inline_html(line, folder)}</p>"


def markdown_to_html(lines: Sequence[str], title: str, folder: Path) -> str:
    """The page of a README the report wrote (``lines``), its images read from ``folder``: headings,
    paragraphs, lists, tables (sortable by clicking a header) and the plots embedded as data URIs."""
    body: list[str] = []
    table: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            table.append(_split_row(line))
            continue
        if table:
            body += _table_html(table, folder)
            table = []
        block = _block_html(line, folder)
        if block is not None:
            body.append(block)
    if table:
        body += _table_html(table, folder)
    return PAGE.substitute(title=html.escape(title), style=HTML_STYLE, body="\n".join(body), script=HTML_SCRIPT)
