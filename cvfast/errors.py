"""The one exception type cvfast raises for bad input; the CLI turns it into a message and exit code 1."""

import numpy as np


class CvfastError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or row)."""


def shown(value: object) -> str:
    """A cell's value as a message shows it: numbers plainly (2.0, nan; never np.float64(2.0)), text quoted."""
    return repr(value.item() if isinstance(value, np.generic) else value)
