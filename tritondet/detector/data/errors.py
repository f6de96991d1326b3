"""The error for input a user can fix: a file, an annotation, an image, a checkpoint or an option that is bad.

The data and training code raise :class:`InputError` with a message naming the culprit (the file, and the
annotation id or key) and what is wrong with it; ``tritondet``'s command line prints that one line and exits
with status 2, where any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """The user's input is bad; the message names the file (and annotation id or key) and what is wrong."""
