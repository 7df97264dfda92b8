"""Datasets: read a source into rows, detect its format, normalise and validate every row.

``load_rows`` → ``normalise`` gives ``Example`` objects of four kinds (chat, completion, text,
preference) that the templating and label code downstream consumes, whatever the input format was.
"""

from tunesmith.data.builtin import BUILTIN_NAME, builtin_preference, builtin_task
from tunesmith.data.formats import FORMATS, Example, NormalisedData, detect_format, normalise
from tunesmith.data.sources import load_rows

__all__ = [
    "BUILTIN_NAME", "FORMATS", "Example", "NormalisedData", "builtin_preference", "builtin_task", "detect_format",
    "load_rows", "normalise",
]
