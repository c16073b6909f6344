"""A package's public names imported from their submodules on first use (PEP 562), not when the package is.

``import dvml.heads.config`` runs ``dvml/heads/__init__.py`` first; with eager re-exports that alone imported
torch (seconds), so ``dvml --help`` and every option declaration that only needs a config dataclass paid for the
whole training stack. A package lists its exports once, as ``{submodule: names}``::

    __getattr__, __dir__ = lazy_exports(__name__, {"dvml.heads.train": ["fit"], ...})

and ``from dvml.heads import fit`` imports :mod:`dvml.heads.train` at that moment. A name that is also the name
of a submodule (``dvml.heads.embed`` the function and the module) keeps meaning the function, as it did with
an eager ``from .embed import embed``, even after the import system records the submodule on the package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable


class _Export:
    """The package attribute ``attr`` = ``submodule.attr``, winning over the submodule of the same name that the
    import system sets on the package (a data descriptor on the package's class outranks its ``__dict__``)."""

    def __init__(self, attr: str, submodule: str):
        self.attr, self.submodule = attr, submodule

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        if self.attr in obj.__dict__:  # set by hand (e.g. a test's monkeypatch)
            return obj.__dict__[self.attr]
        return getattr(importlib.import_module(self.submodule), self.attr)

    def __set__(self, obj, value) -> None:
        if not isinstance(value, types.ModuleType):  # the submodule itself: the export keeps the name
            obj.__dict__[self.attr] = value

    def __delete__(self, obj) -> None:
        obj.__dict__.pop(self.attr, None)


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` whose public names are ``exports``
    (absolute submodule name -> the names it provides); each is imported on first access and then kept."""
    where = {attr: sub for sub, attrs in exports.items() for attr in attrs}
    module = sys.modules[package]
    clashes = {attr: sub for attr, sub in where.items() if sub.rsplit(".", 1)[0] == package
               and importlib.util.find_spec(f"{package}.{attr}") is not None}
    if clashes:
        module.__class__ = type(f"LazyPackage[{package}]", (types.ModuleType,),
                                {attr: _Export(attr, sub) for attr, sub in clashes.items()})

    def __getattr__(name: str):
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sub), name)
        if name not in clashes:
            setattr(module, name, value)
        return value

    def __dir__() -> list:
        return sorted(set(module.__dict__) | set(where))

    return __getattr__, __dir__


class _LazyModule(types.ModuleType):
    """Stands for a module until one of its attributes is read; then imports it (see :func:`lazy_module`)."""

    def __init__(self, name: str):
        super().__init__(name)

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)

    def __setattr__(self, attr: str, value) -> None:  # e.g. a test's monkeypatch: on the module itself
        setattr(importlib.import_module(self.__name__), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(importlib.import_module(self.__name__), attr)


def lazy_module(name: str) -> types.ModuleType:
    """``faiss = lazy_module("faiss")`` in place of ``import faiss``: the module is imported the first time one of
    its attributes is used (``faiss.IndexFlatIP``), not when the importing module is. For heavy dependencies of
    modules whose light parts (enums, config dataclasses) the CLI reads to declare its options."""
    return sys.modules.get(name) or _LazyModule(name)


def lazy_function(module: str, name: str) -> Callable:
    """``fit = lazy_function("dvml.heads.train", "fit")`` in place of ``from dvml.heads.train import fit``: a
    function that imports ``module`` on its first call and calls ``module.name`` (a name tests can still
    monkeypatch on the importing module)."""

    @functools.wraps(_placeholder)
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on first call."
    return call


def _placeholder(*args, **kwargs):  # the signature a lazy function shows before its module is imported
    pass
