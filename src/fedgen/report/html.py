"""The run report as one self-contained HTML page: rendering only, from plain data (runs/report.py assembles it
from a run directory).

Everything is inline (images as base64 data URIs, the style sheet, one small script), so the file can be mailed,
archived and opened offline; nothing is fetched from anywhere. The script only records, once the page has loaded,
each image's natural width (`data-natural-width`) and any script error (`#report-errors`): what a headless
browser reads back to check the page (tests/test_report.py)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Text:
    """A paragraph. kind: "p", "note" (muted), "warn" (something is missing or wrong), "verdict" (a conclusion)."""

    text: str
    kind: str = "p"


@dataclass
class Facts:
    """Key-value pairs, as a two-column list."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    """columns, rows of strings; `marked`: row indices drawn highlighted (e.g. a config value that differs from
    the preset); `caption` above."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    marked: set[int] = field(default_factory=set)


@dataclass
class Details:
    """Blocks folded away under a summary line (open in print preview by clicking)."""

    summary: str
    blocks: list


@dataclass
class Image:
    """A PNG (its bytes), inline. `large`: the full width of the page, else a tile among others."""

    png: bytes
    alt: str
    caption: str = ""
    large: bool = False


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class Page:
    title: str
    subtitle: str
    sections: list[Section]
    generated: str = ""  # when the page was written (UTC)


_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 1.2em 1.5em 3em; }
h1 { font-size: 1.7em; margin: 0.2em 0 0; } h2 { font-size: 1.3em; margin: 0 0 0.6em; border-bottom: 2px solid #d8dde3;
padding-bottom: 0.2em; }
.subtitle { color: #56606b; margin: 0.2em 0 0.8em; }
nav { margin: 0.6em 0 1.2em; } nav a { margin-right: 1em; color: #1f5fa8; text-decoration: none; }
section { background: #fff; border: 1px solid #e1e5ea; border-radius: 6px; padding: 1em 1.3em; margin: 0 0 1.2em; }
p.note { color: #56606b; font-size: 0.92em; } p.warn { background: #fff4e0; border-left: 4px solid #e39b1b;
padding: 0.4em 0.7em; } p.verdict { background: #eaf3ff; border-left: 4px solid #1f5fa8; padding: 0.4em 0.7em;
font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.15em 1.2em; margin: 0.4em 0 0.8em; }
dt { color: #56606b; } dd { margin: 0; }
table { border-collapse: collapse; margin: 0.3em 0 1em; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 0.2em 0; }
th, td { border: 1px solid #d8dde3; padding: 0.2em 0.55em; text-align: left; vertical-align: top; }
th { background: #eef1f4; } tr.marked td { background: #fff1b8; font-weight: 600; }
.figures { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; } figure.tile img { max-width: 540px; } figure.large img { max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e5ea; image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #56606b; max-width: 540px; }
figure.large figcaption { max-width: none; }
footer { color: #56606b; font-size: 0.85em; }
summary { cursor: pointer; color: #1f5fa8; margin: 0.3em 0; }
.glance { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; } .glance > div { flex: 1 1 420px; }
@media print {
  body { background: #fff; font-size: 11pt; } nav { display: none; } main { max-width: none; padding: 0; }
  section { border: none; padding: 0; break-inside: auto; } h2 { break-after: avoid; }
  figure, table { break-inside: avoid; } figure.tile img { max-width: 45%; }
}
"""

# Records, once the page has loaded, every image's natural width and any script error, where a headless browser's
# DOM dump (tests/test_report.py) can read them. It changes nothing a reader sees.
_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e.type)); }, true);
  window.addEventListener("load", function () {
    var imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      imgs[i].setAttribute("data-natural-width", String(imgs[i].naturalWidth));
    }
    var out = document.getElementById("report-errors");
    out.textContent = errors.join("\\n");
    document.body.setAttribute("data-checked", String(imgs.length));
  });
})();
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _block(block) -> str:
    if isinstance(block, Text):
        return f'<p class="{esc(block.kind)}">{esc(block.text)}</p>'
    if isinstance(block, Facts):
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in block.items)
        return f"<dl>{items}</dl>"
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(c)}</th>" for c in block.columns)
        marked = ' class="marked"'
        body = "".join(f"<tr{marked if i in block.marked else ''}>" + "".join(f"<td>{esc(c)}</td>" for c in row)
                       + "</tr>" for i, row in enumerate(block.rows))
        caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Image):
        kind = "large" if block.large else "tile"
        caption = f"<figcaption>{esc(block.caption)}</figcaption>" if block.caption else ""
        return (f'<figure class="{kind}"><img src="{data_uri(block.png)}" alt="{esc(block.alt)}">'
                f"{caption}</figure>")
    if isinstance(block, Details):
        return f"<details><summary>{esc(block.summary)}</summary>" + "".join(_block(b) for b in block.blocks) + \
            "</details>"
    if isinstance(block, list):  # a row of figures
        return '<div class="figures">' + "".join(_block(b) for b in block) + "</div>"
    raise TypeError(f"not a report block: {type(block).__name__}")


def render(page: Page) -> str:
    """The page as one HTML document (a string)."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in page.sections)
    sections = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>'
                       + "".join(_block(b) for b in s.blocks) + "</section>" for s in page.sections)
    generated = f"written {esc(page.generated)} by fedgen report; " if page.generated else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(page.title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body><main><h1>{esc(page.title)}</h1><p class=\"subtitle\">{esc(page.subtitle)}</p>"
            f"<nav>{nav}</nav>{sections}"
            f'<footer>{generated}self-contained: no network, no server.<pre id="report-errors" hidden></pre>'
            f"</footer></main></body></html>\n")
