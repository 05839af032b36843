"""One self-contained HTML report per finished run: `write_report(run_dir)`.

This module is the glue and the public entry point (the study and the CLI import `write_report`
from here): it asks context.py for everything the report shows, renders the Jinja template
templates/report.html.j2 (shipped as package data) and writes the page atomically. The page opens
offline: figures are embedded PNGs and there is no external CSS, JavaScript or font. All text from
the run (study, arm and column names, the recipe) goes through jinja2's autoescaping.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import markupsafe

from stagewise.report.context import build_context
from stagewise.report.external import build_external_context
from stagewise.io import atomic_write

REPORT_NAME = "report.html"
TEMPLATE_PACKAGE = "stagewise.report"
TEMPLATE_DIR = "templates"
TEMPLATE_NAME = "report.html.j2"
EXTERNAL_TEMPLATE = "external.html.j2"
PAGE_TEMPLATE = "page.html.j2"


def environment() -> jinja2.Environment:
    """The Jinja environment of the report: templates from the package data, autoescaped, strict."""
    return jinja2.Environment(loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, TEMPLATE_DIR), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(ctx: dict) -> str:
    """The report page for a context from `context.build_context`."""
    return environment().get_template(TEMPLATE_NAME).render(**ctx)


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (one self-contained file) and return its path."""
    run_dir = Path(run_dir)
    return _write(run_dir / REPORT_NAME, render(build_context(run_dir)))


def write_external_report(folder: str | Path) -> Path:
    """Write the external-validation report `folder/report.html` from `folder/external.json`
    (`stagewise evaluate`), in the study report's style."""
    folder = Path(folder)
    text = environment().get_template(EXTERNAL_TEMPLATE).render(**build_external_context(folder))
    return _write(folder / REPORT_NAME, text)


def write_markdown_page(out: str | Path, title: str, text: str) -> Path:
    """A short page from markdown `text` (tables included) in the reports' style: for pages
    whose numbers are all in the text, such as a federated evaluation's. HTML in `text` is
    escaped, not rendered."""
    from markdown_it import MarkdownIt

    from stagewise.version import __version__

    body = markupsafe.Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))
    return _write(Path(out), environment().get_template(PAGE_TEMPLATE).render(title=title, body=body,
                                                                              version=__version__))


def _write(out: Path, text: str) -> Path:
    atomic_write(out, text)
    return out
