#!/usr/bin/env python3
"""Extract TensorRT's Python API, as shipped, from a `tensorrt-cuXX-bindings` wheel: names and arguments as data.

Usage::

    pip download --no-deps -d WHEELDIR tensorrt-cu12-bindings==10.16.1.11
    python tools/extract_trt_api.py WHEELDIR/tensorrt_cu12_bindings-10.16.1.11-*.whl
    # or the extension module itself: python tools/extract_trt_api.py path/to/tensorrt_bindings/tensorrt.so

Writes `tests/support/api/tensorrt_api.json` (or `--out`): every class with its constructor, methods (argument
names per overload; an optional argument ends with "="), properties (read-only ones listed), the signatures as
text, every enum with its members and values, and the module's functions and constants.

How. pybind11 does not store a method's signature in the binary: it assembles the text
`name(self: tensorrt.tensorrt.Builder, network: ...) -> ...` at import time, from the argument names and the
registered types. So the module has to be imported. It links against libnvinfer / libnvonnxparser /
libnvinfer_plugin, which cannot be installed without a GPU stack, but it only *calls* into them when an object is
made; at import it needs their symbols to resolve. This script reads the extension's ELF dynamic section and
symbol table (stdlib `struct`), writes stub libraries with those sonames that define each unresolved symbol as a
function returning 0 (compiled with the system C compiler, `$CC` or `cc`), imports the module in a child
interpreter with the stubs on LD_LIBRARY_PATH, and reads every `__doc__`, property and enum from the live module.
Nothing in the stubs is ever called: no TensorRT object is created.

Check. Every pybind11-defined name found that way (of 8 characters or more: shorter literals may be compiled
into immediate stores) must also occur as a string in the binary, where pybind11's `.def("name", ...)` literals
live; the script fails if one does not.

Standard library only (plus a C compiler, and two small modules of this checkout: the atomic write and the
strict layer's signature splitter). Linux x86-64/aarch64 ELF64 little-endian.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import inspect
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
API_DIR = REPO / "tests" / "support" / "api"  # where the listings live, beside the strict layer that reads them
# The strict layer's signature splitter (standard library only) and the project's atomic write, from the checkout.
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
from support.strict import split_top

from r2r.atomic import atomic_write

SHT_DYNAMIC = 6
SHT_DYNSYM = 11
SHT_GNU_VERSYM = 0x6FFFFFFF
DT_NEEDED = 1
STB_WEAK = 2


def elf_imports(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED sonames, undefined non-weak unversioned dynamic symbols) of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"{path}: not an ELF64 little-endian shared object")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        (_name, typ, _flags, _addr, off, size, link, _info, _align, entsize) = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        sections.append((typ, off, size, link, entsize))

    def cstr(table: int, offset: int) -> str:
        start = sections[table][1] + offset
        return data[start:data.index(b"\0", start)].decode()

    needed: list[str] = []
    undefined: list[str] = []
    for typ, off, size, link, _ in sections:
        if typ == SHT_DYNAMIC:
            for pos in range(off, off + size, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == DT_NEEDED:
                    needed.append(cstr(link, val))
    dynsym = next((s for s in sections if s[0] == SHT_DYNSYM), None)
    versym = next((s for s in sections if s[0] == SHT_GNU_VERSYM), None)
    if dynsym is None:
        raise SystemExit(f"{path}: no dynamic symbol table")
    typ, off, size, link, entsize = dynsym
    for i in range(size // entsize):
        st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, off + i * entsize)
        if st_shndx != 0 or st_name == 0 or (st_info >> 4) == STB_WEAK:
            continue
        version = struct.unpack_from("<H", data, versym[1] + 2 * i)[0] & 0x7FFF if versym else 1
        if version <= 1:  # 0 local, 1 global: not bound to a versioned library (glibc, libstdc++)
            undefined.append(cstr(link, st_name))
    return needed, undefined


def stub_libraries(so: Path, workdir: Path) -> Path:
    """Compile stub libraries for the extension's sonames that this machine cannot load."""
    needed, undefined = elf_imports(so)
    missing = []
    for soname in needed:
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    here = ctypes.CDLL(None)
    symbols = sorted(s for s in undefined if not hasattr(here, s))
    stubdir = workdir / "stubs"
    stubdir.mkdir()
    if not missing:
        return stubdir
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("a C compiler (cc) is needed to link stub libraries for the import; set $CC")
    src = stubdir / "stub.c"
    src.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in symbols))
    for soname in missing:
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(stubdir / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True)
    print(f"stubbed {len(symbols)} symbols in {', '.join(missing)}: {', '.join(symbols)}", file=sys.stderr)
    return stubdir


