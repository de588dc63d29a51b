"""Autograde a folder of submissions with nbgrader, robustly: ``make grade SUBMISSIONS=<folder>``.

Usage (from the repository root, with the virtual environment's ``bin`` on ``PATH``; ``make grade`` does that)::

    python -m tfcourse.grading SUBMISSIONS [--out graded] [--assignment 01_attention ...] [--timeout 60]

``SUBMISSIONS`` is laid out as nbgrader's ``submitted/`` directory: ``SUBMISSIONS/<student>/<assignment>/
<assignment>.ipynb`` (other files of the folder, such as the ``timestamp.txt`` of ``nbgrader collect``, are kept).
The assignments are the folders found under the students that name an assignment of ``solutions/`` (or those
given with ``--assignment``).

Everything is done by nbgrader itself (its Python API: ``generate_assignment``, ``autograde``,
``generate_feedback``, and its CSV export), in a fresh course directory ``--out``, which the run creates:

1. ``--out`` gets the course's ``nbgrader_config.py`` (so its per-cell timeout), the instructor sources of the
   assignments, and a gradebook in which ``generate_assignment`` records the graded cells, points and checksums.
2. Each submission is checked first. A student without the notebook, or whose file is not a valid notebook (not
   JSON, or not nbformat), is not graded but *reported*, and scores 0.
3. The others are autograded one student at a time, in a worker process watched by this one. In nbgrader's
   autograding every cell runs in a fresh kernel with the per-cell timeout (a cell that loops is interrupted, a
   cell that raises records its error, and grading goes on with the next cell); test cells and the other graded
   cells are replaced by the source's versions, and those a student deleted are put back
   (``OverwriteCells.add_missing_cells``), so that removing a test earns nothing. If the worker dies (a notebook
   that kills its kernel's parent) or overruns its time budget, the submission it was grading is reported as not
   graded, and a new worker grades the remaining ones: no submission can cost another student a grade.
4. Feedback (HTML) is generated for every graded submission, then the grades are exported.

Outputs, in ``--out``:

* ``grades.csv``: nbgrader's export, one row per student and assignment (score 0 where nothing was graded);
* ``report.csv``: ``student_id, assignment, status, score, max_score, needs_manual_grade, notes``, where status
  is ``graded`` or ``not graded`` and the notes say why (missing, invalid notebook, grader crash) or what happened
  (cells that raised or timed out, test cells restored);
* ``feedback/<student>/<assignment>/<assignment>.html``;
* the nbgrader course itself (``gradebook.db``, ``autograded/``, ...), for manual grading in the formgrader:
  ``cd <out> && jupyter lab`` (add ``--allow-root`` as root), *Nbgrader → Formgrader*; then
  ``nbgrader generate_feedback --force`` and ``nbgrader export`` there again.

Running again with the same ``--out`` starts from scratch (and so loses manual grades entered there); a folder
that is not the output of an earlier run is never overwritten.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

__all__ = ["Submission", "grade", "main"]

REPO = Path(__file__).resolve().parents[1]
MARKER = ".tfcourse-grading"  # marks a folder made by this module, which a later run may replace
MESSAGE = "@@tfcourse-grading "  # prefix of the worker's messages on its stdout
RESTORED = "was missing from the submission"  # in nbgrader's note on a restored cell (OverwriteCells)


@dataclass
class Submission:
    """One student's submission of one assignment, and what became of it."""

    student: str
    assignment: str
    status: str = "pending"  # "pending" (to grade), "graded" or "not graded"
    notes: list[str] = field(default_factory=list)
    score: float = 0.0
    max_score: float = 0.0
    needs_manual_grade: int = 0


# ----------------------------------------------------------------------------------------------------------------
# The supervisor: prepares the course directory, checks the submissions, runs and watches the workers, reports.
# ----------------------------------------------------------------------------------------------------------------

