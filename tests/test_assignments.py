"""The graded assignments (nbgrader), end to end, for every folder ``solutions/<assignment>/``.

* the committed student version ``exercises/<assignment>/`` is exactly what ``nbgrader generate_assignment``
  makes from the source today (``make assignments`` regenerates it);
* no solution code, hidden test or mark scheme of the source appears anywhere in ``exercises/``;
* autograding the source (the instructor's solution) gives full marks on every autograded test cell, and runs
  without an error anywhere;
* autograding the untouched student version gives 0, every test failing on the stubs' ``NotImplementedError``,
  without the grader failing;
* a submission that loops forever is interrupted by the per-cell timeout, scored 0, in bounded time.

nbgrader runs as a subprocess of this virtual environment in a throw-away course directory, configured by a copy of
the repository's ``nbgrader_config.py`` (which derives the course root from its own location), with its own
gradebook; scores are read back with :class:`nbgrader.api.Gradebook`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "solutions"
EXERCISES = REPO / "exercises"
ASSIGNMENTS = sorted(p.name for p in SOLUTIONS.glob("[0-9]*") if p.is_dir())
BIN = Path(sys.executable).parent  # the virtual environment's bin: nbgrader, and alembic, which nbgrader calls
COURSE_ID = "tfcourse"

SOLUTION_STUDENT = "solution"  # submits the instructor source as it is
UNTOUCHED_STUDENT = "untouched"  # submits the student version as released
LOOPING_STUDENT = "looping"  # replaces the first solution cell of each notebook by an infinite loop
LOOP = "while True:\n    pass"
LOOP_TIMEOUT_S = 15  # per-cell timeout of the looping student's grading run (the course's is 60 s); importing torch
# on two loaded cores can take 5 s, so a shorter one fails a well-behaved cell too

# The grading kernels talk to nbgrader over Unix sockets named after the course directory, not over TCP ports. The
# `graded` fixture runs two graders at once (each course directory copies this config, so each gets its own
# sockets); over TCP, jupyter_client picks each kernel's five ports by binding and releasing them, and a kernel
# starting at the same moment can take one of them first, so that the first kernel never answers ("didn't respond
# in 120 seconds"), a failure seen once in a full run.
KERNELS_OVER_IPC = """
c.KernelManager.transport = "ipc"
c.KernelManager.ip = str(Path(__file__).resolve().parent / "kernel-ipc")
"""

REGIONS = {  # nbgrader's delimiters of what students must never see
    "solution": ("BEGIN SOLUTION", "END SOLUTION"),
    "hidden tests": ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS"),
    "mark scheme": ("BEGIN MARK SCHEME", "END MARK SCHEME"),
}
# Lines too generic to betray a solution when they turn up in the student version.
TRIVIAL_LINE = re.compile(r"""^(#.*|pass|else:|try:|finally:|return|break|continue|[)\]}]+[,:]?|\"\"\"|''')?$""")

pytestmark = pytest.mark.skipif(not ASSIGNMENTS, reason="no assignment under solutions/")


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

class Nbgrader:
    """``nbgrader *args`` started in the course directory ``course``, isolated from the user's Jupyter setup.

    It runs in the background (its own process group, output in ``<course>/nbgrader-<command>.log``), so that two
    gradings can overlap; :meth:`wait` collects it.
    """

    def __init__(self, course: Path, *args: str):
        jupyter_home = course / ".jupyter-home"
        env = {
            **os.environ,
            # nbgrader runs `alembic` from PATH when it creates a gradebook; kernels run this environment's python.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"),
            "JUPYTER_DATA_DIR": str(jupyter_home / "data"),
            "JUPYTER_RUNTIME_DIR": str(jupyter_home / "runtime"),
        }
        self.command = " ".join(("nbgrader", *args))
        self.log_path = course / f"nbgrader-{args[0]}.log"
        with self.log_path.open("w") as log:
            self.start = time.monotonic()
            self.proc = subprocess.Popen(
                [str(BIN / "nbgrader"), *args], cwd=course, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.elapsed = None
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.elapsed = time.monotonic() - self.start

    def wait(self, timeout: float) -> "Nbgrader":
        """Wait for the command to end; past ``timeout`` seconds, kill it and fail the test."""
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            self.kill()
            pytest.fail(f"`{self.command}` still ran after {timeout} s:\n{self.log[-6000:]}")
        return self

    def kill(self) -> None:
        """Kill nbgrader if it still runs (its kernels, in sessions of their own, exit when their parent dies)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._waiter.join()

    @property
    def returncode(self) -> int:
        return self.proc.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_nbgrader(course: Path, *args: str, timeout: float = 300) -> Nbgrader:
    return Nbgrader(course, *args).wait(timeout)


def notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.ipynb"))


def grade_cells(nb: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata.nbgrader.grade_id: c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")}


def split_regions(source: str) -> tuple[dict[str, list[str]], list[str]]:
    """A cell's lines inside each kind of secret region (delimiters left out), and the lines outside all of them."""
    inside, outside, kind = {k: [] for k in REGIONS}, [], None
    for line in source.splitlines():
        starts = [k for k, (begin, _) in REGIONS.items() if begin in line]
        if starts:
            kind = starts[0]
        elif kind is not None and REGIONS[kind][1] in line:
            kind = None
        else:
            (inside[kind] if kind else outside).append(line)
    return inside, outside


def fragments(line: str) -> set[str]:
    """A stripped secret line, without its trailing comment, and the expression it returns or assigns."""
    line = line.strip()
    code = re.sub(r"\s+#.*$", "", line)
    out = {line, code}
    expression = re.match(r"^(?:return\s+|[\w.\[\], ]+\s*=\s*)(.+)$", code)
    if expression and len(expression.group(1)) >= 12:
        out.add(expression.group(1))
    return {f for f in out if not TRIVIAL_LINE.match(f)}


def secrets_of(assignment: str) -> dict[str, set[str]]:
    """Fragments of each kind of secret region of the source (lines, code without comments, the expressions
    returned or assigned) that appear nowhere in the source outside such regions."""
    secret, public = {kind: set() for kind in REGIONS}, []
    for path in notebooks(SOLUTIONS / assignment):
        for cell in nbformat.read(path, as_version=4).cells:
            inside, outside = split_regions(cell.source)
            for kind, lines in inside.items():
                secret[kind].update(f for line in lines for f in fragments(line))
            public.extend(outside)
    public_text = "\n".join(public)
    return {kind: {f for f in found if f not in public_text} for kind, found in secret.items()}


def all_text(folder: Path) -> str:
    """Every string in every file under ``folder``: notebooks parsed (cell sources, outputs, metadata), not JSON."""

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    texts = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        texts.append("\n".join(strings(json.loads(raw))) if path.suffix == ".ipynb" else raw)
    return "\n".join(texts)


def differences(a: nbformat.NotebookNode, b: nbformat.NotebookNode) -> list[str]:
    """What differs between two notebooks: the top-level entries, else the cells by index and id."""
    if len(a.cells) != len(b.cells):
        return [f"the number of cells ({len(a.cells)} vs {len(b.cells)})"]
    diff = [f"cell {i} ({x.get('id')})" for i, (x, y) in enumerate(zip(a.cells, b.cells)) if x != y]
    keys = sorted((set(a) | set(b)) - {"cells"})
    return diff + [f"the notebook's {key}" for key in keys if a.get(key) != b.get(key)]


def make_course(root: Path, assignment: str) -> Path:
    """A course directory with the repository's config and sources, and the assignment generated afresh."""
    course = root / "course"
    course.mkdir()
    shutil.copy(REPO / "nbgrader_config.py", course)
    with (course / "nbgrader_config.py").open("a") as config:
        config.write(KERNELS_OVER_IPC)
    shutil.copytree(SOLUTIONS / assignment, course / "solutions" / assignment)
    proc = run_nbgrader(course, "generate_assignment", assignment)
    assert proc.returncode == 0, f"nbgrader generate_assignment {assignment} failed:\n{proc.log[-6000:]}"
    return course


def submit(course: Path, assignment: str, student: str, folder: Path, edit=None) -> None:
    """Put the notebooks of ``folder`` (optionally changed by ``edit(nb)``) under submitted/<student>/."""
    dest = course / "submitted" / student / assignment
    dest.mkdir(parents=True)
    for path in notebooks(folder):
        nb = nbformat.read(path, as_version=4)
        if edit is not None:
            edit(nb)
        nbformat.write(nb, dest / path.name)


def scores(course: Path, assignment: str, student: str) -> dict[str, dict]:
    """``{notebook/grade_id: {auto_score, max_score, cell_type, needs_manual_grade}}`` from the gradebook."""
    from nbgrader.api import Gradebook  # slow to import (it pulls in jupyter_server): only where needed

    out = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for notebook in gb.find_assignment(assignment).notebooks:
            submitted = gb.find_submission_notebook(notebook.name, assignment, student)
            for grade in submitted.grades:
                out[f"{notebook.name}/{grade.name}"] = dict(
                    auto_score=grade.auto_score, max_score=grade.max_score, cell_type=grade.cell_type,
                    needs_manual_grade=grade.needs_manual_grade,
                )
    return out


def autograded(course: Path, assignment: str, student: str) -> list[nbformat.NotebookNode]:
    found = notebooks(course / "autograded" / student / assignment)
    assert found, f"no autograded notebook for {student}"
    return [nbformat.read(p, as_version=4) for p in found]


def errors(cell: nbformat.NotebookNode) -> list[str]:
    return [o.ename for o in cell.get("outputs", []) if o.output_type == "error"]


def error_report(nbs: list[nbformat.NotebookNode]) -> str:
    """The cells that raised, each with the end of its traceback (ANSI colours removed)."""
    report = []
    for nb in nbs:
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.output_type == "error":
                    tail = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.traceback)).strip().splitlines()[-6:]
                    report.append(f"--- cell {cell.get('id')}: {out.ename}\n" + "\n".join(tail))
    return "\n".join(report)


