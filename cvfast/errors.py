"""cvfast's exceptions (CvfastError for bad input or environment, DiskFull for a full disk): the CLI turns them into a message and exit code 1."""

class CvfastError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or row)."""


class DiskFull(CvfastError):
    """No space left where cvfast writes: an environment failure; the run stops, never publishes a partial result, and a re-run resumes."""


def shown(value: object) -> str:
    """A cell's value as a message shows it: numbers plainly (2.0, nan; never np.float64(2.0)), text quoted."""
    item = getattr(value, "item", None)  # a NumPy scalar (this leaf module imports no NumPy)
    return repr(item() if callable(item) and getattr(value, "shape", None) == () else value)
