"""Rendering a report document as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from typing import Any

import pandas as pd

import tbptt_bench
from tbptt_bench.report.document import Document


def _md_cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, line breaks as ``<br>`` (the decision summary's cells have three)."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.astype(str).itertuples(index=False)]
    return "\n".join([head, rule, *body])


def render_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    contents = ["Contents: " + " · ".join(f"[{t}](#{a})" for a, t in doc.sections), ""]
    blocks = doc.flat_blocks()
    lines += [] if any(kind == "nav" for kind, _ in blocks) else contents
    n = 0
    for kind, payload in blocks:
        if kind == "nav":
            lines += contents
        elif kind == "h2":
            lines += [f'<a id="{payload[0]}"></a>', "", f"## {payload[1]}", ""]
        elif kind == "h3":
            lines += [f"### {payload}", ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "warn":
            lines += [f"> **Warning:** {payload}", ""]
        elif kind == "table":
            name, shown, caption = payload
            lines += [f"*{caption}* ([tables/{name}.csv](tables/{name}.csv))", "", _md_table(shown), ""]
        elif kind == "figure":
            n += 1
            others = " · ".join(f"[{p.suffix[1:].upper()}](figures/{p.name})" for p in payload.files
                                if p.suffix != ".png")
            lines += [f"![{payload.name}](figures/{payload.name}.png)", "",
                      f"**Figure {n} ({payload.name}).** {payload.caption}" + (f" {others}" if others else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1240px;margin:1em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em;max-width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;overflow-wrap:break-word}
.long{overflow-wrap:anywhere}
th{font-size:.95em}td:first-child,th:first-child{min-width:4em}#table-decision td:first-child{white-space:nowrap}
#table-decision{font-size:.74em;line-height:1.25;margin:.3em 0 .5em}#table-decision td{padding:.15em .4em}
#decision h2{margin-top:.4em;font-size:1.3em}#decision p{margin:.3em 0;font-size:.9em}h1{margin:.2em 0;font-size:1.45em}
th{background:#f3f3f3}caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#444}.warning{background:#fff4e0;border-left:4px solid #e69f00;padding:.5em .8em}
nav ul{columns:2}
"""


def _html_cell(text: str) -> str:
    """A table cell; one whose text has a token too long for a column may break anywhere (so that no table is
    wider than the page), the others only between words."""
    long = any(len(word) > 24 for word in text.split())
    body = "<br>".join(html.escape(line) for line in text.split("\n"))
    return f'<td class="long">{body}</td>' if long else f"<td>{body}</td>"


def _html_table(name: str, frame: pd.DataFrame, caption: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_html_cell(str(v)) for v in row) + "</tr>"
                   for row in frame.astype(str).itertuples(index=False))
    cap = f"{esc(caption)} (tables/{esc(name)}.csv)"
    return (f'<table id="table-{esc(name)}"><caption>{cap}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def render_html(doc: Document) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(doc.title)}</h1>"]
    nav = ["<nav><ul>", *(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in doc.sections), "</ul></nav>"]
    blocks = doc.flat_blocks()
    parts += [] if any(kind == "nav" for kind, _ in blocks) else nav
    n = 0
    open_section = False
    for kind, payload in blocks:
        if kind == "nav":
            if open_section:
                parts.append("</section>")
                open_section = False
            parts += nav
        elif kind == "h2":
            if open_section:
                parts.append("</section>")
            parts.append(f'<section id="{esc(payload[0])}"><h2>{esc(payload[1])}</h2>')
            open_section = True
        elif kind == "h3":
            parts.append(f"<h3>{esc(payload)}</h3>")
        elif kind == "p":
            parts.append(f"<p>{esc(payload)}</p>")
        elif kind == "warn":
            parts.append(f'<p class="warning"><strong>Warning:</strong> {esc(payload)}</p>')
        elif kind == "table":
            parts.append(_html_table(*payload))
        elif kind == "figure":
            n += 1
            data = base64.b64encode(payload.png).decode("ascii")
            parts.append(f'<figure id="fig-{esc(payload.name)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{esc(payload.name)}"><figcaption><strong>Figure {n} ({esc(payload.name)}).'
                         f"</strong> {esc(payload.caption)}</figcaption></figure>")
    if open_section:
        parts.append("</section>")
    parts += [f"<footer><p>Generated by tbptt-bench {esc(tbptt_bench.__version__)}.</p></footer>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
