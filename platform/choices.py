"""`Choice`: the base of every named option of the configuration (an enumeration of strings)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A named option: compares equal to its value and prints as it (Python 3.11's f-strings print a plain
    ``str, Enum`` member as ``Class.member``), so code may compare with the plain string and messages show the value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
