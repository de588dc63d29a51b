"""Check that the built book renders offline: no page or stylesheet loads anything from the network.

Usage: python book/check_site.py _build/html

Fails (exit status 1, listing every offender) if
  * an HTML page has a <script src>, <link href> (stylesheet, font, preload, icon, ...), a
    data-jupyter-widgets-cdn attribute, or an inline @import/url( that points at http://, https:// or //;
  * a CSS file of the site has such an @import or url(;
  * a local script or stylesheet that a page loads does not exist in the site;
  * a page with math does not load the self-hosted MathJax, or a page with widgets does not load the
    self-hosted RequireJS and @jupyter-widgets/html-manager.
Ordinary links (<a href>) to papers and documentation are allowed. Standard library only.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
CSS_REMOTE = re.compile(r"""(@import\s+(?:url\()?|url\()\s*['"]?\s*((?:https?:)?//[^'")\s]+)""", re.IGNORECASE)
MATHJAX = "mathjax-3.2.2/es5/tex-chtml.js"
WIDGET_JS = ("requirejs-2.3.8/require.js", "jupyter-widgets-html-manager-1.0.15/dist/embed-amd.js")
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class Page(HTMLParser):
    """Collects what an HTML page loads: scripts, links, CDN attributes, inline styles, and whether it has math."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (what, url)
        self.styles: list[str] = []
        self.has_math = False
        self.has_widgets = False
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            if a.get("src"):
                self.loads.append(("<script src>", a["src"]))
            if "data-jupyter-widgets-cdn" in a:
                self.loads.append(("data-jupyter-widgets-cdn", a["data-jupyter-widgets-cdn"]))
            if a.get("type") == WIDGET_STATE:
                self.has_widgets = True
        elif tag == "link" and a.get("href"):
            self.loads.append((f"<link rel={a.get('rel', '')}>", a["href"]))
        elif tag in ("img", "iframe", "source", "video", "audio", "embed") and a.get("src"):
            self.loads.append((f"<{tag} src>", a["src"]))
        elif tag == "style":
            self._in_style = True
        if "style" in a:
            self.styles.append(a["style"])
        classes = a.get("class", "").split()
        if "math" in classes or "mathjax_process" in classes:
            self.has_math = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def local_target(page: Path, url: str) -> Path | None:
    """The file a relative URL of ``page`` points at (None for data: and other non-file URLs)."""
    parts = urlsplit(url)
    if parts.scheme or not parts.path:
        return None
    return (page.parent / unquote(parts.path)).resolve()


def check(site: Path) -> list[str]:
    problems: list[str] = []
    site = site.resolve()
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"{site}: no HTML pages (was the book built?)"]
    for page in pages:
        rel = page.relative_to(site)
        if any(part.startswith(("mathjax-", "requirejs-", "jupyter-widgets-")) for part in rel.parts[:1]):
            continue  # the vendored packages' own demo pages are not part of the book
        parser = Page()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        loaded: set[Path] = set()
        for what, url in parser.loads:
            if REMOTE.match(url):
                problems.append(f"{rel}: {what} loads {url}")
                continue
            target = local_target(page, url)
            if target is None or what.startswith("data-jupyter") or "{{" in url:
                continue  # not a file; or a theme's unrendered Jinja macro under _static/
            loaded.add(target)
            if (what.startswith("<script") or "stylesheet" in what) and not target.is_file():
                problems.append(f"{rel}: {what} points at {url}, which is not in the site")
        for css in parser.styles:
            problems += [f"{rel}: inline style loads {m.group(2)}" for m in CSS_REMOTE.finditer(css)]
        if parser.has_math and (site / MATHJAX).resolve() not in loaded:
            problems.append(f"{rel}: has math but does not load the self-hosted {MATHJAX}")
        if parser.has_widgets:
            for js in WIDGET_JS:
                if (site / js).resolve() not in loaded:
                    problems.append(f"{rel}: has widgets but does not load the self-hosted {js}")
    for css in sorted(site.rglob("*.css")):
        text = css.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)  # a URL in a comment loads nothing
        problems += [f"{css.relative_to(site)}: CSS loads {m.group(2)}" for m in CSS_REMOTE.finditer(text)]
    for asset in (MATHJAX, *WIDGET_JS):
        if not (site / asset).is_file():
            problems.append(f"{asset}: missing from the site (run the Makefile's vendor step)")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    site = Path(argv[1])
    problems = check(site)
    if problems:
        print(f"check_site: {len(problems)} problem(s) in {site}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    n = sum(1 for _ in site.rglob("*.html"))
    print(f"check_site: {n} pages and their CSS load nothing from the network; MathJax and widgets are self-hosted")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