def stage_package(source: Path, workdir: Path) -> tuple[Path, Path, dict[str, str]]:
    """Lay the bindings out as a package named `tensorrt`; returns (sys.path root, extension, provenance)."""
    pkg = workdir / "pkg" / "tensorrt"
    pkg.mkdir(parents=True)
    prov = {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            members = [n for n in whl.namelist() if re.fullmatch(r"[^/]+/tensorrt[^/]*\.so", n)]
            if len(members) != 1:
                raise SystemExit(f"{source}: expected one top-level tensorrt*.so, found {members}")
            top = members[0].split("/")[0]
            for name in whl.namelist():
                if name.startswith(top + "/") and not name.endswith("/"):
                    target = pkg / name[len(top) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(whl.read(name))
            prov["extension"] = members[0]
        so = pkg / Path(members[0]).name
    else:
        so = pkg / source.name
        shutil.copy2(source, so)
        init = source.parent / "__init__.py"
        if init.is_file():
            shutil.copy2(init, pkg / "__init__.py")
        else:
            (pkg / "__init__.py").write_text(f"from .{so.name.split('.')[0]} import *\n")
        prov["extension"] = source.name
    if so.name.split(".")[0] != "tensorrt":
        raise SystemExit(f"{so.name}: expected the `tensorrt` extension module")
    return pkg.parent, so, prov


# Runs in the child interpreter, where `import tensorrt` loads the staged package against the stubs. It gets
# strict.split_top by source (the child imports nothing of r2r).
CHILD = r'''
import inspect, json, re, sys, types
import tensorrt as trt

PREFIX = re.compile(r"\btensorrt\.tensorrt\.")
SKIP = {"__del__", "__enter__", "__exit__", "_pybind11_conduit_v1_", "__init__", "__doc__", "__module__",
        "__dict__", "__weakref__", "__hash__", "__new__", "__getstate__", "__setstate__"}

def clean(text):
    return PREFIX.sub("", text).strip()

# <split_top>

def signatures(name, doc):
    """All pybind11 overload signatures of `name` in a docstring: [(args, returns)]."""
    out = []
    for line in (doc or "").splitlines():
        m = re.match(r"^\s*(?:\d+\.\s+)?" + re.escape(name) + r"\((.*)$", line)
        if not m:
            continue
        rest, depth, i = m.group(1), 1, 0
        while i < len(rest) and depth:
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            i += 1
        if depth:
            continue
        args, tail = rest[:i - 1], rest[i:]
        ret = tail.split("->", 1)[1] if "->" in tail else ""
        out.append((split_top(args), clean(ret)))
    return out

def arg_entry(arg):
    if arg.startswith("*"):
        return arg.split(":")[0]
    name = arg.split(":", 1)[0].split("=", 1)[0].strip()
    return name + ("=" if "=" in arg.split(":", 1)[-1] or "=" in arg else "")

def callable_spec(name, obj, bound):
    """(overloads as arg-name lists, signature texts) of a pybind11 or Python callable."""
    sigs = signatures(name, getattr(obj, "__doc__", None))
    if not sigs and isinstance(obj, types.FunctionType):
        params = list(inspect.signature(obj).parameters.values())
        text = [str(p) for p in params]
        sigs = [(text, "")]
    if len(sigs) > 1:  # "name(*args, **kwargs)" heads the numbered overloads of an overloaded function
        sigs = [s for s in sigs if s[0] != ["*args", "**kwargs"]]
    overloads, texts = [], []
    for args, ret in sigs:
        if args and args[0].split(":")[0].strip() in ("self", "this") and bound:
            args = args[1:]
        overloads.append([arg_entry(a) for a in args])
        texts.append(clean("(" + ", ".join(args) + ")" + (" -> " + ret if ret else "")))
    return overloads, texts

def is_enum(cls):
    return isinstance(cls, type) and isinstance(getattr(cls, "__members__", None), dict)

def own(cls):
    return [c for c in cls.__mro__ if c.__module__.startswith("tensorrt")]

classes, enums, enum_values, pybind_names = {}, {}, {}, set()

def add_enum(qual, cls):
    members = cls.__members__
    enums[qual] = list(members)
    enum_values[qual] = [int(v) for v in members.values()]
    pybind_names.update(members)

def add_class(qual, cls):
    entry = {"bases": [b.__qualname__ for b in cls.__mro__[1:] if b.__module__.startswith("tensorrt")],
             "init": None, "methods": {}, "static_methods": {}, "signatures": {}, "properties": [],
             "readonly": [], "property_types": {}, "attributes": [],
             "buffer": "buffer protocol" in (cls.__doc__ or "")}
    seen = set()
    for base in own(cls):
        for name, raw in vars(base).items():
            if name in seen or name.startswith("__pybind11") or name in SKIP:
                continue
            seen.add(name)
            if isinstance(raw, property):
                entry["properties"].append(name)
                if raw.fset is None:
                    entry["readonly"].append(name)
                got = signatures("", raw.fget.__doc__) if raw.fget is not None else []
                entry["property_types"][name] = got[0][1] if got else ""
                pybind_names.add(name)
            elif type(raw).__name__ == "pybind11_static_property":
                entry["attributes"].append(name)
            elif isinstance(raw, staticmethod):
                ovl, txt = callable_spec(name, raw.__func__, False)
                entry["static_methods"][name] = ovl
                entry["signatures"][name] = txt
                pybind_names.add(name)
            elif is_enum(raw):
                add_enum(qual + "." + name, raw)
                entry["attributes"].append(name)
            elif callable(raw) and type(raw).__name__ in ("instancemethod", "function", "builtin_function_or_method"):
                ovl, txt = callable_spec(name, raw, True)
                entry["methods"][name] = ovl
                entry["signatures"][name] = txt
                if type(raw).__name__ != "function":
                    pybind_names.add(name)
            elif not callable(raw) and not isinstance(raw, (str, types.GetSetDescriptorType)):
                entry["attributes"].append(name)
    for base in own(cls):
        init = vars(base).get("__init__")
        if init is not None and type(init).__name__ == "instancemethod":
            ovl, txt = callable_spec("__init__", init, True)
            entry["init"] = ovl
            entry["signatures"]["__init__"] = txt
            break
    for key in ("properties", "readonly", "attributes"):
        entry[key].sort()
    classes[qual] = entry

functions, function_signatures, constants = {}, {}, {}
for name in sorted(dir(trt)):
    if name.startswith("_"):
        continue
    obj = getattr(trt, name)
    if isinstance(obj, types.ModuleType):
        continue
    if is_enum(obj):
        add_enum(name, obj)
    elif isinstance(obj, type):
        add_class(name, obj)
    elif callable(obj):
        if isinstance(obj, types.FunctionType) and obj.__module__ != "tensorrt":
            continue  # helpers imported into the package (warnings.warn, ...)
        ovl, txt = callable_spec(name, obj, False)
        functions[name] = ovl
        function_signatures[name] = txt
    elif is_enum(type(obj)):
        constants[name] = type(obj).__qualname__ + "." + obj.name
    elif isinstance(obj, (int, float, str)):
        constants[name] = obj

json.dump({"tensorrt_version": trt.__version__, "classes": classes, "enums": enums, "enum_values": enum_values,
           "functions": functions, "function_signatures": function_signatures, "constants": constants,
           "pybind_names": sorted(pybind_names)}, sys.stdout, sort_keys=True)
'''.replace("# <split_top>", inspect.getsource(split_top))


def binary_text(so: Path) -> str:
    """The binary's printable runs, NUL-separated (string literals, possibly tail-merged: "mark_output" may only
    occur as the end of "unmark_output")."""
    return "\0".join(m.decode() for m in re.findall(rb"[\x20-\x7e]{2,}", so.read_bytes()))


def extract(source: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="trtapi.") as tmp:
        workdir = Path(tmp)
        root, so, prov = stage_package(source, workdir)
        stubdir = stub_libraries(so, workdir)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(stubdir), env.get("LD_LIBRARY_PATH")) if p)
        env["PYTHONPATH"] = str(root)
        env["PYTHONWARNINGS"] = "ignore"
        done = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=workdir, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"importing the bindings against stubs failed:\n{done.stderr[-4000:]}")
        api = json.loads(done.stdout)
        text = binary_text(so)
    # Literals shorter than 8 bytes are often built with immediate stores rather than kept in .rodata.
    pybind_names = [n for n in api.pop("pybind_names") if len(n) >= 8]
    absent = [n for n in pybind_names if n not in text]
    if absent:
        raise SystemExit(f"names reported by the module but absent from the binary: {absent[:20]}")
    methods = sum(len(c["methods"]) + len(c["static_methods"]) for c in api["classes"].values())
    api["source"] = {**prov, "strategy": "import against stub libraries; docstrings, properties, enums read live",
                     "checked_names_in_binary": len(pybind_names)}
    api["counts"] = {"classes": len(api["classes"]), "methods": methods,
                     "properties": sum(len(c["properties"]) for c in api["classes"].values()),
                     "enums": len(api["enums"]), "functions": len(api["functions"])}
    return api


