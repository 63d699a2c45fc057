"""One registry type for every pluggable part: models, rewards, monitors, algorithms,
prompt sources and worlds.

A `Registry` is a read-mostly mapping ``name -> entry`` filled by a decorator beside the
interface (``@MODELS.register("toy")``, or the package's ``register_model("toy")``). Every
registry behaves the same way:

- registering a name twice raises;
- an unknown name raises `UnknownNameError` with the sorted valid names and the nearest
  name (``difflib``);
- a dotted path ``package.module:attribute`` is accepted wherever a name is: the module is
  imported and the attribute used as the entry (as ``serve-reward --reward`` always did);
- the built-in entries load on the first read. They are listed by the package top
  (`flowdppo.builtins`), so a low layer never imports the layers that register into it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# The module that knows every built-in entry: ``load(kind)`` imports the modules that
# register entries of ``kind``. Named by string: it sits at the top of the package.
BUILTINS_MODULE = "flowdppo.builtins"


class UnknownNameError(ValueError):
    """A name no registry entry has (nor a dotted path that imports)."""


def is_dotted_path(name: str) -> bool:
    """``package.module:attribute`` (anything with a colon; registry names have none)."""
    return ":" in name


def import_dotted(path: str, *, kind: str = "entry") -> Any:
    """The attribute ``attr`` of module ``pkg.mod`` for ``path = "pkg.mod:attr"``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownNameError(f"{kind} {path!r}: a dotted path is `package.module:attribute`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownNameError(f"{kind} {path!r}: cannot import {module_name!r}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownNameError(f"{kind} {path!r}: module {module_name!r} has no attribute "
                               f"{attr!r}") from None


class Registry(MutableMapping[str, T], Generic[T]):
    """Entries of one ``kind`` (``"model"``, ``"reward"``, ...) by name.

    Args:
        kind (`str`): what an entry is, for messages; also the key `flowdppo.builtins`
            loads the built-in entries by.
        from_dotted (`Callable`, optional): turns the attribute a dotted path names into an
            entry (e.g. a decorated loss into its spec); default: the attribute itself.
        extra_names (`tuple[str, ...]`): names handled outside the registry (``"files"``
            for prompt sources), listed in the unknown-name message.
    """

    def __init__(self, kind: str, *, from_dotted: Callable[[Any], T] | None = None,
                 extra_names: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._from_dotted = from_dotted
        self._extra_names = extra_names
        self._loaded = False

    # Writing: the decorator and its checks.
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``entry`` under ``name``; a second entry of that name raises."""

        def wrap(entry: T) -> T:
            self.add(name, entry)
            return entry

        return wrap

    def add(self, name: str, entry: T) -> None:
        if is_dotted_path(name):
            raise ValueError(f"{self.kind} name {name!r}: a registry name has no ':' (that "
                             "marks a dotted path)")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry

    def is_registered(self, name: str) -> bool:
        """Whether ``name`` is registered already (does not load the built-ins)."""
        return name in self._entries

    # Reading: every read loads the built-ins first.
    def load_builtins(self) -> None:
        """Import the built-in modules of this kind once (they register on import)."""
        if self._loaded:
            return
        self._loaded = True  # before importing: those modules register into this registry
        importlib.import_module(BUILTINS_MODULE).load(self.kind)

    def lookup(self, name: str) -> T:
        """The entry ``name`` (a registered name or a dotted path)."""
        if is_dotted_path(name):
            value = import_dotted(name, kind=self.kind)
            return self._from_dotted(value) if self._from_dotted else value
        self.load_builtins()
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        valid = sorted([*self._entries, *self._extra_names])
        hint = difflib.get_close_matches(name, valid, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        return (f"unknown {self.kind} {name!r}: expected one of {valid}{extra} (or a dotted "
                "path package.module:factory)")

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self._entries)

    # The mapping protocol (``name in MODELS``, ``sorted(REWARDS)``, ``MONITORS[name]``).
    def __getitem__(self, name: str) -> T:
        self.load_builtins()
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry  # plain assignment (tests' monkeypatch.setitem); no check

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load_builtins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load_builtins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
