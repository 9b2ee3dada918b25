"""Blocks (document.py) -> report.html and report.md, through the Jinja2 templates in templates/.

HTML is autoescaped; Markdown tables are tabulate pipe tables, numbers right-aligned, cells as text (tabulate's
number parsing is off: it would re-format "0.7000" as "0.7").
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import jinja2
from tabulate import tabulate

from pipelines.report.document import Block, Cell, Table

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _md_cell(cell: Cell) -> str:
    value = f"{cell.text} ({cell.sub})" if cell.sub else cell.text
    classes = cell.cls.split()
    if cell.numeric and ("gain" in classes or "loss" in classes):
        value += " **gain**" if "gain" in classes else " **loss**"
    if cell.mark:
        value += f" **{cell.mark}**"
    return value.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """A pipe table; Markdown has no spanning headers, so a group title prefixes each column it spans."""
    headers = list(table.headers)
    if table.groups:
        named = [title for title, span in table.groups for _ in range(span)]
        headers = [f"{g} {h}".strip() for g, h in zip(named, headers)]
    rows = [[_md_cell(c if isinstance(c, Cell) else Cell(str(c))) for c in row] for row in table.rows]
    # right-align the columns that hold numbers in every row
    numeric = [bool(table.rows) and all(isinstance(row[i], Cell) and row[i].numeric for row in table.rows) for i in range(len(headers))]
    return tabulate(
        rows,
        headers=[h.replace("|", "\\|") for h in headers],
        tablefmt="pipe",
        colalign=["right" if n else "left" for n in numeric],
        disable_numparse=True,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the report instead of printing nothing
        keep_trailing_newline=True,
    )
    env.filters["markdown_table"] = markdown_table
    env.filters["b64"] = _b64
    return env


def render_html(blocks: list[Block], title: str) -> str:
    return environment().get_template("report.html.j2").render(blocks=blocks, title=title)


def render_markdown(blocks: list[Block]) -> str:
    return environment().get_template("report.md.j2").render(blocks=blocks).rstrip("\n") + "\n"  # one final newline
