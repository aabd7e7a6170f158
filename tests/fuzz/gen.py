"""Generated profiles for the fuzz target: every case is a function of (seed, index), so a
failing case is replayed from the seed printed with it.

Kinds of case (`KINDS`, chosen in turn):
    spec      a structure drawn from the profile's own key table (real keys, odd values)
    mutate    a shipped profile (profiles/, tests/unit/golden) with values replaced, keys
              dropped or duplicated, lists grown
    tags      YAML tags, anchors and aliases, merge keys, explicit keys, flow styles
    huge      huge and deep values: long strings, many digits, deep nesting, many items
    bytes     byte flips, insertions and truncations of a shipped profile
    garbage   random YAML-ish text
`set_case` makes `--set` assignments; `number_case` makes strings for the numbers the CLI
parses (sizes, disk sizes, ports).
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from kvmrun.profile.keys import PROFILE
from kvmrun.profile.spec import Either, Enum, List, Obj

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted(ROOT.glob("profiles/*.yaml")) + sorted(ROOT.glob("tests/unit/golden/*.yaml")) \
    + sorted(ROOT.glob("tests/unit/golden/bases/*.yaml"))
SEED_TEXTS = [p.read_bytes() for p in SEEDS]
KINDS = ("spec", "mutate", "tags", "huge", "bytes", "garbage")

ODD_STRINGS = ["", " ", "0", "-1", "1e999", "nan", "inf", "0x10", "0o7", "1_000", "٣",
               "²", "ⅷ", "9" * 40, "512M", "2G", "1.5G", "16T", "99999T", "-5G", "tcp::2222-:22",
               "2222:22", "65536:22", "a,b", "a,,b", "../x", "/", "~nobody/x", "~/x", "\t",
               "x" * 300, "name=a,debug-threads=on", "true", "null", "~", "[]", "{}",
               "\u202e", "\x00", "\x1b[2J", "%(x)s", "{x}", "$(id)", "'", '"', "\\"]
ODD_NUMBERS = [0, -1, 1, 2, 255, 256, 65535, 65536, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30,
               1.5, -0.0, 1e308, float("inf"), float("nan"), True, False]


def rng_for(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def case(seed: int, index: int) -> tuple[str, bytes]:
    """(kind, profile bytes) of case `index` of the run with `seed`."""
    rng = rng_for(seed, index)
    kind = KINDS[index % len(KINDS)]
    return kind, GENERATORS[kind](rng)


# ---------------------------------------------------------------- values

def odd_scalar(rng: random.Random):
    pick = rng.random()
    if pick < 0.4:
        return rng.choice(ODD_STRINGS)
    if pick < 0.7:
        return rng.choice(ODD_NUMBERS)
    if pick < 0.85:
        return "".join(rng.choice("ab09-_.,:/=% \\M") for _ in range(rng.randint(1, 12)))
    return rng.randint(-10, 100_000)


def from_spec(spec, rng: random.Random, depth: int = 0):
    """A value shaped by `spec` most of the time, something else sometimes."""
    if rng.random() < 0.15 or depth > 4:
        return odd_value(rng, depth)
    if isinstance(spec, Obj):
        keys = rng.sample(list(spec.fields), k=min(len(spec.fields), rng.randint(0, 6)))
        out = {k: from_spec(spec.fields[k].spec, rng, depth + 1) for k in keys}
        if rng.random() < 0.1:
            out[rng.choice(["memroy", "disk", "x", "", "0"])] = odd_scalar(rng)
        return out
    if isinstance(spec, List):
        return [from_spec(spec.item, rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if isinstance(spec, Enum):
        return rng.choice(spec.choices) if rng.random() < 0.7 else odd_scalar(rng)
    if isinstance(spec, Either):
        return from_spec(rng.choice(spec.options)[1], rng, depth)
    return odd_scalar(rng)


def odd_value(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if pick < 0.6 or depth > 4:
        return odd_scalar(rng)
    if pick < 0.8:
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(odd_scalar(rng)): odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def dump(data) -> bytes:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()
    except (yaml.YAMLError, ValueError):
        return repr(data).encode()


# ---------------------------------------------------------------- generators

def gen_spec(rng: random.Random) -> bytes:
    data = from_spec(PROFILE, rng)
    if isinstance(data, dict) and rng.random() < 0.8:
        data.setdefault("name", "fuzz")
        if rng.random() < 0.7:
            data["arch"] = rng.choice(["x86_64", "aarch64", "riscv64", "arm", "i386"])
    return dump(data)


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def gen_mutate(rng: random.Random) -> bytes:
    data = yaml.safe_load(rng.choice(SEED_TEXTS))
    for _ in range(rng.randint(1, 4)):
        paths = list(_paths(data))
        if not paths:
            break
        path = rng.choice(paths)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = rng.random()
        if action < 0.5:
            parent[last] = odd_value(rng)
        elif action < 0.7:
            del parent[last]
        elif action < 0.85 and isinstance(parent[last], list):
            parent[last] = parent[last] * rng.randint(2, 20)
        else:
            parent[last] = from_spec(PROFILE, rng, 3)
    return dump(data)


TAGS = ["!!int", "!!float", "!!str", "!!bool", "!!null", "!!binary", "!!timestamp", "!!set",
        "!!omap", "!!pairs", "!!map", "!!seq", "!!python/object:os.system",
        "!!python/object/apply:os.system", "!foo", "!<tag:x,2000:y>", "!!merge", "!!value"]


def gen_tags(rng: random.Random) -> bytes:
    lines = ["name: tagged"]
    for i in range(rng.randint(1, 6)):
        key = rng.choice(["memory", "smp", "arch", "boot", "disks", "network", "x", "kernel"])
        form = rng.random()
        tag = rng.choice(TAGS)
        if form < 0.3:
            lines.append(f"{key}{i}: {tag} {rng.choice(['abc', '2001-13-45', '12', 'x', '[]'])}")
        elif form < 0.5:
            lines.append(f"{key}: {tag} [a, {rng.choice(['1', 'b', '{c: d}'])}]")
        elif form < 0.7:
            lines.append(f"a{i}: &a{i} {{path: x.img, size: {rng.choice(['1G', '!!int z', '*a0'])}}}")
            lines.append(f"b{i}: {{<<: *a{i}, cache: none}}")
        elif form < 0.85:
            lines.append(f"? {rng.choice(['[a]', '{b: c}', 'k', '*a0', '!!binary AA=='])}\n: v")
        else:
            lines.append(f"{key}: *{rng.choice(['a0', 'nope', 'a1'])}")
    return ("\n".join(lines) + "\n").encode()


def gen_huge(rng: random.Random) -> bytes:
    pick = rng.randrange(7)
    n = rng.choice([100, 1000, 5000, 20_000, 60_000])
    if pick == 0:
        return b"name: huge\ndescription: '" + b"x" * (n * 4) + b"'\n"
    if pick == 1:
        return b"name: huge\nmemory: " + b"9" * n + rng.choice([b"", b"M", b".5G"]) + b"\n"
    if pick == 2:
        return b"name: huge\nmemory: " + b"[" * n + b"]" * rng.choice([0, n]) + b"\n"
    if pick == 3:
        return b"name: huge\n" + b"".join(b"  " * i + b"a:\n" for i in range(min(n, 300)))
    if pick == 4:
        return b"name: huge\ndisks:\n" + b"  - path: x.img\n" * min(n, 9000)
    if pick == 5:
        levels = rng.randint(2, 9)
        out = [b"l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
        for i in range(1, levels):
            out.append(f"l{i}: &l{i} [".encode() + b", ".join([f"*l{i - 1}".encode()] * 10)
                       + b"]")
        return b"name: laughs\n" + b"\n".join(out) + b"\n"
    return b"name: huge\nsmp: " + str(rng.choice([10 ** 4000, -10 ** 300, 2 ** 64])).encode() \
        [:4290] + b"\n"


def gen_bytes(rng: random.Random) -> bytes:
    raw = bytearray(rng.choice(SEED_TEXTS))
    for _ in range(rng.randint(1, 8)):
        if not raw:
            break
        op = rng.random()
        at = rng.randrange(len(raw))
        if op < 0.5:
            raw[at] = rng.randrange(256)
        elif op < 0.7:
            raw[at:at] = bytes(rng.choice([b"\t", b"\x00", b"\xff", b"&a", b"*a", b"!!", b"{",
                                           b"[", b": ", b"- ", b"\n  ", b"'", b"\""]))
        elif op < 0.9:
            del raw[at: at + rng.randint(1, 20)]
        else:
            raw = raw[:at]
    return bytes(raw)


def gen_garbage(rng: random.Random) -> bytes:
    alphabet = "abcxyz019 :-[]{},&*!|>'\"#%@`?\n\t\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))).encode()


GENERATORS = {"spec": gen_spec, "mutate": gen_mutate, "tags": gen_tags, "huge": gen_huge,
              "bytes": gen_bytes, "garbage": gen_garbage}


# ---------------------------------------------------------------- --set and numbers

SET_KEYS = ["memory", "smp", "name", "arch", "boot", "disks.0.path", "disks.0.size",
            "disks.1.cache", "network.0.forward", "network.0.type", "kernel.append", "gdb",
            "cdrom", "display", "shutdown.timeout", "ready.timeout", "x.y", "disks.9",
            "network.-1", "", ".", "a..b", "disks.0.0"]


def set_case(seed: int, index: int) -> list[str]:
    rng = rng_for(seed, index + 10 ** 9)
    out = []
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(SET_KEYS)
        pick = rng.random()
        if pick < 0.4:
            value = str(odd_scalar(rng))
        elif pick < 0.6:
            value = rng.choice(["[a, b]", "{x: 1}", "!!int abc", "&a [*a]", "[" * 200,
                                "9" * 5000, "'unterminated", "a: b: c", "- x"])
        elif pick < 0.8:
            value = dump(odd_value(rng)).decode(errors="replace").strip()
        else:
            value = "".join(rng.choice("0123456789.MGKk-+e ,:") for _ in range(rng.randint(0, 30)))
        out.append(f"{key}={value}" if rng.random() > 0.05 else key)
    return out


def number_case(seed: int, index: int) -> str:
    rng = rng_for(seed, index + 2 * 10 ** 9)
    pick = rng.random()
    if pick < 0.3:
        return str(odd_scalar(rng))
    if pick < 0.6:
        return rng.choice(["", "+", "-"]) + "".join(rng.choice("0123456789") for _ in range(
            rng.choice([1, 3, 20, 400, 5000]))) + rng.choice(["", "K", "M", "G", "T", "P", "E",
                                                              "iB", "B", ".5G", "e9"])
    return "".join(rng.choice("0123456789.+-KMGTPkmgtpiB e٣²") for _ in range(rng.randint(0, 25)))
