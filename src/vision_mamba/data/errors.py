"""DatasetError: a dataset on disk is missing or not in the layout a loader expects."""

from __future__ import annotations


class DatasetError(Exception):
    """A problem with the user's data; the entry points print the message without a traceback."""

    user_error = True