# --------------------------------------------------------------------------------------------------------------
# Fixtures: one course directory per assignment, graded once for the solution and the untouched version
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=ASSIGNMENTS)
def course(request, tmp_path_factory) -> tuple[Path, str]:
    assignment = request.param
    return make_course(tmp_path_factory.mktemp(assignment), assignment), assignment


def is_solution(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "code" and bool(cell.metadata.get("nbgrader", {}).get("solution"))


def loop_forever(nb: nbformat.NotebookNode) -> None:
    """The first solution cell loops forever; the later ones stay the student version's stubs. One loop shows the
    timeout at work (each costs the whole timeout), and the stubs after it show that grading goes on after it."""
    first = next((cell for cell in nb.cells if is_solution(cell)), None)
    if first is not None:
        first.source = LOOP


@pytest.fixture(scope="module")
def graded(course):
    """Three submissions, autograded: the solution and the untouched student version in the course directory,
    with the course's configuration; at the same time, the looping one in a copy of it whose configuration has a
    short timeout (two directories, since two nbgrader processes must not share one SQLite gradebook)."""
    course_dir, assignment = course
    looping_dir = course_dir.parent / "course-looping"
    shutil.copytree(course_dir, looping_dir)  # the generated assignment and its gradebook, ready to grade
    with (looping_dir / "nbgrader_config.py").open("a") as config:
        config.write(f"\nc.Execute.timeout = {LOOP_TIMEOUT_S}\n")
    submit(looping_dir, assignment, LOOPING_STUDENT, looping_dir / "exercises" / assignment, edit=loop_forever)
    looping = Nbgrader(looping_dir, "autograde", assignment, "--create")

    submit(course_dir, assignment, SOLUTION_STUDENT, SOLUTIONS / assignment)
    submit(course_dir, assignment, UNTOUCHED_STUDENT, course_dir / "exercises" / assignment)
    try:
        main = run_nbgrader(course_dir, "autograde", assignment, "--create", timeout=600)
        assert main.returncode == 0, f"nbgrader autograde failed:\n{main.log[-6000:]}"
        yield dict(assignment=assignment, course=course_dir, looping_course=looping_dir, looping=looping)
    finally:
        looping.kill()


# --------------------------------------------------------------------------------------------------------------
# Tests that need no grading
# --------------------------------------------------------------------------------------------------------------

def test_config_sets_the_course_layout_and_a_cell_timeout():
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(REPO)).load_config()
    assert cfg.CourseDirectory.root == str(REPO)
    assert (cfg.CourseDirectory.source_directory, cfg.CourseDirectory.release_directory) == ("solutions", "exercises")
    assert cfg.CourseDirectory.course_id == COURSE_ID
    assert isinstance(cfg.Execute.timeout, int) and 0 < cfg.Execute.timeout <= 600
    assert cfg.Execute.interrupt_on_timeout is True


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_sources_are_clean(assignment):
    """Sources carry no outputs, and their solution cells do not lean on the reference package."""
    for path in notebooks(SOLUTIONS / assignment):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("solution") and cell.cell_type == "code":
                assert "tfcourse" not in cell.source, f"{path.name}, {meta['grade_id']}: solutions may not use tfcourse"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_no_solution_or_hidden_test_in_exercises(assignment):
    secrets = secrets_of(assignment)
    assert secrets["solution"], "found no solution region in the source: is the check looking at the right thing?"
    text = all_text(EXERCISES)
    assert text, "exercises/ is empty: run `make assignments`"
    for kind, (begin, end) in REGIONS.items():
        assert begin not in text and end not in text, f"a {kind} delimiter is left in exercises/"
        leaked = sorted(line for line in secrets[kind] if line in text)
        assert not leaked, f"{kind} of {assignment} found in exercises/:\n" + "\n".join(leaked)


