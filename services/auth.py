"""API keys: stored as sha256 hex digests, each granting the departments that list it.

To add a key, hash it and put the digest under the department in the service config:

    python -c "from ragpt_service.auth import hash_api_key; print(hash_api_key('the-secret-key'))"

    [departments.hr]
    api_keys = ["<that digest>"]

A key listed under several departments may use each of them (and `auto` routes among them).
Clients send it as `Authorization: Bearer <key>` (what the OpenAI client does with api_key=).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from ragpt_service.errors import ApiError


def hash_api_key(key: str) -> str:
    """The sha256 hex digest of an API key: the only form the config file stores."""
    if not isinstance(key, str) or not key:
        raise ValueError("an API key must be a non-empty string")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """Which departments a presented key may use."""

    def __init__(self, keys_by_department: Mapping[str, Iterable[str]], *, required: bool = True):
        self.required = required
        self.all_departments = frozenset(keys_by_department)
        grants: dict[str, set[str]] = {}
        for dept, digests in keys_by_department.items():
            for d in digests:
                grants.setdefault(d.lower(), set()).add(dept)
        self._grants = {d: frozenset(depts) for d, depts in grants.items()}

    def knows(self, key: str) -> bool:
        """Whether `key` is some department's key."""
        return bool(key) and hash_api_key(key) in self._grants

    def departments_for(self, authorization: str | None) -> frozenset[str]:
        """Departments the `Authorization` header grants; raises a 401 ApiError if it grants none."""
        if not self.required:
            return self.all_departments
        if not authorization:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key")
        # Comparing digests, not keys: the lookup time reveals nothing about a stored key.
        depts = self._grants.get(hash_api_key(key))
        if not depts:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return depts
