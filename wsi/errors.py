"""The one error family of pathmil: everything a user can cause derives from `PathmilError`.

Every console script (`wsi`, `mil`, and the packages after them) turns a `PathmilError` into one line
on stderr and exit status 2; the traceback is shown only with `-v`. The messages name the file and
the fix. Subclasses also derive from the builtin a caller would have caught before (ValueError,
KeyError), so code written against those keeps working.
"""
from __future__ import annotations


class PathmilError(Exception):
    """A problem with the user's input, files or settings; the message says what to do."""


class StoreError(PathmilError):
    """The tile store is missing, of another kind, damaged, or asked for something it does not hold."""


class SlideError(PathmilError):
    """A slide file cannot be read or used (missing, truncated, no µm/px, no tissue)."""


class EncoderError(PathmilError, ValueError):
    """An encoder cannot be found, loaded or built (unknown name, gated, offline, bad weights)."""


class CohortError(PathmilError, ValueError):
    """A list of slides (files, folders, cohort CSV) cannot be used."""


class LabelsError(PathmilError, ValueError):
    """A labels CSV, class list or split that cannot be used."""


class AnnotationError(PathmilError, ValueError):
    """An annotation file (GeoJSON, ASAP XML) cannot be read."""


class RunError(PathmilError, ValueError):
    """A run folder or checkpoint that is missing, incomplete, changed or of another kind."""


__all__ = ["PathmilError", "StoreError", "SlideError", "EncoderError", "CohortError", "LabelsError",
           "AnnotationError", "RunError"]
