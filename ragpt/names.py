"""Names that become folder names or API identifiers (indexes, departments, prompt versions)."""

from __future__ import annotations

import re

from ragpt.errors import RagptError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RagptError(
            f"invalid {kind} name {value!r}: use letters, digits, '_', '-', '.' (max 64, "
            "starting with a letter or digit)"
        )
    return value
