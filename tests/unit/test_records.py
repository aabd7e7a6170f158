"""kvmrun.records: the value classes' decorator behaves like the dataclasses it replaces."""

import dataclasses

import pytest

from kvmrun.records import (FrozenInstanceError, asdict, field, fields, is_record, record,
                            replace)


@record(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple = ()
    note: str = field(default="", compare=False, repr=False)


@record
class Bag:
    name: str
    items: list = field(default_factory=list)


@record(frozen=True)
class Point3(Point):
    z: int = 0


def test_init_defaults_and_factories():
    assert (Point(1).x, Point(1).y, Point(1).tags) == (1, 0, ())
    a, b = Bag("a"), Bag("b")
    a.items.append(1)
    assert b.items == []                     # each instance its own list


def test_init_argument_errors_match_a_dataclass():
    with pytest.raises(TypeError, match="missing the argument 'x'"):
        Point()
    with pytest.raises(TypeError, match="two values for 'x'"):
        Point(1, x=2)
    with pytest.raises(TypeError, match="unexpected argument 'w'"):
        Point(1, w=2)
    with pytest.raises(TypeError, match="takes 4 arguments"):
        Point(1, 2, (), "", 5)


def test_equality_hash_and_repr_honour_compare_and_repr():
    assert Point(1, 2, note="a") == Point(1, 2, note="b")
    assert hash(Point(1, 2, note="a")) == hash(Point(1, 2, note="b"))
    assert Point(1, 2) != Point(2, 1)
    assert Point(1) != Point3(1)             # another class is never equal
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=())"
    assert Bag("a") == Bag("a")
    with pytest.raises(TypeError):
        hash(Bag("a"))                       # mutable records are not hashable


def test_frozen_refuses_assignment():
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2
    with pytest.raises(AttributeError):
        del p.y
    bag = Bag("a")
    bag.name = "b"
    assert bag.name == "b"


def test_inheritance_appends_fields_after_the_base():
    assert [f.name for f in fields(Point3)] == ["x", "y", "tags", "note", "z"]
    assert Point3(1, z=3).z == 3


def test_replace_asdict_is_record():
    p = Point(1, 2, ("t",))
    q = replace(p, y=5)
    assert (q.x, q.y, q.tags, p.y) == (1, 5, ("t",), 2)
    outer = Bag("o", [Point(1)])
    assert asdict(outer) == {"name": "o", "items": [{"x": 1, "y": 0, "tags": (), "note": ""}]}
    assert is_record(p) and is_record(Point) and not is_record(1)


def test_class_definition_errors():
    with pytest.raises(ValueError, match="mutable default"):
        @record
        class Bad:
            items: list = []
    with pytest.raises(TypeError, match="without a default follows"):
        @record
        class Order:
            a: int = 1
            b: int


def test_own_methods_are_kept():
    @record(frozen=True)
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"
    assert repr(Named("n")) == "<n>"

    @record
    class Built:
        name: str

        def __init__(self, raw: str):
            self.name = raw.strip()
    assert Built(" n ").name == "n"


def test_same_behaviour_as_dataclasses_for_the_common_cases():
    @dataclasses.dataclass(frozen=True)
    class DPoint:
        x: int
        y: int = 0
        tags: tuple = ()
        note: str = dataclasses.field(default="", compare=False, repr=False)
    for args in [(1,), (1, 2), (1, 2, ("a",))]:
        ours, theirs = Point(*args), DPoint(*args)
        assert repr(ours).partition("(")[2] == repr(theirs).partition("(")[2]
        assert hash(ours) == hash(theirs)    # both hash the tuple of compared fields