def dump(api: dict, expand: Callable[[str], bool] = lambda key: key not in ("source", "counts"),
         sort_inner: bool = True) -> str:
    """JSON with one line per entry of the dicts `expand` names (class, enum, function...), so that two versions
    diff line by line; `sort_inner`: sort the keys inside each entry too."""
    lines = []
    for key in sorted(api):
        value = api[key]
        if isinstance(value, dict) and expand(key):
            inner = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=sort_inner, separators=(',', ':'))}"
                     for k, v in sorted(value.items())]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(inner) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_listing(out: Path, text: str) -> None:
    """Write `text` to `out` atomically."""
    atomic_write(out, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="tensorrt-cuXX-bindings wheel (.whl) or its tensorrt*.so")
    ap.add_argument("--out", type=Path, default=API_DIR / "tensorrt_api.json")
    args = ap.parse_args(argv)
    api = extract(args.source)
    required = {"BuilderFlag": ["REFIT"], "NetworkDefinitionCreationFlag": ["STRONGLY_TYPED"],
                "MemoryPoolType": ["WORKSPACE"], "TensorIOMode": ["INPUT", "OUTPUT"],
                "ProfilingVerbosity": ["DETAILED"]}
    for enum, members in required.items():
        missing = [m for m in members if m not in api["enums"].get(enum, [])]
        if missing:
            raise SystemExit(f"{enum} lacks {missing}: extraction incomplete")
    write_listing(args.out, dump(api))
    c = api["counts"]
    print(f"TensorRT {api['tensorrt_version']}: {c['classes']} classes, {c['methods']} methods, "
          f"{c['properties']} properties, {c['enums']} enums, {c['functions']} functions -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