# --------------------------------------------------------------------------------------------------------------
# Tests that run nbgrader (about 40 s for one assignment on 2 cores: nbgrader takes ~5 s to start, the gradebook's
# creation ~5 s more, a kernel with torch ~3 s; the looping submission is graded alongside the others)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_committed_exercises_equal_a_fresh_generation(course):
    course_dir, assignment = course
    fresh_dir, committed_dir = course_dir / "exercises" / assignment, EXERCISES / assignment
    stale = "exercises/ is stale: run `make assignments` and commit the result"
    fresh_files = sorted(p.relative_to(fresh_dir) for p in fresh_dir.rglob("*") if p.is_file())
    committed_files = sorted(p.relative_to(committed_dir) for p in committed_dir.rglob("*") if p.is_file())
    assert committed_files == fresh_files, stale
    for rel in fresh_files:
        if rel.suffix != ".ipynb":
            assert (committed_dir / rel).read_bytes() == (fresh_dir / rel).read_bytes(), f"{rel}: {stale}"
            continue
        fresh, committed = (nbformat.read(d / rel, as_version=4) for d in (fresh_dir, committed_dir))
        # Cell by cell: source, cell type, id, the nbgrader metadata (with its checksums), any outputs.
        diff = differences(committed, fresh)
        assert not diff, f"{rel}: {', '.join(diff)} differ; {stale}"


