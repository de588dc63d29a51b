"""The built site (``_build/html``, made by ``make book``) in a real browser: headless Chromium with Playwright.

The site is served on 127.0.0.1 and every page of ``_toc.yml`` is loaded. On each page:

* it loads (HTTP 200), and no request leaves 127.0.0.1 (every other request is blocked and reported), and no local
  request fails;
* no console error and no uncaught exception;
* the mathematics is typeset: every ``.math`` element holds MathJax output, none is a MathJax error, and no raw
  ``$$`` is left in the text;
* every image has loaded (natural width > 0), and every figure has real alt text (not its file name);
* every embedded widget is rendered (each widget view of the page has its DOM);
* every exercise solution dropdown is closed and opens on click;
* the "previous" and "next" links follow the table of contents;
* chapters have their launch button (JupyterHub) and their download links: the chapter's .ipynb and the graded
  notebook, both served.

A full-page screenshot of each page is saved in ``_build/screens/<page>.png``. The site's full-text search is
checked on ``search.html``. ``make test`` builds the site first when it is missing or older than its sources; run
alone, this module skips if there is no built site.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import yaml

from browser_support import launched_browser, static_server

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "_build" / "html"
SCREENS = REPO / "_build" / "screens"
NAV_TIMEOUT_MS = 90_000  # a loaded 2-core machine


def toc_pages() -> list[str]:
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part.get("chapters", [])]
    return [str(Path(p).with_suffix("")) for p in pages]


PAGES = toc_pages()
CHAPTERS = [p for p in PAGES if p.startswith("notebooks/")]


def hub_url() -> str:
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    return os.environ.get("TFCOURSE_JUPYTERHUB_URL", config["launch_buttons"].get("jupyterhub_url", "")).rstrip("/")


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").is_file():
        pytest.skip(f"no built site in {SITE}: run `make book` (make test builds it)")
    SCREENS.mkdir(parents=True, exist_ok=True)
    with static_server(SITE) as base, launched_browser() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(NAV_TIMEOUT_MS)
        outside: list[str] = []

        def only_local(route):
            url = route.request.url
            if url.startswith(base + "/") or url.startswith(("data:", "blob:", "about:")):
                route.continue_()
            else:
                outside.append(url)
                route.abort()

        context.route("**/*", only_local)
        yield dict(base=base, context=context, outside=outside)
        context.close()


def open_page(site, page_path: str):
    """Load a page, wait for MathJax and the widgets; return the page and what went wrong while loading."""
    page = site["context"].new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status} for {r.url}"))
    page.on("requestfailed", lambda r: r.url.startswith(site["base"]) and problems.append(
        f"request failed: {r.url} ({r.failure})"))
    before = len(site["outside"])
    response = page.goto(f"{site['base']}/{page_path}", wait_until="load")
    if response is None or response.status != 200:
        problems.append(f"status {response.status if response else None} for {page_path}")
    # MathJax 3 typesets after load; its startup promise resolves when the first typesetting is done.
    page.evaluate("async () => { if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; } }")
    # Each widget view script gets a rendered widget-subarea next to it (the html-manager's embedding).
    page.wait_for_function("""() => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
        .every(s => s.parentElement.querySelector('.widget-subarea .jupyter-widgets'))""")
    page.evaluate("async () => { await Promise.all([...document.images].map(i => i.decode().catch(() => null))); }")
    return page, problems, before


@pytest.mark.parametrize("page_path", PAGES)
def test_page_in_a_browser(site, page_path):
    page, problems, before = open_page(site, f"{page_path}.html")
    try:
        # Mathematics typeset.
        math = page.evaluate("""() => {
            const els = [...document.querySelectorAll('.math')];
            const text = [...document.querySelectorAll('article')].map(a => {
                const c = a.cloneNode(true); c.querySelectorAll('pre, code, script').forEach(x => x.remove());
                return c.innerText; }).join('\\n');
            return {n: els.length, untypeset: els.filter(e => !e.querySelector('mjx-container')).length,
                    errors: document.querySelectorAll('mjx-merror').length, raw: text.includes('$$')};
        }""")
        if math["untypeset"]:
            problems.append(f"{math['untypeset']} of {math['n']} math elements not typeset by MathJax")
        if math["errors"]:
            problems.append(f"{math['errors']} MathJax errors")
        if math["raw"]:
            problems.append("raw $$ in the text")
        # Images loaded, with alt text outside the widgets (whose images are drawn by the widget renderer).
        images = page.evaluate("""() => [...document.images].map(i => ({src: i.currentSrc.slice(0, 120),
            width: i.naturalWidth, alt: i.getAttribute('alt') || '', widget: !!i.closest('.widget-subarea')}))""")
        problems += [f"image not loaded: {i['src']}" for i in images if i["width"] <= 0]
        problems += [f"image without alt text: {i['src']} (alt={i['alt']!r})" for i in images
                     if not i["widget"] and (len(i["alt"].split()) < 2 or re.search(r"\.(png|svg|jpe?g)$", i["alt"]))]
        # Widgets: every view rendered (open_page waited for it); count them for the record.
        views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
        rendered = page.locator(".widget-subarea .jupyter-widgets").count()
        if views and not rendered:
            problems.append(f"{views} widget views, none rendered")
        # Solution dropdowns: closed, and open on click.
        solutions = page.locator("div.solution.dropdown")
        for k in range(solutions.count()):
            box = solutions.nth(k)
            if "toggle-hidden" not in (box.get_attribute("class") or ""):
                problems.append(f"solution dropdown {k} is open before any click")
                continue
            box.locator("button.toggle-button").first.click()
            page.wait_for_function("el => !el.classList.contains('toggle-hidden')", arg=box.element_handle(),
                                   timeout=10_000)
            body = box.locator(":scope > :not(.admonition-title)").first
            if not body.is_visible():
                problems.append(f"solution dropdown {k} opened but its content is not visible")
        # Previous / next follow the table of contents.
        i = PAGES.index(page_path)
        links = page.evaluate("""() => ({prev: document.querySelector('.prev-next-area a.left-prev')?.href || null,
                                          next: document.querySelector('.prev-next-area a.right-next')?.href || null})""")
        expected = {"prev": PAGES[i - 1] if i > 0 else None, "next": PAGES[i + 1] if i + 1 < len(PAGES) else None}
        for key, target in expected.items():
            got = links[key] and urlsplit(links[key]).path.lstrip("/").removesuffix(".html")
            if got != target:
                problems.append(f"the {key} link goes to {got}, not {target}")
        # Chapters: the launch button and the downloads.
        if page_path in CHAPTERS:
            problems += check_chapter_links(site, page, page_path)
        # Back to the top, focus released: a full-page capture draws the sticky header and sidebars where the
        # window is scrolled to, and a focused skip link over the header.
        page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
        page.wait_for_timeout(300)
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / f"{Path(page_path).name}.png"), full_page=True)
        problems += [f"request to the network (blocked): {u}" for u in site["outside"][before:]]
        assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)
    finally:
        page.close()


def check_chapter_links(site, page, page_path: str) -> list[str]:
    problems = []
    hub = hub_url()
    if hub:
        launch = page.evaluate("() => [...document.querySelectorAll('.dropdown-launch-buttons a')].map(a => a.href)")
        if not any(u.startswith(f"{hub}/hub/user-redirect/") and u.endswith(f"{page_path}.ipynb") for u in launch):
            problems.append(f"no JupyterHub launch link to {page_path}.ipynb on {hub}: {launch}")
    downloads = page.evaluate("""() => [...document.querySelectorAll('a')].map(a => a.href)
        .filter(h => h.endsWith('.ipynb'))""")
    source = [u for u in downloads if u.endswith(f"_sources/{page_path}.ipynb")]
    number = Path(page_path).name[:2]
    graded = [u for u in downloads if "/_downloads/" in u and re.search(rf"/{number}_\w+\.ipynb$", u)]
    if not source:
        problems.append("no download link to the chapter's .ipynb")
    if not graded:
        problems.append("no download link to the graded notebook")
    for url in source[:1] + graded[:1]:
        response = site["context"].request.get(urljoin(page.url, url))
        if response.status != 200 or "cells" not in json.loads(response.text() or "{}"):
            problems.append(f"{url}: status {response.status}, not a notebook")
    return problems


def test_full_text_search(site):
    page, problems, before = open_page(site, "search.html?q=softmax")
    try:
        results = page.locator("#search-results ul.search li")
        results.first.wait_for(timeout=NAV_TIMEOUT_MS)
        hrefs = page.evaluate("() => [...document.querySelectorAll('#search-results ul.search li a')].map(a => a.href)")
        assert any("01_attention_scoring" in h for h in hrefs), hrefs
        problems += [f"request to the network (blocked): {u}" for u in site["outside"][before:]]
        assert not problems, problems
    finally:
        page.close()
