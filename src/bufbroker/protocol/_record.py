"""Immutable value records, declared like dataclasses, without their start-up cost.

A frozen dataclass compiles five or six methods from source when its class is created, about a
millisecond each here; the protocol has two dozen records, and every ``bufbroker`` command
would pay for them (and for importing ``dataclasses``, ``inspect`` and ``ast``) before doing
anything. A ``Record`` subclass is set up in microseconds from its annotations: fields in
order, a default from each class attribute, equality and hashing by value, and no setting of
attributes after ``__init__``. Type checkers see it as a dataclass (``dataclass_transform``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: it costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


__all__ = ["Record"]


@dataclass_transform(kw_only_default=True, frozen_default=True)
class Record:
    """Subclass with annotated fields; ``kw_only=False`` in the class line allows positions."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}  # shared between instances: never mutate one
    _annotations: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, *, kw_only: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = {
            name: str(kind)
            for name, kind in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063 (no inspect)
            if not str(kind).startswith("ClassVar")
        }
        cls._annotations = {**cls._annotations, **own}
        cls._fields = tuple(cls._annotations)
        cls._defaults = {name: getattr(cls, name) for name in cls._fields if hasattr(cls, name)}
        if "__init__" not in cls.__dict__:
            cls.__init__ = _first_init(cls, kw_only)  # type: ignore[method-assign]

    def _check(self) -> None:
        """Validate the fields once they are set (for subclasses to override)."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash((type(self), *(self.__dict__[name] for name in self._fields)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


def _first_init(cls: type[Record], kw_only: bool) -> Any:
    """An ``__init__`` that compiles the real one on first use and puts it in its place.

    A program uses a few of the protocol's records; compiling all two dozen at import would
    cost every ``bufbroker`` command start-up time for the ones it never builds.
    """

    def __init__(self: Record, *args: Any, **kwargs: Any) -> None:
        if cls.__dict__.get("__init__") is __init__:
            cls.__init__ = _make_init(cls, kw_only)  # type: ignore[method-assign]
        cls.__init__(self, *args, **kwargs)

    return __init__


def _make_init(cls: type[Record], kw_only: bool) -> Any:
    """An ``__init__`` for ``cls``'s fields, compiled once: as fast to call as a dataclass's.

    One small function per class, where a dataclass compiles half a dozen.
    """
    fields, defaults = cls._fields, cls._defaults
    params = [name if name not in defaults else f"{name}=_defaults[{name!r}]" for name in fields]
    if kw_only and params:
        params.insert(0, "*")
    body = ["d = self.__dict__"] + [f"d[{name!r}] = {name}" for name in fields]
    if cls._check is not Record._check:
        body.append("self._check()")
    source = f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body)
    namespace: dict[str, Any] = {}
    exec(source, {"_defaults": defaults}, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init
