"""The one exception type for user mistakes and bad input."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C out of a training run, naming its folder (``run_dir``), where a resume hint may
    point (the folder is decided inside the run when no --out was given)."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir


class DalikdError(Exception):
    """A problem the user can fix (a bad flag, a missing file, a wrong folder).

    The CLI prints it as a single line and exits non-zero, without a traceback. Anything else
    that escapes is a bug in dalikd and keeps its traceback.
    """
