"""Records: kvmrun's value classes (the profile model and its schema, the architecture
table, compiled launches, and the rest).

What kvmrun uses of the standard library's `dataclasses`, without its cost: fields with
defaults or factories (`field`), `frozen` instances that are equal and hash by their
compared fields, a repr, `replace`, `fields` and `asdict`. `import dataclasses` brings
inspect, ast, dis and tokenize, and each class it makes compiles six generated methods
with `exec`; the 28 classes on a start of a new profile cost ~40 ms of its ~140 (issue 18,
measured). A record class is decorated in microseconds: its methods are shared and read
the class's fields, and an instance is made in a few microseconds more than a dataclass's.

    @record(frozen=True)
    class Disk:
        path: str
        format: str | None = None
        opts: dict = field(default_factory=dict, compare=False)

Fields are the class's own annotations, after those of the records it derives from.
A method the class defines itself (`__init__`, `__repr__`, `__eq__`, `__hash__`) is
kept, as `dataclasses` keeps it.
"""

from __future__ import annotations

TYPE_CHECKING = False              # not typing's: its import (~3 ms) is not on a start
if TYPE_CHECKING:
    from typing import Any

MISSING: Any = type("MISSING", (), {"__repr__": lambda self: "MISSING"})()


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen record was assigned or deleted."""


class Field:
    __slots__ = ("name", "default", "default_factory", "compare", "repr")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING,
                 compare: bool = True, repr: bool = True):
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("a field has a default or a default_factory, not both")
        self.name = ""
        self.default, self.default_factory = default, default_factory
        self.compare, self.repr = compare, repr

    def __repr__(self) -> str:
        return f"Field({self.name!r})"


def field(*, default: Any = MISSING, default_factory: Any = MISSING, compare: bool = True,
          repr: bool = True) -> Any:
    return Field(default, default_factory, compare, repr)


def record(cls: type | None = None, /, *, frozen: bool = False) -> Any:
    """The class decorator: `@record` or `@record(frozen=True)`."""
    def wrap(cls: type) -> type:
        found: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            found.update((f.name, f) for f in base.__dict__.get("__record_fields__", ()))
        for name in cls.__dict__.get("__annotations__", {}):
            value = cls.__dict__.get(name, MISSING)
            f = value if isinstance(value, Field) else Field(value)
            if type(f.default) in (list, dict, set):
                raise ValueError(f"{cls.__name__}.{name}: a mutable default is shared by "
                                 "every instance; use field(default_factory=...)")
            f.name = name
            if isinstance(value, Field):
                if f.default is MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, f.default)
            found[name] = f
        fields = tuple(found.values())
        defaulted = False
        for f in fields:
            if f.default is MISSING and f.default_factory is MISSING and defaulted:
                raise TypeError(f"{cls.__name__}: field {f.name!r} without a default "
                                "follows one with a default")
            defaulted = defaulted or f.default is not MISSING or f.default_factory is not MISSING
        cls.__record_fields__ = fields
        cls.__record_compared__ = tuple(f.name for f in fields if f.compare)
        methods = {"__init__": _init, "__repr__": _repr, "__eq__": _eq}
        if frozen:
            methods.update(__setattr__=_frozen, __delattr__=_frozen, __hash__=_hash)
        for name, method in methods.items():
            if name not in cls.__dict__ or (name == "__hash__" and cls.__dict__[name] is None):
                setattr(cls, name, method)
        if not frozen and "__hash__" not in cls.__dict__:
            cls.__hash__ = None          # mutable and equal by value: not hashable
        return cls
    return wrap if cls is None else wrap(cls)


def _init(self, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    fields = cls.__record_fields__
    if len(args) > len(fields):
        raise TypeError(f"{cls.__name__}() takes {len(fields)} arguments, "
                        f"{len(args)} were given")
    for f, value in zip(fields, args):
        if f.name in kwargs:
            raise TypeError(f"{cls.__name__}() got two values for {f.name!r}")
        kwargs[f.name] = value
    put = object.__setattr__
    for f in fields:
        if f.name in kwargs:
            put(self, f.name, kwargs.pop(f.name))
        elif f.default is not MISSING:
            put(self, f.name, f.default)
        elif f.default_factory is not MISSING:
            put(self, f.name, f.default_factory())
        else:
            raise TypeError(f"{cls.__name__}() is missing the argument {f.name!r}")
    if kwargs:
        raise TypeError(f"{cls.__name__}() got an unexpected argument {next(iter(kwargs))!r}")


def _repr(self) -> str:
    cls = type(self)
    inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                      for f in cls.__record_fields__ if f.repr)
    return f"{cls.__qualname__}({inner})"


def _compared(self) -> tuple:
    return tuple(getattr(self, name) for name in type(self).__record_compared__)


def _eq(self, other: object) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self) -> int:
    return hash(_compared(self))


def _frozen(self, name: str, *value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen "
                              f"{type(self).__name__}")


def is_record(obj: Any) -> bool:
    return hasattr(type(obj) if not isinstance(obj, type) else obj, "__record_fields__")


def fields(obj: Any) -> tuple[Field, ...]:
    """The fields of a record or record class, in order."""
    return (obj if isinstance(obj, type) else type(obj)).__record_fields__


def replace(obj: Any, /, **changes: Any) -> Any:
    """A copy of the record `obj` with `changes` (field names) applied."""
    for f in type(obj).__record_fields__:
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return type(obj)(**changes)


def asdict(obj: Any) -> Any:
    """A record as plain data: records become dicts, lists, tuples and dicts are walked."""
    if is_record(obj) and not isinstance(obj, type):
        return {f.name: asdict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(asdict(v) for v in obj)
    if isinstance(obj, dict):
        return {asdict(k): asdict(v) for k, v in obj.items()}
    return obj
