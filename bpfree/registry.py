"""Names -> registered things, one `Registry` per kind (models, learning rules, datasets), as timm's.

    MODELS = Registry("model")
    MODELS.register("mlp", build_mlp, "a multilayer perceptron")
    MODELS.get("mlp"); MODELS.describe("resnet*")   # {name: description}, fnmatch-filtered
"""
from __future__ import annotations

import fnmatch
from typing import Generic, Iterator, Optional, TypeVar

from .errors import BpfreeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered things of one kind, each with a one-line description.

    `register` refuses a name twice; `get` names the choices when a name is unknown. Listing is in
    name order, or in registration order with `sort=False` (when the order carries meaning).
    """

    def __init__(self, kind: str, *, sort: bool = True):
        self.kind = kind
        self.sort = sort
        self._entries: dict[str, tuple[T, str]] = {}

    def register(self, name: str, item: T, description: str = "") -> T:
        if name in self._entries:
            raise BpfreeError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = (item, description)
        return item

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise BpfreeError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name][0]

    def names(self, pattern: Optional[str] = None) -> list[str]:
        """Registered names, those matching a shell-style `pattern` ("resnet*", "*lra*") when given."""
        names = sorted(self._entries) if self.sort else list(self._entries)
        return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def describe(self, pattern: Optional[str] = None) -> dict[str, str]:
        """Name -> description, for the names `names(pattern)` lists."""
        return {n: self._entries[n][1] for n in self.names(pattern)}

    def copy(self) -> "Registry[T]":
        """An independent registry with the same entries (tests register into a copy)."""
        other = Registry(self.kind, sort=self.sort)
        other._entries = dict(self._entries)
        return other

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
