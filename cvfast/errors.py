"""The one exception type cvfast raises for bad input; the CLI turns it into a message and exit code 1."""


class CvfastError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or row)."""
