"""JupyterLab smoke test, in headless Chromium: start JupyterLab on 127.0.0.1 with a token, open chapter 1, run
all its cells from the menu, and check that they ran and that the last output (the temperature explorer, an
ipywidgets slider with its plot) appears.

The server runs on a copy of the notebook in a temporary folder, with Jupyter's configuration, data, settings and
workspaces directories there too, so neither the committed notebook nor the user's Jupyter set-up is touched; as
root it gets ``--allow-root``. It is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browser_support import launched_browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01_attention_scoring.ipynb"
SCREENS = REPO / "_build" / "screens"  # a screenshot of JupyterLab after the run
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 600  # chapter 1 runs in under a minute on 2 idle cores; a loaded machine takes longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not NOTEBOOK.is_file():
        pytest.skip(f"{NOTEBOOK} not found")
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    home = root / ".jupyter-home"
    settings = home / "lab-settings"
    # Render every cell into the DOM (JupyterLab may otherwise window long notebooks), and no news pop-up.
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, token = free_port(), secrets.token_hex(16)
    command = [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = (root / "lab.log").open("w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-4000:]}")
            time.sleep(1)
        yield dict(base=base, token=token, root=root, log=root / "lab.log")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server stops its kernels on SIGTERM
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def click_menu(page, menu: str, item: str) -> None:
    """Open a menu of the menu bar and click one of its items (exact labels)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(rf"^{re.escape(menu)}$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$")).first.click()


def test_chapter_1_runs_in_jupyterlab(lab):
    expected = nbformat.read(NOTEBOOK, as_version=4)
    n_code = sum(1 for c in expected.cells if c.cell_type == "code")
    saved = lab["root"] / "notebooks" / NOTEBOOK.name
    with launched_browser() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(120_000)
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            (lab["base"] + "/", "data:", "blob:")) else route.abort())
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{lab['base']}/lab/tree/notebooks/{NOTEBOOK.name}?token={lab['token']}", wait_until="load")
        page.locator(".jp-NotebookPanel .jp-Cell").nth(len(expected.cells) - 1).wait_for()
        # A kernel is connected and idle before we run anything.
        page.wait_for_function("() => document.querySelector('.jp-NotebookPanel .jp-Notebook') && "
                               "[...document.querySelectorAll('.jp-Toolbar-kernelStatus, .jp-Notebook-ExecutionIndicator')]"
                               ".some(el => /idle/i.test(el.getAttribute('data-status') || el.title || el.textContent))",
                               timeout=180_000)
        click_menu(page, "Edit", "Clear Outputs of All Cells")
        mtime = saved.stat().st_mtime
        click_menu(page, "Run", "Run All Cells")
        last = page.locator(".jp-NotebookPanel .jp-CodeCell").last
        # The last code cell gets its execution count when everything above it has run.
        page.wait_for_function(
            f"""el => /\\[{n_code}\\]/.test(el.querySelector('.jp-InputPrompt')?.textContent || '')""",
            arg=last.element_handle(), timeout=RUN_TIMEOUT_S * 1000)
        # Its output: the temperature explorer, a slider and the plot it draws.
        slider = last.locator(".jp-OutputArea .widget-slider")
        slider.wait_for(timeout=60_000)
        assert "temperature" in slider.inner_text()
        last.locator(".jp-OutputArea img").first.wait_for(timeout=60_000)
        click_menu(page, "File", "Save Notebook")
        # Saving serialises the widget state too, which takes a while on a busy machine: the tab's dirty mark goes
        # when the server has written the file.
        page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=240_000)
        deadline = time.monotonic() + 60
        while saved.stat().st_mtime == mtime and time.monotonic() < deadline:
            time.sleep(0.5)
        SCREENS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENS / "jupyterlab.png"))
        context.close()
    assert saved.stat().st_mtime != mtime, (f"the notebook was not saved (see {SCREENS / 'jupyterlab.png'}); "
                                            f"server log:\n{lab['log'].read_text()[-3000:]}")
    ran = nbformat.read(saved, as_version=4)
    code = [c for c in ran.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, n_code + 1)), "not every cell ran, in order"
    failures = [(i, o.ename) for i, c in enumerate(code) for o in c.outputs if o.output_type == "error"]
    assert not failures, f"cells raised in JupyterLab: {failures}"
    assert code[-1].outputs, "the last cell has no output"
    assert not errors, f"JavaScript errors in JupyterLab: {errors}"
