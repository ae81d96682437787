"""One fallback-warning helper for both native operators: said once per message."""

from __future__ import annotations

import warnings

from dalikd import native


def test_a_fallback_message_is_warned_once_as_given():
    native.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                native._warn("dalikd: test fallback A")
                native._warn("dalikd: test fallback B")
        got = [(w.category, str(w.message)) for w in caught]
        assert got == [
            (RuntimeWarning, "dalikd: test fallback A"),
            (RuntimeWarning, "dalikd: test fallback B"),
        ]
        assert not hasattr(native, "_warn_resize")  # the resize fallback uses _warn too
    finally:
        native.reset()