@pytest.mark.slow
def test_solution_gets_full_marks(graded):
    course_dir, assignment = graded["course"], graded["assignment"]
    got = scores(course_dir, assignment, SOLUTION_STUDENT)
    auto = {name: s for name, s in got.items() if s["cell_type"] == "code"}
    assert auto, "no autograded test cell"
    lost = {name: f"{s['auto_score']}/{s['max_score']}" for name, s in auto.items()
            if s["auto_score"] != s["max_score"]}
    # Not only the test cells: no cell of the graded solution may raise.
    report = error_report(autograded(course_dir, assignment, SOLUTION_STUDENT))
    assert not lost and not report, f"the solution loses points: {lost}\n{report}"
    # Written answers wait for a human.
    assert all(s["needs_manual_grade"] for s in got.values() if s["cell_type"] == "markdown")


@pytest.mark.slow
def test_untouched_student_version_gets_zero(graded):
    course_dir, assignment = graded["course"], graded["assignment"]
    got = scores(course_dir, assignment, UNTOUCHED_STUDENT)
    auto = {name: s["auto_score"] for name, s in got.items() if s["cell_type"] == "code"}
    assert auto and all(score == 0 for score in auto.values()), auto
    # Each test fails because it reaches a stub, not for an unrelated reason.
    for nb in autograded(course_dir, assignment, UNTOUCHED_STUDENT):
        for grade_id, cell in grade_cells(nb).items():
            if cell.cell_type == "code":
                assert errors(cell) == ["NotImplementedError"], f"{grade_id} fails with {errors(cell)}"


@pytest.mark.slow
def test_infinite_loop_is_interrupted_and_scores_zero(graded):
    course_dir, assignment = graded["looping_course"], graded["assignment"]
    n_loops = sum(any(is_solution(cell) for cell in nbformat.read(path, as_version=4).cells)
                  for path in notebooks(SOLUTIONS / assignment))  # one per notebook with a solution cell
    # Each loop costs the timeout; the rest (nbgrader, a kernel, torch) well under the slack, even on 2 loaded cores.
    bound = n_loops * LOOP_TIMEOUT_S + 120
    proc = graded["looping"].wait(timeout=bound + 60)
    assert proc.returncode == 0, f"nbgrader autograde failed on an infinite loop:\n{proc.log[-6000:]}"
    assert proc.elapsed < bound, f"grading {n_loops} infinite loops took {proc.elapsed:.0f} s"

    got = scores(course_dir, assignment, LOOPING_STUDENT)
    auto = {name: s["auto_score"] for name, s in got.items() if s["cell_type"] == "code"}
    assert auto and all(score == 0 for score in auto.values()), auto
    # Every loop was stopped by the timeout (nbgrader records a CellTimeoutError), and grading went on after it.
    stopped = [cell for nb in autograded(course_dir, assignment, LOOPING_STUDENT) for cell in nb.cells
               if cell.source == LOOP]
    assert len(stopped) == n_loops > 0
    assert all("CellTimeoutError" in errors(cell) for cell in stopped), [errors(c) for c in stopped]
    # ... and the kernel went on to run every code cell after the loop (the stubs and the tests).
    for nb in autograded(course_dir, assignment, LOOPING_STUDENT):
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        loop_at = next((i for i, cell in enumerate(code) if cell.source == LOOP), None)
        if loop_at is None:
            continue  # a notebook without a solution cell
        after = code[loop_at + 1:]
        assert after and all(cell.execution_count is not None for cell in after), \
            [cell.get("id") for cell in after if cell.execution_count is None]
    assert f"Timeout waiting for execute reply ({LOOP_TIMEOUT_S}s)" in proc.log, "the short timeout was not used"
