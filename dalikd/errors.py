"""The one exception type for user mistakes and bad input."""


class DalikdError(Exception):
    """A problem the user can fix (a bad flag, a missing file, a wrong folder).

    The CLI prints it as a single line and exits non-zero, without a traceback. Anything else
    that escapes is a bug in dalikd and keeps its traceback.
    """
