"""The one exception type cvfast raises for bad input; the CLI turns it into a message and exit code 1."""


class CvfastError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or row)."""


class DiskFull(CvfastError):
    """No space left where cvfast writes: an environment failure; the run stops, never publishes a partial result, and a re-run resumes."""
