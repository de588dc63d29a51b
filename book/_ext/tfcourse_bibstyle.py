"""Sphinx extension: a bibliography whose labels read like the author-year citations in the text.

sphinxcontrib-bibtex renders ``{cite}`` as "Vaswani et al., 2017" (``bibtex_reference_style: author_year``), but
the "plain" pybtex style labels the bibliography [1], [2], ... This registers a pybtex formatting style,
``tfcourse``, whose labels are "Vaswani et al., 2017", sorted by author and year, so that a reader who follows a
citation finds the same words in the list.
"""

from __future__ import annotations

import pybtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle


def _last_name(person) -> str:
    return " ".join(Text.from_latex(part).render_as("text") for part in person.last_names)


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels "Surname, Year", "Surname and Other, Year" or "Surname et al., Year"; a, b, ... on clashes."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        counts = {label: labels.count(label) for label in labels}
        seen: dict[str, int] = {}
        for label in labels:
            if counts[label] > 1:
                seen[label] = seen.get(label, 0) + 1
                label = f"{label}{'abcdefghijklmnopqrstuvwxyz'[seen[label] - 1]}"
            yield label

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        year = entry.fields.get("year", "n.d.")
        if not people:
            return f"{entry.fields.get('title', entry.key)}, {year}"
        if len(people) == 1:
            names = _last_name(people[0])
        elif len(people) == 2:
            names = f"{_last_name(people[0])} and {_last_name(people[1])}"
        else:
            names = f"{_last_name(people[0])} et al."
        return f"{names}, {year}"


class AuthorYearStyle(PlainStyle):
    default_label_style = "tfcourse_author_year"
    default_sorting_style = "author_year_title"


def setup(app):
    pybtex.plugin.register_plugin("pybtex.style.labels", "tfcourse_author_year", AuthorYearLabelStyle)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "tfcourse", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
