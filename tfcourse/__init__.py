"""tfcourse: reference PyTorch implementations for an executable course on attention and transformers.

Each module mirrors a part of the book: :mod:`tfcourse.attention` (chapter 1 onwards),
:mod:`tfcourse.device` (device, seeding and the ``TFCOURSE_SCALE`` knob) and :mod:`tfcourse.viz` (figures and
widgets).
"""

__version__ = "0.1.0"
