"""Strict stand-ins for TensorRT's Python module, generated from an extracted API listing (`tensorrt_api.json`).

`make_module(api, impls)` returns a module whose classes, enums, functions and constants are exactly those of the
real module, and which refuses what the real one refuses:

- reading a name the real class or module lacks raises AttributeError (so does writing one, or writing a
  read-only property: pybind11 objects take no new attributes);
- a call that none of the recorded overloads accepts raises TypeError, as pybind11 does: too many or too few
  arguments, unknown keyword names, or an argument of the wrong kind where the signature names one (an API class
  or enum, str, bool, int, float, a buffer, a sequence);
- constructing a class that has no Python constructor raises TypeError.

Every call is recorded in `module._fake_calls` as a `Call(name, args)` with the arguments bound to their names.
Behaviour comes from `impls`, keyed "Class.method", "Class.property" (a getter) or "function", each called as
`impl(self, **bound_args)` (getters: `impl(self)`); without one, a method returns a default of its recorded
return type: a new object of that API class, True for bool, 0, "", [] or None. Objects made by behaviours come
from `module._fake_new("Class", **state)`; state lives in `obj._fake_state`.

Where the real module converts implicitly, so does this one: a tuple or list of ints where a `Dims` is asked for
(polygraphy passes tuples to `IOptimizationProfile.set_shape`), and anything with `__index__` where an int is.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Call:
    name: str  # "Class.method", "Class.property=" for a property write, or "function"
    args: dict[str, Any] = field(default_factory=dict)


def split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, cur, quote = [], 0, "", None
    for ch in text:
        if quote:
            cur += ch
            quote = None if ch == quote else quote
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


@dataclass(frozen=True)
class Param:
    name: str
    optional: bool
    type: str


@dataclass(frozen=True)
class Overload:
    params: tuple[Param, ...]
    returns: str
    varargs: bool
    text: str


def parse_overload(names: list[str], text: str) -> Overload:
    """One overload from its argument names ("x=" optional) and its signature text "(a: T, b: U = d) -> R"."""
    head, _, ret = text.rpartition(") -> ") if ") -> " in text else (text.rstrip(")"), "", "")
    arg_texts = split_top(head.lstrip("("))
    types_by_name = {}
    for a in arg_texts:
        name, _, rest = a.partition(":")
        types_by_name[name.strip()] = rest.split(" = ")[0].strip()
    params = tuple(Param(n.rstrip("="), n.endswith("="), types_by_name.get(n.rstrip("="), ""))
                   for n in names if not n.startswith("*"))
    return Overload(params, ret.strip(), any(n.startswith("*") for n in names), text)


class FakeEnum:
    """Base of the generated enums; members are instances, like pybind11's."""

    _fake_name = ""
    __members__: ClassVar[dict[str, FakeEnum]] = {}

    def __init__(self, name: str, value: int) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{self!r}: enum members are read-only")

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self._fake_name, self.value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class FakeObject:
    """Base of the generated classes."""

    _fake_name = ""
    _fake_module: types.ModuleType
    _fake_props: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: object) -> None:
        if name.startswith("_fake_") or name in type(self)._fake_props:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"'tensorrt.tensorrt.{type(self)._fake_name}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        return f"<fake tensorrt.tensorrt.{type(self)._fake_name}>"


