"""``make grade`` (tfcourse.grading): a class of submissions of one assignment, good and bad, graded in one run.

The class, for ``01_attention`` (12 points: 10 autograded, 2 by hand):

* ``a_not_json``: the file is not JSON; ``b_not_a_notebook``: JSON, but not a notebook;
* ``c_missing``: the folder holds another file, not ``01_attention.ipynb``;
* ``d_raises``: the solution, except that the cell of task 2 raises before defining its class;
* ``e_loops``: the solution, except that the cell of task 1 loops forever;
* ``f_deletes_tests``: task 1 solved, the other tasks untouched, every test cell deleted;
* ``g_kills_grader``: a cell kills its kernel's parent process, the grader itself;
* ``z_good``: the solution, graded after all of them (by a worker restarted after ``g_kills_grader``).

One grading run (a per-cell timeout of 5 s, about 80 s on 2 busy cores) serves every test: each bad case is
graded or reported, and the good student, graded last, still gets full marks.
"""

from __future__ import annotations

import copy
import csv
import time
from pathlib import Path

import nbformat
import pytest

from tfcourse import grading

REPO = Path(__file__).resolve().parents[1]
ASSIGNMENT = "01_attention"
SOLUTION = REPO / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
STUDENT_VERSION = REPO / "exercises" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
TIMEOUT_S = 5
AUTOGRADED_POINTS = {"test_masked_softmax": 1, "test_masked_softmax_fully_masked": 2, "test_additive_score": 3,
                     "test_scaled_dot_product_attention": 2, "test_scaled_dot_product_attention_masks": 2}

pytestmark = pytest.mark.skipif(not SOLUTION.is_file() or not STUDENT_VERSION.is_file(),
                                reason=f"assignment {ASSIGNMENT} not found")