def grade(submissions: Path, out: Path, assignments: list[str] | None = None, timeout: int | None = None,
          solutions: Path = REPO / "solutions", config: Path = REPO / "nbgrader_config.py",
          log=print) -> list[Submission]:
    """Autograde ``submissions`` into the nbgrader course directory ``out``; return one record per submission.

    Args:
        submissions: a folder ``<student>/<assignment>/<assignment>.ipynb``.
        out: the output folder (created; replaced if it is the output of an earlier run).
        assignments: the assignments to grade (default: those of ``solutions`` found under the students).
        timeout: per-cell timeout in seconds (default: the course configuration's).
        solutions, config: the instructor sources and the nbgrader configuration of the course.

    Raises:
        ValueError: if ``submissions`` is not a folder, names no student, or no assignment to grade; or if ``out``
            exists, is not empty and was not made by this function.
        RuntimeError: if nbgrader cannot set up the course (e.g. ``generate_assignment`` fails on a source).
    """
    submissions, out = Path(submissions).resolve(), Path(out).resolve()
    if not submissions.is_dir():
        raise ValueError(f"submissions must be a folder <student>/<assignment>/<assignment>.ipynb, got {submissions}")
    students = sorted(p.name for p in submissions.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not students:
        raise ValueError(f"no student folder in {submissions}")
    known = sorted(p.name for p in Path(solutions).glob("[0-9]*") if p.is_dir())
    if assignments:
        unknown = sorted(set(assignments) - set(known))
        if unknown:
            raise ValueError(f"unknown assignment(s) {unknown}; the course has {known}")
    else:
        assignments = sorted({p.name for s in students for p in (submissions / s).iterdir()
                              if p.is_dir() and p.name in known})
        if not assignments:
            raise ValueError(f"no folder <student>/<assignment> in {submissions} names an assignment of {known}")

    _prepare(out, assignments, solutions, config, timeout)
    records = [_check(submissions, out, student, assignment) for student in students for assignment in assignments]
    for r in records:
        if r.status != "pending":
            log(f"{r.student}/{r.assignment}: not graded: {'; '.join(r.notes)}")

    budget = {a: _time_budget(out / "solutions" / a, out) for a in assignments}
    jobs = [("setup", a, "") for a in assignments]
    jobs += [("students", r.student, "") for r in records if r.status != "pending"]  # in the gradebook, with 0
    jobs += [("grade", r.assignment, r.student) for r in records if r.status == "pending"]
    jobs.append(("export", "", ""))
    by_key = {(r.assignment, r.student): r for r in records}
    for message in _run_workers(out, jobs, budget, log):
        kind, first, second = message["job"]
        if kind == "setup" and not message["success"]:
            raise RuntimeError(f"nbgrader generate_assignment {first} failed:\n{message.get('error', '')}")
        if kind == "grade":
            record = by_key[first, second]
            if message["success"]:
                record.status = "graded"
            else:
                record.status = "not graded"
                record.notes.append(message.get("reason") or "nbgrader could not grade it: "
                                    + _last_line(message.get("error", "")))
            if message.get("feedback_error"):
                record.notes.append("no feedback: " + _last_line(message["feedback_error"]))
            log(f"{second}/{first}: {record.status}" + (f" ({record.notes[-1]})" if record.notes else ""))
        if kind == "export" and not message["success"]:
            raise RuntimeError(f"nbgrader export failed:\n{message.get('error', '')}")
    _read_back(out, records)
    _write_report(out / "report.csv", records)
    return records


def _prepare(out: Path, assignments: list[str], solutions: Path, config: Path, timeout: int | None) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"{out} exists and was not made by tfcourse.grading: choose another output folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by tfcourse.grading; the next run replaces this folder\n")
    text = Path(config).read_text()
    text += ("\n# Added by tfcourse.grading (the course's configuration sets it too): put back graded cells a"
             " student deleted, so that they are run and scored.\nc.OverwriteCells.add_missing_cells = True\n")
    if timeout is not None:
        text += f"c.Execute.timeout = {int(timeout)}\n"
    (out / "nbgrader_config.py").write_text(text)
    for assignment in assignments:
        shutil.copytree(Path(solutions) / assignment, out / "solutions" / assignment)


def _check(submissions: Path, out: Path, student: str, assignment: str) -> Submission:
    """Copy a valid submission into ``out/submitted``; mark a missing or invalid one as not graded."""
    record = Submission(student, assignment)
    folder = submissions / student / assignment
    expected = [p.name for p in sorted((out / "solutions" / assignment).glob("*.ipynb"))]
    if not folder.is_dir():
        record.status, record.notes = "not graded", [f"missing: no folder {student}/{assignment}/"]
        return record
    for name in expected:
        path = folder / name
        if not path.is_file():
            others = sorted(p.name for p in folder.iterdir() if p.is_file())
            record.notes.append(f"missing: no {student}/{assignment}/{name}"
                                + (f" (found: {', '.join(others)})" if others else " (the folder is empty)"))
            continue
        try:
            nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))
        except (UnicodeDecodeError, json.JSONDecodeError, nbformat.reader.NotJSONError) as exc:
            record.notes.append(f"{name} is not valid JSON ({str(exc).splitlines()[0] if str(exc) else ''})"[:300])
        except Exception as exc:  # nbformat's ValidationError, or a JSON document that is no notebook at all
            record.notes.append(f"{name} is not a valid notebook ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})"[:300])
    if record.notes:
        record.status = "not graded"
        return record
    shutil.copytree(folder, out / "submitted" / student / assignment)
    return record


