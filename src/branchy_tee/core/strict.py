"""Strict reading of a JSON object into a typed artifact (``ModelCard``, ``BundleHeader``, ...).

Each artifact's ``parse()`` takes its members one at a time through :class:`Fields` and ends with
:meth:`Fields.done`, so that a missing member, a member of the wrong type and a member nobody
expects are all refused, each with one line naming the file and the member::

    model.btee/header.json: field 'stages[2].weight_bytes' must be an integer >= 0

JSON's numbers keep their Python type (an ``int`` stays an ``int``, ``True`` is never an integer),
so an artifact's ``to_json()`` gives back exactly the object it was parsed from. Standard library
only: the enclave parses its bundle header and requests with it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Callable, Mapping, NoReturn, TypeVar

from branchy_tee.core.errors import BranchyError, shown

T = TypeVar("T")


def hex_member(
    doc: Mapping[str, Any], name: str, size: int, error: Callable[[str], Exception], what: str = ""
) -> bytes:
    """Member ``name`` of ``doc``: ``size`` bytes as ``2 * size`` hex digits; ``error(reason)`` is
    raised otherwise (``what`` prefixes the reason)."""
    prefix = f"{what}: " if what else ""
    v = doc.get(name)
    if not isinstance(v, str) or len(v) != 2 * size:
        raise error(f"{prefix}'{name}' must be {size} bytes as {2 * size} hex digits")
    try:
        out = bytes.fromhex(v)
    except ValueError:
        out = b""
    if len(out) != size:  # (fromhex also skips whitespace)
        raise error(f"{prefix}'{name}' is not hex")
    return out


def iso8601(text: str) -> datetime:
    """An ISO 8601 time; a trailing ``Z`` means UTC. Naive when the text has no offset (the caller
    decides what that means). ValueError when it is not ISO 8601."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    return datetime.fromisoformat(t)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)  # type: ignore[arg-type]


class Fields:
    """The members of one JSON object, taken by name; what is left at :meth:`done` is refused.

    ``where`` names the file (or message) in every error, ``path`` the object within it
    (``"stages[2]."``); errors are raised as ``error`` (``BranchyError`` or a subclass)."""

    def __init__(self, doc: object, where: str, what: str, error: type[BranchyError] = BranchyError, path: str = ""):
        self.where, self.error, self.path = where, error, path
        if not isinstance(doc, dict):
            raise error(f"{where}: {path.rstrip('.') or what} is not a JSON object")
        self.doc: dict[str, Any] = doc
        self.taken: list[str] = []

    def fail(self, name: str, problem: str) -> NoReturn:
        raise self.error(f"{self.where}: field {shown(self.path + name, 60)} {problem}")

    def has(self, name: str) -> bool:
        return name in self.doc

    def _take(self, name: str) -> Any:
        if name not in self.doc:
            self.fail(name, "is missing")
        self.taken.append(name)
        return self.doc[name]

    def check(self, name: str, ok: Callable[[Any], bool], want: str) -> Any:
        """A member that ``ok`` accepts (``want`` says what it must be)."""
        v = self._take(name)
        if not ok(v):
            self.fail(name, f"must be {want}")
        return v

    def text(self, name: str, ok: Callable[[str], bool] = lambda v: True, want: str = "a string") -> str:
        v: str = self.check(name, lambda v: isinstance(v, str) and ok(v), want)
        return v

    def integer(self, name: str, lo: int | None = None) -> int:
        want = "an integer" if lo is None else f"an integer >= {lo}"
        v: int = self.check(name, lambda v: _is_int(v) and (lo is None or v >= lo), want)
        return v

    def number(self, name: str) -> float:
        v: float = self.check(name, _is_number, "a finite number")
        return v

    def flag(self, name: str) -> bool:
        v: bool = self.check(name, lambda v: isinstance(v, bool), "true or false")
        return v

    def obj(self, name: str) -> dict[str, Any]:
        """A JSON object kept as it is (a record whose members no code decides on)."""
        v: dict[str, Any] = self.check(name, lambda v: isinstance(v, dict), "a JSON object")
        return v

    def items(self, name: str, ok: Callable[[Any], bool], want: str, count: int | None = None) -> tuple[Any, ...]:
        """A list whose items ``ok`` accepts (``count`` of them when given), as a tuple."""
        size = "" if count is None else f"{count} "
        v = self.check(
            name,
            lambda v: isinstance(v, list) and (count is None or len(v) == count) and all(map(ok, v)),
            f"a list of {size}{want}",
        )
        return tuple(v)

    def integers(self, name: str, lo: int | None = None, count: int | None = None) -> tuple[int, ...]:
        want = "integers" if lo is None else f"integers >= {lo}"
        return self.items(name, lambda v: _is_int(v) and (lo is None or v >= lo), want, count)

    def numbers(self, name: str, count: int | None = None) -> tuple[float, ...]:
        return self.items(name, _is_number, "finite numbers", count)

    def texts(self, name: str) -> tuple[str, ...]:
        return self.items(name, lambda v: isinstance(v, str), "strings")

    def nested(self, name: str, parse: Callable[["Fields"], T]) -> T:
        """A member that is itself an artifact: ``parse`` reads its fields (and calls done())."""
        return parse(Fields(self._take(name), self.where, name, self.error, f"{self.path}{name}."))

    def each(self, name: str, parse: Callable[["Fields", int], T]) -> tuple[T, ...]:
        """A list of artifacts: ``parse(fields, index)`` reads each one."""
        v = self.check(name, lambda v: isinstance(v, list), "a list")
        return tuple(
            parse(Fields(item, self.where, name, self.error, f"{self.path}{name}[{i}]."), i) for i, item in enumerate(v)
        )

    def optional(self, name: str, read: Callable[[str], T]) -> T | None:
        """``read(name)`` when the member is there (absent: None; present as null: refused by ``read``)."""
        return read(name) if name in self.doc else None

    def or_null(self, name: str, read: Callable[[str], T]) -> T | None:
        """None for a member that is null, else ``read(name)`` (the member must be there)."""
        if self.doc.get(name, 0) is None:
            self.taken.append(name)
            return None
        return read(name)

    def done(self, order: tuple[str, ...] | None = None) -> None:
        """Refuse members nobody took; with ``order``, the members must be exactly these, in this order."""
        extra = [k for k in self.doc if k not in self.taken]
        if extra:
            self.fail(extra[0], "is not expected")
        if order is not None and tuple(self.doc) != order:
            raise self.error(
                f"{self.where}: {self.path.rstrip('.') or 'the object'} does not have exactly the members "
                f"{', '.join(order)}, in this order"
            )


def canonical_json(obj: object) -> bytes:
    """The one byte string a JSON object is authenticated as."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