def cell(nb: nbformat.NotebookNode, grade_id: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def make_class(folder: Path) -> None:
    solution, student_version = (nbformat.read(p, as_version=4) for p in (SOLUTION, STUDENT_VERSION))

    def put(student: str, nb=None, text: str | None = None, name: str = f"{ASSIGNMENT}.ipynb") -> None:
        dest = folder / student / ASSIGNMENT
        dest.mkdir(parents=True)
        if nb is not None:
            nbformat.write(nb, dest / name)
        else:
            (dest / name).write_text(text)

    put("a_not_json", text='{"cells": [ {"cell_type": "code", "source": "unfinished')
    put("b_not_a_notebook", text='{"answer": 42}')
    put("c_missing", text="def masked_softmax(scores, mask=None): ...", name="answers.py")
    raises = copy.deepcopy(solution)
    cell(raises, "additive_score").source = 'raise RuntimeError("not finished yet")'
    put("d_raises", raises)
    loops = copy.deepcopy(solution)
    cell(loops, "masked_softmax").source = "while True:\n    pass"
    put("e_loops", loops)
    deletes = copy.deepcopy(student_version)
    cell(deletes, "masked_softmax").source = cell(solution, "masked_softmax").source
    deletes.cells = [c for c in deletes.cells
                     if not (c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade"))]
    assert all(gid not in {c.metadata.get("nbgrader", {}).get("grade_id") for c in deletes.cells}
               for gid in AUTOGRADED_POINTS)
    put("f_deletes_tests", deletes)
    kills = copy.deepcopy(solution)
    cell(kills, "masked_softmax").source = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"
    put("g_kills_grader", kills)
    put("z_good", copy.deepcopy(solution))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grading")
    make_class(root / "submissions")
    out = root / "graded"
    start = time.monotonic()
    records = grading.grade(root / "submissions", out, timeout=TIMEOUT_S, log=lambda message: None)
    elapsed = time.monotonic() - start
    with (out / "grades.csv").open() as f:
        grades = {row["student_id"]: row for row in csv.DictReader(f)}
    with (out / "report.csv").open() as f:
        report = {row["student_id"]: row for row in csv.DictReader(f)}
    return dict(out=out, records={r.student: r for r in records}, grades=grades, report=report, elapsed=elapsed)


def scores(out: Path, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{out / 'gradebook.db'}", "tfcourse") as gb:
        submitted = gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, student)
        return {g.name: g.auto_score for g in submitted.grades if g.cell_type == "code"}


def test_every_student_has_a_row_and_a_status(run):
    expected = {"a_not_json", "b_not_a_notebook", "c_missing", "d_raises", "e_loops", "f_deletes_tests",
                "g_kills_grader", "z_good"}
    assert set(run["grades"]) == set(run["report"]) == set(run["records"]) == expected
    # Only readable notebooks reach nbgrader's submitted/ folder.
    assert {p.name for p in (run["out"] / "submitted").iterdir()} == expected - {"a_not_json", "b_not_a_notebook",
                                                                                   "c_missing"}
    assert all(float(row["max_score"]) == 12 for row in run["grades"].values())
    # Bounded time: one loop of 5 s, one worker restart; the rest is nbgrader, kernels and torch on 2 cores.
    assert run["elapsed"] < 400, f"grading took {run['elapsed']:.0f} s"


def test_the_good_student_keeps_full_marks(run):
    student = "z_good"
    assert run["report"][student]["status"] == "graded"
    assert scores(run["out"], student) == AUTOGRADED_POINTS
    assert float(run["grades"][student]["score"]) == sum(AUTOGRADED_POINTS.values())
    assert run["report"][student]["needs_manual_grade"] == "1", "the written answer waits for a human"
    assert (run["out"] / "feedback" / student / ASSIGNMENT / f"{ASSIGNMENT}.html").is_file()


@pytest.mark.parametrize("student, why", [
    ("a_not_json", "is not valid JSON"),
    ("b_not_a_notebook", "is not a valid notebook"),
    ("c_missing", "missing: no c_missing/01_attention/01_attention.ipynb (found: answers.py)"),
])
def test_unreadable_or_missing_submissions_are_reported_with_zero(run, student, why):
    assert run["report"][student]["status"] == "not graded"
    assert why in run["report"][student]["notes"]
    assert float(run["grades"][student]["score"]) == 0
    assert not (run["out"] / "autograded" / student).exists()


def test_a_cell_that_raises_costs_only_its_tests(run):
    got = scores(run["out"], "d_raises")
    assert got == {**AUTOGRADED_POINTS, "test_additive_score": 0}
    assert "raised: additive_score (RuntimeError), test_additive_score (NameError)" in run["report"]["d_raises"]["notes"]


def test_an_endless_loop_is_interrupted_and_grading_goes_on(run):
    got = scores(run["out"], "e_loops")
    # masked_softmax never got defined: its tests fail, and so do those of scaled_dot_product_attention, which
    # calls it; the additive score (task 2) does not depend on it and keeps its 3 points.
    assert got == {name: (3 if name == "test_additive_score" else 0) for name in AUTOGRADED_POINTS}
    assert "timed out (interrupted): masked_softmax" in run["report"]["e_loops"]["notes"]
    nb = nbformat.read(run["out"] / "autograded" / "e_loops" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    assert "CellTimeoutError" in [o.ename for o in cell(nb, "masked_softmax").outputs if o.output_type == "error"]


def test_deleted_test_cells_are_restored_and_run(run):
    got = scores(run["out"], "f_deletes_tests")
    # Only task 1 is solved: exactly its tests score, the restored tests of the stubs fail.
    assert got == {name: (p if name.startswith("test_masked_softmax") else 0) for name, p in AUTOGRADED_POINTS.items()}
    assert "deleted cells restored and run: " in run["report"]["f_deletes_tests"]["notes"]
    nb = nbformat.read(run["out"] / "autograded" / "f_deletes_tests" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb",
                       as_version=4)
    for grade_id in AUTOGRADED_POINTS:
        assert grading.RESTORED in cell(nb, grade_id).source


def test_a_submission_that_kills_the_grader_is_reported_and_the_rest_is_graded(run):
    row = run["report"]["g_kills_grader"]
    assert row["status"] == "not graded" and "the grader died on this submission" in row["notes"]
    assert float(run["grades"]["g_kills_grader"]["score"]) == 0
    assert run["report"]["z_good"]["status"] == "graded"  # graded by the restarted worker


def test_the_output_folder_of_another_program_is_never_overwritten(tmp_path):
    (tmp_path / "submissions" / "s" / ASSIGNMENT).mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="was not made by tfcourse.grading"):
        grading.grade(tmp_path / "submissions", tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(ValueError, match="no student folder"):
        grading.grade(tmp_path / "mine", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown assignment"):
        grading.grade(tmp_path / "submissions", tmp_path / "out", assignments=["99_nothing"])