def _time_budget(source: Path, out: Path) -> float:
    """Seconds a worker may spend on one submission: every code cell at the per-cell timeout, plus start-up."""
    cfg = _config(out)
    per_cell = int(cfg.Execute.timeout) if "timeout" in cfg.Execute else 30
    cells = sum(1 for nb in source.glob("*.ipynb") for c in nbformat.read(nb, as_version=4).cells
                if c.cell_type == "code")
    return per_cell * (cells + 2) + 180


def _run_workers(out: Path, jobs: list[tuple[str, str, str]], budget: dict[str, float], log):
    """Run ``jobs`` in worker processes, yielding each job's result; restart a worker that dies or hangs."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    pending = list(jobs)
    worker_log = (out / "grading.log").open("a")
    try:
        while pending:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tfcourse.grading", "--worker", str(out), json.dumps(pending)],
                cwd=out, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=worker_log, text=True,
                start_new_session=True,
            )
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
            current, deadline = None, time.monotonic() + 600  # start-up and set-up
            while True:
                try:
                    line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
                except queue.Empty:
                    line = "timeout"
                if line is None or line == "timeout":
                    _kill(proc)
                    if current is None:
                        raise RuntimeError(f"the grading worker {'died' if line is None else 'hung'} before "
                                           f"starting a job; see {out / 'grading.log'}")
                    what = ("died" if line is None else f"ran past its budget of {budget.get(current[1], 0):.0f} s")
                    yield {"job": current, "success": False,
                           "reason": f"the grader {what} on this submission; it was stopped and is not graded"}
                    pending.remove(current)
                    if current[0] == "grade":  # the next worker first removes what the dead one left half done
                        pending.insert(0, ("forget", current[1], current[2]))
                    log(f"grading worker {what} on {current[2] or current[1]}; restarting it for the rest")
                    break
                if not line.startswith(MESSAGE):
                    continue
                message = json.loads(line[len(MESSAGE):])
                job = tuple(message["job"])
                if message["event"] == "start":
                    current = job
                    deadline = time.monotonic() + (budget.get(job[1], 300) if job[0] == "grade" else 600)
                else:
                    pending.remove(job)
                    current = None
                    deadline = time.monotonic() + 600
                    yield {**message, "job": job}
                    if not pending:
                        try:
                            proc.wait(timeout=60)
                        except subprocess.TimeoutExpired:
                            _kill(proc)
                        break
    finally:
        worker_log.close()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "unknown error"


def _config(out: Path):
    from traitlets.config.loader import PyFileConfigLoader

    return PyFileConfigLoader("nbgrader_config.py", path=str(out)).load_config()


def _read_back(out: Path, records: list[Submission]) -> None:
    """Scores from the gradebook, and notes from the autograded notebooks, for the report."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{out / 'gradebook.db'}", _config(out).CourseDirectory.course_id) as gb:
        for r in records:
            r.max_score = gb.find_assignment(r.assignment).max_score
            if r.status != "graded":
                continue
            try:
                submission = gb.find_submission(r.assignment, r.student)
            except MissingEntry:
                r.status, r.notes = "not graded", r.notes + ["no submission in the gradebook"]
                continue
            r.score = submission.score
            r.needs_manual_grade = sum(1 for nb in submission.notebooks for g in nb.grades if g.needs_manual_grade)
    for r in records:
        if r.status == "graded":
            r.notes += _notebook_notes(out / "autograded" / r.student / r.assignment)


