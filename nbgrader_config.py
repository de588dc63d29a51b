"""nbgrader configuration for the graded assignments of tfcourse.

Layout (relative to the repository root, which is the nbgrader course directory)::

    solutions/<assignment>/<assignment>.ipynb   instructor source: solutions, hidden tests, mark schemes
    exercises/<assignment>/<assignment>.ipynb   student version, made by `make assignments` (committed)
    submitted/<student>/<assignment>/           collected submissions     (gitignored)
    autograded/<student>/<assignment>/          autograded submissions    (gitignored)
    feedback/<student>/<assignment>/            HTML feedback             (gitignored)
    gradebook.db                                SQLite gradebook          (gitignored)

Typical use, from the repository root with the virtual environment's ``bin`` on ``PATH``::

    make assignments                                   # regenerate exercises/ from solutions/
    nbgrader autograde 01_attention                    # grade everything under submitted/*/01_attention
    nbgrader generate_feedback 01_attention

Everything runs offline: the gradebook is a local SQLite file and the exchange (``nbgrader release_assignment`` /
``collect``, for a shared JupyterHub) is not used; submissions are copied into ``submitted/`` by hand or by the LMS.

Notes:

* The formgrader (manual grading in JupyterLab) runs inside a Jupyter server, which refuses to start as root
  unless told ``--allow-root`` (``c.ServerApp.allow_root = True`` in a *jupyter_server* config, not here); in a
  root container use ``jupyter lab --allow-root``. The command-line tools above do not need it.
* ``nbgrader generate_feedback`` does not remove hidden tests or mark schemes: feedback shows them to students.
"""

from pathlib import Path

c = get_config()  # noqa: F821 (injected by traitlets when nbgrader loads this file)

ROOT = Path(__file__).resolve().parent

c.CourseDirectory.course_id = "tfcourse"
c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
# A local SQLite gradebook next to this file (the default, spelled out so that it never depends on the cwd).
c.CourseDirectory.db_url = f"sqlite:///{ROOT / 'gradebook.db'}"

# Autograding: every cell of a submission gets at most this many seconds. A cell still running then (an infinite
# loop, a model too big for the grader) is interrupted, recorded as a CellTimeoutError and scores 0; the rest of
# the notebook still runs. A solution cell of the assignments here takes well under a second.
c.Execute.timeout = 60
c.Execute.interrupt_on_timeout = True
# Kernel start (importing torch) on a loaded grading machine.
c.Execute.startup_timeout = 120
# A graded cell (a test) that a student deleted is put back from the gradebook and run, so that deleting a test
# earns nothing (nbgrader's default leaves it out). Edited test cells are always replaced by the source's.
c.OverwriteCells.add_missing_cells = True

# What students see in place of a solution region.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
