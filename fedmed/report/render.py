"""Render a report document as Markdown or as one self-contained HTML page."""

from __future__ import annotations

import base64
import html

from fedmed.report.document import Alerts, Document, Figure, Heading, Table, Text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #1b1b1b; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eef1f5; }
.alert { padding: 0.5em 0.8em; margin: 0.3em 0; border-radius: 4px; }
.critical { background: #fde2e1; border: 2px solid #c62828; font-weight: 600; }
.warning { background: #fff6d6; border: 1px solid #c49a00; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
"""


def to_markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines += [markdown_table(block.header, block.rows), ""]
        elif isinstance(block, Alerts):
            for item in block.items:
                label = "**CRITICAL**" if item["level"] == "critical" else "warning"
                site = f" {item['site']}:" if item["site"] else ""
                lines.append(f"- {label} [{item['code']}]{site} {item['message']}")
            lines.append("")
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.name})", ""]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are written with str() and may hold '|'."""
    lines = [_md_row(header), "|" + "---|" * len(header)]
    return "\n".join(lines + [_md_row(row) for row in rows])


def _md_row(cells: list) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def to_html(doc: Document, images: dict[str, bytes]) -> str:
    """One HTML page with no external references; figures are embedded PNGs."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Alerts):
            for item in block.items:
                site = f"{item['site']}: " if item["site"] else ""
                label = "CRITICAL" if item["level"] == "critical" else "warning"
                parts.append(
                    f'<div class="alert {item["level"]}" data-code="{html.escape(item["code"])}">'
                    f"<b>{label}</b> [{html.escape(item['code'])}] {html.escape(site + item['message'])}"
                    "</div>"
                )
        elif isinstance(block, Figure) and block.name in images:
            data = base64.b64encode(images[block.name]).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
