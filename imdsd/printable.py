"""Text from others made safe to print on a terminal (sans-IO).

Process names, hook names and errors reach ``imdsd status`` from processes imdsd does not
control; a control character in them (``ESC [2J``, ``ESC ]0;title``, a carriage return, a
bidi override) would act on the reader's terminal. :func:`printable` shows each such
character as a Python escape (``\\x1b``) instead.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character (``str.isprintable``) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
