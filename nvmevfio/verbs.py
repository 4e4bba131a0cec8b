"""A verb is written once, where the work is done (a broker component's method: its signature,
its docstring, its refusals), and exposed by the layers above without a method of their own.

``Provider.enable = Verb(Core.enable)`` reads, on a provider, the broker's own bound method;
``BlockDevice.flush = NamespaceVerb(SyncIO.flush)`` the same with the device's namespace id bound
as the first argument. The first read stores the result in the instance (these are non-data
descriptors), so a verb costs no Python frame of its own after that: under an emulated CPU every
frame on the per-command path costs microseconds. ``tests/unit/test_surface.py`` reads the
declared method's parameters, so the capability boundary is checked on the verb itself.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Concatenate, Generic, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")


def _keep(obj: object, attr: str, verb: object, bound: Callable[..., Any]) -> None:
    """From now on ``bound`` is the instance's own attribute (no frame of the descriptor's), unless
    the instance's class overrides the verb (``super().close()`` reaching a Verb must not hide
    the override for later calls)."""
    if getattr(type(obj), attr, None) is verb:
        obj.__dict__[attr] = bound


class _Declared:
    """What both kinds of verb keep: the declared method, where its owner finds the object that
    runs it (``via``), the name there, and the attribute it is declared as."""

    def __init__(self, method: Callable[..., Any], via: str, name: str | None) -> None:
        self.method = method
        self.via = via
        self.name = name or method.__name__
        self.attr = self.name
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def _target(self, obj: Any) -> Callable[..., Any]:
        return getattr(getattr(obj, self.via), self.name)  # type: ignore[no-any-return]


class Verb(_Declared, Generic[P, R]):
    """The verb ``method`` of whatever the owner's ``via`` attribute holds (its broker, by default),
    under the same name unless ``name`` says otherwise."""

    def __init__(self, method: Callable[Concatenate[Any, P], R], *, via: str = "_broker",
                 name: str | None = None) -> None:
        super().__init__(method, via, name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Verb[P, R]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Verb[P, R] | Callable[P, R]:
        if obj is None:
            return self
        bound = self._target(obj)
        _keep(obj, self.attr, self, bound)
        return bound


class NamespaceVerb(_Declared, Generic[P, R]):
    """:class:`Verb` with the owner's ``nsid`` bound as the first argument (a device of one
    namespace); ``method`` is the broker component's, whose first parameter is the nsid."""

    def __init__(self, method: Callable[Concatenate[Any, int, P], R], *, via: str = "provider",
                 name: str | None = None) -> None:
        super().__init__(method, via, name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> NamespaceVerb[P, R]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> NamespaceVerb[P, R] | Callable[P, R]:
        if obj is None:
            return self
        bound = functools.partial(self._target(obj), obj.nsid)  # type: ignore[attr-defined]
        _keep(obj, self.attr, self, bound)
        return bound