class _Property:
    def __init__(self, cls: str, name: str, typ: str, readonly: bool) -> None:
        self.cls, self.name, self.type, self.readonly = cls, name, typ, readonly

    def __get__(self, obj: FakeObject | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        mod = type(obj)._fake_module
        getter = _find_impl(mod, type(obj), self.name)
        if getter is not None:
            return getter(obj)
        if self.name in obj._fake_state:
            return obj._fake_state[self.name]
        return _default(mod, self.type, prop=True)

    def __set__(self, obj: FakeObject, value: object) -> None:
        if self.readonly:
            raise AttributeError(f"property '{self.name}' of 'tensorrt.tensorrt.{self.cls}' object has no setter")
        mod = type(obj)._fake_module
        if not _accepts(mod, self.type, value):
            raise TypeError(f"{self.cls}.{self.name}: incompatible value {value!r} (expects {self.type})")
        mod._fake_calls.append(Call(f"{self.cls}.{self.name}=", {"value": value}))
        obj._fake_state[self.name] = value


def _find_impl(mod: types.ModuleType, cls: type, name: str) -> Callable[..., Any] | None:
    for klass in cls.__mro__:
        key = f"{getattr(klass, '_fake_name', '')}.{name}"
        if key in mod._fake_impls:
            return mod._fake_impls[key]
    return None


def _lookup(mod: types.ModuleType, dotted: str) -> Any:
    obj: Any = mod
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _accepts(mod: types.ModuleType, typ: str, value: object) -> bool:
    typ = typ.strip()
    if typ.endswith("| None") or typ.startswith("typing.Optional["):
        if value is None:
            return True
        typ = typ.removesuffix("| None").strip().removeprefix("typing.Optional[").removesuffix("]")
    if not typ or typ in ("object", "typing.Any", "capsule"):
        return True
    if typ in ("int", "typing.SupportsInt"):
        return isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, float))
    if typ in ("float", "typing.SupportsFloat"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ == "bool":
        return isinstance(value, bool | int)
    if typ == "str":
        return isinstance(value, str | bytes)
    if typ in ("bytes", "typing_extensions.Buffer", "buffer", "collections.abc.Buffer"):
        try:
            memoryview(value)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True
    if typ.startswith(("collections.abc.Sequence[", "list[", "typing.List[", "tuple[")):
        return isinstance(value, list | tuple)
    target = _lookup(mod, typ)
    if isinstance(target, type):
        if isinstance(value, target):
            return True
        if typ.startswith("Dims") and isinstance(value, list | tuple):
            return all(isinstance(v, int) for v in value)
        return False
    return True  # a type the listing names but this module cannot check (numpy.ndarray, C++ names)


def _default(mod: types.ModuleType, typ: str, prop: bool = False) -> Any:
    typ = typ.strip()
    if typ in ("", "None"):
        return None
    if typ == "bool":
        return not prop  # methods returning bool report success; flags read as unset
    if typ == "int":
        return 0
    if typ == "float":
        return 0.0
    if typ == "str":
        return ""
    if typ.startswith(("list[", "collections.abc.Sequence[")):
        return []
    target = _lookup(mod, typ)
    if isinstance(target, type) and issubclass(target, FakeEnum):
        return next(iter(target.__members__.values()))
    if isinstance(target, type) and issubclass(target, FakeObject) and not prop:
        return mod._fake_new(target._fake_name)
    return None


def _bind(mod: types.ModuleType, qual: str, overloads: list[Overload], args: tuple, kwargs: dict) -> tuple[dict, str]:
    for ovl in overloads:
        if ovl.varargs and not ovl.params:
            return {"args": args, **kwargs}, ovl.returns
        if len(args) > len(ovl.params):
            continue
        bound = {p.name: a for p, a in zip(ovl.params, args, strict=False)}
        names = {p.name for p in ovl.params}
        if any(k not in names or k in bound for k in kwargs):
            continue
        bound.update(kwargs)
        if any(not p.optional and p.name not in bound for p in ovl.params):
            continue
        if all(_accepts(mod, p.type, bound[p.name]) for p in ovl.params if p.name in bound):
            return bound, ovl.returns
    supported = "\n".join(f"    {i + 1}. {qual}{o.text}" for i, o in enumerate(overloads))
    got = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    raise TypeError(f"{qual}(): incompatible function arguments. The following argument types are supported:\n"
                    f"{supported}\n\nInvoked with: {got}")


def _method(mod: types.ModuleType, cls: str, name: str, overloads: list[Overload]) -> Callable[..., Any]:
    qual = f"{cls}.{name}"

    def method(self: FakeObject, *args: Any, **kwargs: Any) -> Any:
        bound, ret = _bind(mod, qual, overloads, args, kwargs)
        mod._fake_calls.append(Call(qual, bound))
        impl = _find_impl(mod, type(self), name)
        return impl(self, **bound) if impl is not None else _default(mod, ret)

    method.__name__ = name
    method.__qualname__ = qual
    return method


def _static(mod: types.ModuleType, qual: str, overloads: list[Overload]) -> Callable[..., Any]:
    def function(*args: Any, **kwargs: Any) -> Any:
        bound, ret = _bind(mod, qual, overloads, args, kwargs)
        mod._fake_calls.append(Call(qual, bound))
        impl = mod._fake_impls.get(qual)
        return impl(None, **bound) if impl is not None else _default(mod, ret)

    function.__name__ = qual.rsplit(".", 1)[-1]
    return function


def _init(mod: types.ModuleType, cls: str, overloads: list[Overload] | None) -> Callable[..., None]:
    def __init__(self: FakeObject, *args: Any, **kwargs: Any) -> None:
        if overloads is None:
            raise TypeError(f"tensorrt.tensorrt.{cls}: No constructor defined!")
        bound, _ = _bind(mod, f"{cls}.__init__", overloads, args, kwargs)
        mod._fake_calls.append(Call(f"{cls}.__init__", bound))
        impl = _find_impl(mod, type(self), "__init__")
        if impl is not None:
            impl(self, **bound)

    return __init__


def _new_instance(cls: type) -> Any:
    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        obj = (bytes.__new__(klass) if issubclass(klass, bytes) else object.__new__(klass))
        object.__setattr__(obj, "_fake_state", {})
        return obj

    return __new__


def _buffer_getattribute(allowed: frozenset[str]) -> Callable[[Any, str], Any]:
    def __getattribute__(self: Any, name: str) -> Any:
        if name.startswith("_") or name in allowed:
            return object.__getattribute__(self, name)
        raise AttributeError(f"'tensorrt.tensorrt.{type(self)._fake_name}' object has no attribute '{name}'")

    return __getattribute__


def _dims_init(self: FakeObject, shape: Any = None, **dims: Any) -> None:
    values = list(shape) if shape is not None else [dims[k] for k in sorted(dims)]
    self._fake_state["dims"] = [int(v) for v in values]


def _dims_getitem(self: FakeObject, arg0: Any) -> Any:
    dims = self._fake_state.get("dims", [])
    return tuple(dims[arg0]) if isinstance(arg0, slice) else dims[arg0]  # IndexError ends iteration


def _dims_setitem(self: FakeObject, arg0: Any, arg1: Any) -> None:
    self._fake_state.setdefault("dims", [])[arg0] = int(arg1)


# Dims is plain data in the real module too: these behave as it does (index, length, compare, print).
DIMS_IMPLS: dict[str, Callable[..., Any]] = {
    "Dims.__init__": _dims_init,
    "Dims.__len__": lambda self: len(self._fake_state.get("dims", [])),
    "Dims.__getitem__": _dims_getitem,
    "Dims.__setitem__": _dims_setitem,
    "Dims.__eq__": lambda self, arg0: list(self._fake_state.get("dims", [])) == list(arg0),
    "Dims.__repr__": lambda self: repr(tuple(self._fake_state.get("dims", []))),
    "Dims.__str__": lambda self: str(tuple(self._fake_state.get("dims", []))),
}


def make_module(api: dict[str, Any], impls: dict[str, Callable[..., Any]] | None = None,
                name: str = "tensorrt") -> types.ModuleType:
    """A strict stand-in module for the API listing `api` (see the module docstring)."""
    mod = types.ModuleType(name, f"strict stand-in for tensorrt {api['tensorrt_version']}")
    mod.__version__ = api["tensorrt_version"]
    mod._fake_api = api
    mod._fake_calls = []
    mod._fake_impls = {**DIMS_IMPLS, **(impls or {})}
    classes_api: dict[str, dict[str, Any]] = api["classes"]

    def make_enum(qual: str) -> type:
        short = qual.rsplit(".", 1)[-1]
        cls = type(short, (FakeEnum,), {"_fake_name": qual, "__qualname__": qual, "__module__": "tensorrt.tensorrt"})
        members = {}
        for member, value in zip(api["enums"][qual], api["enum_values"][qual], strict=True):
            inst = object.__new__(cls)
            FakeEnum.__init__(inst, member, value)
            members[member] = inst
            setattr(cls, member, inst)
        cls.__members__ = members
        return cls

    for qual in api["enums"]:
        if "." not in qual:
            setattr(mod, qual, make_enum(qual))

    made: dict[str, type] = {}

    def make_class(cname: str) -> type:
        if cname in made:
            return made[cname]
        spec = classes_api[cname]
        bases = tuple(make_class(b) for b in spec["bases"] if b in classes_api and b != cname)[:1]
        buffer = spec.get("buffer", False)
        base_tuple: tuple[type, ...] = bases or (FakeObject,)
        if buffer:
            base_tuple = (bytes, *base_tuple)
        ns: dict[str, Any] = {"_fake_name": cname, "_fake_module": mod, "__qualname__": cname,
                              "__module__": "tensorrt.tensorrt",
                              "_fake_props": frozenset(spec["properties"]) - frozenset(spec["readonly"])}
        ns["__new__"] = _new_instance(FakeObject)
        inits = spec.get("init")
        ns["__init__"] = _init(mod, cname, None if inits is None else [
            parse_overload(o, t) for o, t in zip(inits, spec["signatures"]["__init__"], strict=True)])
        for meth, ovls in spec["methods"].items():
            texts = spec["signatures"].get(meth, [""] * len(ovls))
            ns[meth] = _method(mod, cname, meth, [parse_overload(o, t) for o, t in zip(ovls, texts, strict=True)])
        for meth, ovls in spec.get("static_methods", {}).items():
            texts = spec["signatures"].get(meth, [""] * len(ovls))
            ns[meth] = staticmethod(_static(mod, f"{cname}.{meth}",
                                            [parse_overload(o, t) for o, t in zip(ovls, texts, strict=True)]))
        for prop in spec["properties"]:
            ns[prop] = _Property(cname, prop, spec["property_types"].get(prop, ""), prop in spec["readonly"])
        if "__bool__" not in ns:
            ns["__bool__"] = lambda self: True
        if "__eq__" not in ns:
            ns["__eq__"] = object.__eq__
            ns["__hash__"] = object.__hash__
        if buffer:
            allowed = frozenset(spec["properties"]) | frozenset(spec["methods"])
            ns["__getattribute__"] = _buffer_getattribute(allowed)
        cls = type(cname, base_tuple, ns)
        made[cname] = cls
        return cls

    for cname in classes_api:
        setattr(mod, cname, make_class(cname))

    # Nested enums (ILogger.Severity, ...): a subclass re-exporting its base's enum gets the same object.
    for qual in api["enums"]:
        if "." not in qual:
            continue
        owner, short = qual.rsplit(".", 1)
        cls = made.get(owner)
        if cls is None:
            continue
        inherited = next((getattr(made[b], short) for b in classes_api[owner]["bases"]
                          if b in made and isinstance(getattr(made[b], short, None), type)
                          and list(getattr(made[b], short).__members__) == api["enums"][qual]), None)
        setattr(cls, short, inherited or make_enum(qual))
    for cname, spec in classes_api.items():
        cls = made[cname]
        nested = [v for klass in cls.__mro__ for v in vars(klass).values()
                  if isinstance(v, type) and issubclass(v, FakeEnum)]
        for attr in spec["attributes"]:
            if attr in cls.__dict__:
                continue
            # exported enum members (ILogger.WARNING is ILogger.Severity.WARNING), else a given value
            member = next((e.__members__[attr] for e in nested if attr in e.__members__), None)
            impl = mod._fake_impls.get(f"{cname}.{attr}")
            setattr(cls, attr, member if member is not None else (impl() if impl else None))

    for fname, ovls in api["functions"].items():
        texts = api.get("function_signatures", {}).get(fname, [""] * len(ovls))
        setattr(mod, fname, _static(mod, fname, [parse_overload(o, t) for o, t in zip(ovls, texts, strict=True)]))
    for cname, value in api["constants"].items():
        if isinstance(value, str) and "." in value:
            enum_name, member = value.rsplit(".", 1)
            enum = _lookup(mod, enum_name)
            if enum is not None and member in enum.__members__:
                value = enum.__members__[member]
        setattr(mod, cname, value)

    def _fake_new(cname: str, **state: Any) -> Any:
        cls = made[cname]
        data = state.pop("_bytes", b"")
        obj = bytes.__new__(cls, data) if issubclass(cls, bytes) else object.__new__(cls)
        object.__setattr__(obj, "_fake_state", dict(state))
        return obj

    mod._fake_new = _fake_new
    return mod
