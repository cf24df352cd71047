"""Header fields looked up case-insensitively (the standard library alone: the test server uses it too)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


class HeaderFields(Mapping[str, str]):
    """Read-only header fields, case-insensitive; a field sent more than once has its values joined with
    ``", "`` (as requests does). Iteration yields the names as they were sent (the first spelling of each)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        joined: dict[str, tuple[str, str]] = {}
        for name, value in fields.items() if isinstance(fields, Mapping) else fields:
            key = name.lower()
            seen = joined.get(key)
            joined[key] = (name, value) if seen is None else (seen[0], f"{seen[1]}, {value}")
        self._fields = joined

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._fields.values())

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"
