"""Sphinx extension: the parts of the tfcourse site that Jupyter Book 1 cannot configure by itself.

* **Graded notebooks as downloads.** A chapter links its graded notebook as
  ``[...](../exercises/01_attention/01_attention.ipynb)``, a relative link that JupyterLab opens. Sphinx would read
  it as a cross-reference to a document, and ``exercises/`` is not part of the book, so every such link would be a
  warning. Links to a notebook outside the book become download links instead: the site carries a copy of the
  graded notebook, and the reader gets the file.
* **A JupyterHub launch button without a repository.** sphinx-book-theme builds every launch button (Binder,
  JupyterHub, Colab) from ``repository.url``; without one, a Binder or Colab URL in ``launch_buttons`` even makes
  it fail. Until ``repository.url`` is set, the repository-based buttons are switched off and the chapters get one
  JupyterHub button that opens the notebook in a copy of the course already in the hub user's home
  (``<hub>/hub/user-redirect/lab/tree/<tfcourse_hub_course_dir>/notebooks/<chapter>.ipynb``). With
  ``repository.url`` set, the theme's own buttons take over (its JupyterHub button pulls the repository with
  nbgitpuller). The environment variable ``TFCOURSE_JUPYTERHUB_URL`` overrides ``launch_buttons.jupyterhub_url``
  at build time (an empty value removes the button).
* **The grading scheme of every assignment**, read from the instructor sources ``solutions/*/*.ipynb`` by the
  directive ``{tfcourse-grading-scheme}`` (used in ``book/instructors.md``): the graded cells and their points,
  and for each task graded by hand its question and the headings of its rubric (the full mark scheme, with the
  model answer, stays in the source and in nbgrader's formgrader). It follows the sources as they change.
* **Exercises numbered per chapter.** The table of contents is not numbered (chapter titles carry their
  numbers), so Sphinx numbers sphinx-exercise's exercises across the whole book: chapter 2 would start at
  "Exercise 5" while its text says "exercise 1". They are renumbered from 1 in every document, which the
  chapters' references ("exercise 3", ``{ref}`` links, "Solution to Exercise 3") then follow.
* **A default colour mode.** pydata-sphinx-theme logs a console error ("Got invalid theme mode") on the first
  visit when ``default_mode`` (an ``html_context`` value) is unset; it is set to ``auto``, the mode the theme falls
  back to.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import json
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

LOGGER = logging.getLogger(__name__)
REPOSITORY_BUTTONS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url")


def _configure(app: Sphinx, config: Config) -> None:
    options = config.html_theme_options
    config.html_context.setdefault("default_mode", "auto")  # pydata-sphinx-theme reads it from the context
    launch = dict(options.get("launch_buttons") or {})
    if "TFCOURSE_JUPYTERHUB_URL" in os.environ:
        launch["jupyterhub_url"] = os.environ["TFCOURSE_JUPYTERHUB_URL"]
    config.tfcourse_jupyterhub_url = ""
    if not options.get("repository_url"):
        # The theme's buttons need the repository; keep only the hub, for our own button.
        config.tfcourse_jupyterhub_url = (launch.get("jupyterhub_url") or "").strip().rstrip("/")
        for key in REPOSITORY_BUTTONS:
            launch.pop(key, None)
    options["launch_buttons"] = launch


def _add_jupyterhub_button(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    hub = app.config.tfcourse_jupyterhub_url
    source = Path(app.env.doc2path(pagename))
    if not hub or source.suffix != ".ipynb" or "header_buttons" not in context:
        return
    interface = app.config.html_theme_options["launch_buttons"].get("notebook_interface", "jupyterlab")
    prefix = {"jupyterlab": "lab/tree", "classic": "tree"}.get(interface, "lab/tree")
    course = app.config.tfcourse_hub_course_dir.strip("/")
    path = quote(f"{course}/{pagename}.ipynb" if course else f"{pagename}.ipynb")
    context["header_buttons"].append({
        "type": "group",
        "tooltip": "Launch interactive content",
        "icon": "fas fa-rocket",
        "label": "launch-buttons",
        "buttons": [{
            "type": "link",
            "text": "JupyterHub",
            "tooltip": "Launch on JupyterHub",
            "icon": "_static/images/logo_jupyterhub.svg",
            "url": f"{hub}/hub/user-redirect/{prefix}/{path}",
        }],
    })


def _notebook_links_to_downloads(app: Sphinx, doctree: nodes.document) -> None:
    env = app.env
    for ref in list(doctree.findall(addnodes.pending_xref)):
        if ref.get("refdomain") != "doc" or ref.get("reftargetid"):
            continue
        target = ref["reftarget"]
        if target in env.found_docs or not Path(env.srcdir, target + ".ipynb").is_file():
            continue
        download = addnodes.download_reference(
            refdomain=None, reftype="myst", reftarget="/" + target + ".ipynb", refdoc=env.docname,
            refexplicit=True, classes=["xref", "download", "myst"],
        )
        download += ref.children
        ref.replace_self(download)


class GradingScheme(SphinxDirective):
    """``{tfcourse-grading-scheme}``: a section per assignment of ``solutions/``, built from its nbgrader metadata."""

    has_content = False
    RUBRIC_HEAD = re.compile(r"^\s*[*-]\s+\*\*(.+?)\*\*")  # "* **1 point: the variance.** ..."
    RUBRIC_TITLE = re.compile(r"^\*\*(Rubric.*?)\*\*", re.DOTALL)  # "**Rubric (2 points; half points allowed).**"

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir)
        lines: list[str] = []
        for source in sorted(root.glob("solutions/[0-9]*/*.ipynb")):
            self.env.note_dependency(str(source))
            lines += self._assignment(source)
        if not lines:
            lines = ["No assignment found under `solutions/`."]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="solutions"), container)
        return container.children

    def _assignment(self, source: Path) -> list[str]:
        cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
        graded = [(c, c["metadata"]["nbgrader"]) for c in cells
                  if c.get("metadata", {}).get("nbgrader", {}).get("grade") or
                  c.get("metadata", {}).get("nbgrader", {}).get("task")]
        auto = sum(m.get("points", 0) for c, m in graded if c["cell_type"] == "code")
        manual = sum(m.get("points", 0) for c, m in graded if c["cell_type"] != "code")
        name = source.stem
        out = [f"### `{name}`: {auto + manual:g} points ({auto:g} autograded, {manual:g} by hand)", "",
               f"Source `solutions/{source.parent.name}/{source.name}`, student version "
               f"`exercises/{source.parent.name}/{source.name}`.", "",
               "| graded cell | graded | points |", "|---|---|---|"]
        out += [f"| `{m.get('grade_id')}` | {'automatically (tests)' if c['cell_type'] == 'code' else 'by hand'} | "
                f"{m.get('points', 0):g} |" for c, m in graded]
        out.append("")
        for c, m in graded:
            if c["cell_type"] == "code":
                continue
            text = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            question, _, rest = text.partition("### BEGIN MARK SCHEME")
            scheme = rest.partition("### END MARK SCHEME")[0]
            heads = [match.group(1).strip() for line in scheme.splitlines()
                     if (match := self.RUBRIC_HEAD.match(line))]
            out += [f"**`{m.get('grade_id')}`** ({m.get('points', 0):g} points), the question:", ""]
            out += ["> " + (f"**{line.lstrip('#').strip()}**" if line.startswith("#") else line)
                    for line in question.strip().splitlines()]
            title = self.RUBRIC_TITLE.search(scheme.strip())
            out += ["", f"*{' '.join(title.group(1).split()) if title else 'Rubric.'}* "
                    + (" ".join(heads) if heads else "See the mark scheme in the source."), ""]
        return out


def _number_exercises_per_document(app: Sphinx, env) -> list[str]:
    changed = []
    for docname, by_type in env.toc_fignumbers.items():
        numbers = by_type.get("exercise")
        if not numbers:
            continue
        ordered = sorted(numbers, key=lambda node_id: numbers[node_id])
        renumbered = {node_id: (k,) for k, node_id in enumerate(ordered, start=1)}
        if renumbered != numbers:
            by_type["exercise"] = renumbered
            changed.append(docname)
    return changed


def setup(app: Sphinx) -> dict:
    app.add_config_value("tfcourse_hub_course_dir", "tfcourse", "html", types=[str])
    app.add_config_value("tfcourse_jupyterhub_url", "", "html", types=[str])
    # Before sphinx-book-theme reads the launch buttons, and before Sphinx's download collector (priority 500).
    app.connect("config-inited", _configure, priority=900)
    app.connect("html-page-context", _add_jupyterhub_button, priority=502)
    app.connect("doctree-read", _notebook_links_to_downloads, priority=400)
    app.add_directive("tfcourse-grading-scheme", GradingScheme)
    # After Sphinx's own figure numbering (the toctree collector, priority 500).
    app.connect("env-get-updated", _number_exercises_per_document, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
