"""What every chapter notebook under notebooks/ must carry, checked on the committed files (nothing is executed).

* It was executed top to bottom in one kernel: every code cell has an execution count, in increasing order, and
  no output is an error.
* Every image output has alt text, in the cell metadata that myst-nb turns into ``<img alt=...>``:
  ``"mystnb": {"image": {"alt": "..."}}``.
* Its header (the first Markdown cell) has the title "N. Title", the learning objectives, the prerequisites, the
  estimated time, and a link to its graded notebook ``../exercises/<NN_name>/<NN_name>.ipynb``, which exists.
* Colormaps are perceptually uniform and readable in greyscale, in the notebooks and in the package.
* Every ``{term}`` of a chapter is in the glossary (book/glossary.md), and every glossary entry is linked from at
  least one chapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
GLOSSARY = REPO / "book" / "glossary.md"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
# Perceptually uniform sequential maps, greys, and the single-hue sequential maps (lightness monotone): all keep
# their order when printed in greyscale. Not jet, rainbow, hsv, or diverging maps (RdBu, coolwarm, ...).
GOOD_CMAPS = {"viridis", "cividis", "magma", "inferno", "plasma", "gray", "grey", "Greys", "binary", "gist_gray",
              "gist_yarg", "Blues", "Greens", "Oranges", "Purples", "Reds"}
# cmap="x", a default cmap: str = "x", plt.get_cmap("x"), matplotlib.colormaps["x"]
CMAP_USE = re.compile(r"""(?:cmap(?:\s*:\s*[\w| ]+)?\s*=\s*|get_cmap\(\s*|colormaps\[\s*)["']([\w.]+)["']""")
TERM = re.compile(r"\{term\}`([^`]+)`")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebook under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_top_to_bottom_without_errors(path):
    counts = []
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        assert cell.execution_count is not None, f"{path.name}: code cell {i} was not executed"
        counts.append(cell.execution_count)
        errors = [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: code cell {i} has an error output: {errors}"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: execution counts {counts} are not increasing: run it top to bottom (make execute)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_image_has_alt_text(path):
    missing = []
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type != "code":
            continue
        if any(kind in o.get("data", {}) for o in cell.outputs for kind in IMAGE_TYPES):
            alt = cell.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
            if not isinstance(alt, str) or len(alt.split()) < 5:
                missing.append(i)
    assert not missing, (f"{path.name}: the figures of code cells {missing} have no alt text; describe each in the "
                         'cell metadata "mystnb": {"image": {"alt": "..."}}')


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_has_objectives_prerequisites_time_and_graded_notebook(path):
    number = int(path.name.split("_")[0])
    header = next(c.source for c in read(path).cells if c.cell_type == "markdown")
    assert re.match(rf"# {number}\. \S", header), f"{path.name}: the header must start with '# {number}. Title'"
    for part in ("**Learning objectives.**", "**Prerequisites.**", "**Estimated time.**", "**Graded notebook.**"):
        assert part in header, f"{path.name}: the header has no {part} paragraph"
    time = header.split("**Estimated time.**", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"\d.*\b(hours?|minutes?)\b", time), f"{path.name}: the estimated time gives no duration"
    links = re.findall(r"\]\(\.\./exercises/(\d\d_\w+)/(\d\d_\w+)\.ipynb\)", header)
    assert links, f"{path.name}: the header does not link ../exercises/<NN_name>/<NN_name>.ipynb"
    for folder, name in links:
        assert folder == name and folder.startswith(f"{number:02d}_"), f"{path.name}: links {folder}/{name}.ipynb"
        assert (REPO / "exercises" / folder / f"{name}.ipynb").is_file(), f"{path.name}: {folder}/{name}.ipynb is missing"


def colormaps_used() -> list[tuple[str, str]]:
    found = []
    for path in NOTEBOOKS:
        for cell in read(path).cells:
            if cell.cell_type == "code":
                found += [(path.name, name) for name in CMAP_USE.findall(cell.source)]
    for path in sorted((REPO / "tfcourse").rglob("*.py")):
        found += [(str(path.relative_to(REPO)), name) for name in CMAP_USE.findall(path.read_text())]
    return found


def test_colormaps_are_perceptually_uniform_and_greyscale_safe():
    used = colormaps_used()
    assert ("tfcourse/viz.py", "viridis") in used, "the check does not see viz.py's default colormap"
    bad = sorted({(where, name) for where, name in used if name.removesuffix("_r") not in GOOD_CMAPS})
    assert not bad, (f"colormaps that are not perceptually uniform or not readable in greyscale: {bad}; use one of "
                     f"{sorted(GOOD_CMAPS)} (jet, rainbow and diverging maps such as RdBu lose their order in grey)")


def glossary_entries() -> list[set[str]]:
    """The glossary's entries, each the set of its terms (lower case)."""
    text = GLOSSARY.read_text(encoding="utf-8")
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    entries, current = [], None
    for line in block.splitlines():
        if not line.strip() or line.startswith(":"):
            current = None if not line.strip() else current
            continue
        if line[0].isspace():
            current = None
            continue
        if current is None:
            current = set()
            entries.append(current)
        current.add(" ".join(line.split()).lower())
    return entries


def term_references() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for path in NOTEBOOKS:
        for cell in read(path).cells:
            if cell.cell_type != "markdown":
                continue
            for text in TERM.findall(cell.source):
                target = re.search(r"<([^<>]+)>\s*$", text)
                name = " ".join((target.group(1) if target else text).split()).lower()
                refs.setdefault(name, set()).add(path.name)
    return refs


def test_glossary_terms_exist_and_every_entry_is_linked_from_a_chapter():
    entries = glossary_entries()
    assert len(entries) >= 20, f"found only {len(entries)} glossary entries: is the parser reading the directive?"
    terms = set().union(*entries)
    refs = term_references()
    unknown = {name: sorted(where) for name, where in refs.items() if name not in terms}
    assert not unknown, f"{{term}} references to terms the glossary lacks: {unknown}"
    unlinked = [sorted(entry) for entry in entries if not entry & set(refs)]
    assert not unlinked, f"glossary entries no chapter links with {{term}}: {unlinked}"


def test_every_chapter_is_in_the_table_of_contents():
    """The site builds only the files _toc.yml lists (only_build_toc_files), so a chapter left out is silently
    missing from the site and from the browser tests."""
    toc = (REPO / "_toc.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"(?:file|root):\s*(\S+)", toc))
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in listed]
    assert not missing, f"chapters missing from _toc.yml: {missing}"
    for page in sorted((REPO / "book").glob("*.md")):
        assert f"book/{page.stem}" in listed, f"book/{page.name} is not in _toc.yml"