def _notebook_notes(folder: Path) -> list[str]:
    raised, timed_out, restored = [], [], []
    for path in sorted(folder.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.metadata.get("nbgrader", {})
            name = meta.get("grade_id") or cell.get("id", "?")
            if RESTORED in cell.source:
                restored.append(name)
            errors = [o.ename for o in cell.get("outputs", []) if o.output_type == "error"]
            if "CellTimeoutError" in errors:  # (the interrupt also leaves a KeyboardInterrupt)
                timed_out.append(name)
            elif errors:
                raised.append(f"{name} ({', '.join(errors)})")
    notes = []
    if timed_out:
        notes.append("timed out (interrupted): " + ", ".join(timed_out))
    if raised:
        notes.append("raised: " + ", ".join(raised))
    if restored:
        notes.append("deleted cells restored and run: " + ", ".join(restored))
    return notes


def _write_report(path: Path, records: list[Submission]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_id", "assignment", "status", "score", "max_score", "needs_manual_grade", "notes"])
        for r in records:
            writer.writerow([r.student, r.assignment, r.status, f"{r.score:g}", f"{r.max_score:g}",
                             r.needs_manual_grade, "; ".join(r.notes)])


# ----------------------------------------------------------------------------------------------------------------
# The worker: runs nbgrader's API on a list of jobs, one message per job on stdout.
# ----------------------------------------------------------------------------------------------------------------

def _worker(out: Path, jobs: list[list[str]]) -> None:
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.plugins.export import CsvExportPlugin

    def say(event: str, job, **fields) -> None:
        print(MESSAGE + json.dumps({"event": event, "job": job, **fields}), flush=True)

    config = _config(out)
    coursedir = CourseDirectory(config=config)
    api = NbGraderAPI(coursedir=coursedir, config=config)
    for job in jobs:
        kind, first, second = job
        say("start", job)
        if kind == "setup":
            result = api.generate_assignment(first, force=True, create=True)
        elif kind == "students":
            with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
                gb.update_or_create_student(first)
            result = {"success": True}
        elif kind == "forget":  # after a worker died on this submission: no half-graded trace of it
            assignment, student = first, second
            with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
                gb.update_or_create_student(student)
                try:
                    gb.remove_submission(assignment, student)
                except Exception:
                    pass
            for folder in (coursedir.autograded_directory, coursedir.feedback_directory):
                shutil.rmtree(out / folder / student / assignment, ignore_errors=True)
            result = {"success": True}
        elif kind == "grade":
            assignment, student = first, second
            result = api.autograde(assignment, student, force=True, create=True)
            if result["success"]:
                feedback = api.generate_feedback(assignment, student, force=True)
                if not feedback["success"]:
                    result["feedback_error"] = feedback.get("error", "")
            else:
                with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
                    try:  # no half-graded submission: the export gives 0, the report says why
                        gb.remove_submission(assignment, student)
                    except Exception:
                        pass
        elif kind == "export":
            try:
                with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
                    CsvExportPlugin(to=str(out / "grades.csv"), config=config).export(gb)
                result = {"success": True}
            except Exception as exc:
                result = {"success": False, "error": repr(exc)}
        else:
            result = {"success": False, "error": f"unknown job {job}"}
        say("done", job, success=bool(result["success"]), error=result.get("error") or "",
            feedback_error=result.get("feedback_error") or "")


# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(Path(argv[1]), json.loads(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tfcourse.grading", description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", type=Path, help="folder <student>/<assignment>/<assignment>.ipynb")
    parser.add_argument("--out", type=Path, default=Path("graded"), help="output folder (default: graded)")
    parser.add_argument("--assignment", action="append", help="grade only this assignment (repeatable)")
    parser.add_argument("--timeout", type=int, help="per-cell timeout in seconds (default: nbgrader_config.py's)")
    args = parser.parse_args(argv)
    try:
        records = grade(args.submissions, args.out, args.assignment, args.timeout)
    except (ValueError, RuntimeError) as exc:
        print(f"grading failed: {exc}", file=sys.stderr)
        return 1
    width = max(len(r.student) for r in records)
    print(f"\n{'student':<{width}}  {'assignment':<14} {'status':<11} {'score':>11}  notes")
    for r in records:
        notes = r.notes + ([f"{r.needs_manual_grade} answer(s) to grade by hand"] if r.needs_manual_grade else [])
        print(f"{r.student:<{width}}  {r.assignment:<14} {r.status:<11} {r.score:>5g} / {r.max_score:<3g}  "
              f"{'; '.join(notes)}")
    graded = sum(r.status == "graded" for r in records)
    print(f"\n{graded} of {len(records)} submissions graded. Wrote {args.out / 'grades.csv'}, "
          f"{args.out / 'report.csv'} and {args.out / 'feedback'}/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
