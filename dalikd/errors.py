"""The one exception type for user mistakes and bad input, and how a message shows the file
names in it (:func:`escape_text`)."""

from __future__ import annotations

import re
import unicodedata


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


# Characters that would change what a line shows or where it ends: controls (Cc: tab, newline,
# ESC, ...), line and paragraph separators (str.splitlines breaks at them), and the surrogate
# escapes of bytes that are not UTF-8 (Cs).
_UNSHOWN = frozenset(("Cc", "Cs", "Zl", "Zp"))
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogate)
        return f"\\x{ord(c) - 0xDC00:02x}"
    return f"\\u{ord(c):04x}"


def escape_text(text: str, backslash: bool = False) -> str:
    """``text`` (a file name, a message naming one) on one line, as shown: control characters
    as \\t, \\n, \\r or \\uHHHH, bytes that were not UTF-8 as \\xHH. ``backslash``: also \\ as
    \\\\, so that :func:`unescape_text` gives ``text`` back exactly (data_report.tsv)."""
    if text.isprintable() and not (backslash and "\\" in text):  # the common case
        return text
    out = []
    for c in text:
        if c == "\\" and backslash:
            out.append("\\\\")
        elif unicodedata.category(c) in _UNSHOWN:
            out.append(_escape_char(c))
        else:
            out.append(c)
    return "".join(out)


def unescape_text(text: str) -> str:
    """The inverse of ``escape_text(..., backslash=True)``; \\xHH gives the byte's surrogate,
    as os.fsdecode does, so the path names the same file."""

    def one(m: re.Match) -> str:
        code = m.group(1)
        if code == "\\":
            return "\\"
        if code in ("t", "n", "r"):
            return {"t": "\t", "n": "\n", "r": "\r"}[code]
        value = int(code[1:], 16)
        return chr(0xDC00 + value) if code[0] == "x" else chr(value)

    return _ESCAPE.sub(one, text) if "\\" in text else text
