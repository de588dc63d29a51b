"""Helpers of the browser tests (test_site_browser.py, test_lab_browser.py): headless Chromium from Debian's
packages, driven by Playwright for Python, and a quiet static HTTP server on 127.0.0.1.

Playwright's own browser download is not used (it needs the network): the tests launch the system's ``chromium``
(``make test`` installs Debian's package when it is missing and it can), or the executable named by the
environment variable ``TFCOURSE_CHROMIUM``. Without one, the browser tests are skipped, saying why.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Headless, sandbox off (root in a container), and no background traffic of Chromium's own (updates, sync, QUIC).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """The Chromium executable, or skip the calling test with the reason."""
    path = os.environ.get("TFCOURSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine: install Debian's chromium package (`make test` does so as root "
                    "with apt-get), or set TFCOURSE_CHROMIUM to a Chromium executable")
    return path


@contextmanager
def launched_browser() -> Iterator:
    """A headless Chromium under Playwright (sync API)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - requirements.txt pins it
        pytest.skip("playwright is not installed in this environment (make install)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@contextmanager
def static_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port); yields the base URL, ``http://127.0.0.1:<port>``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
