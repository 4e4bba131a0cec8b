"""The capability boundary, checked on the code: no verb of what callers get (Provider,
ControllerSession, BlockDevice, BlockFile, the service client) takes or returns a device address
or a raw buffer address, and no public field of what those verbs return holds one. The few
exceptions are listed with the reason they are allowed; a new one fails here until it is
listed (and argued for).

Names are the evidence: nvmevfio names device addresses as the specifications do (IOVA, PRP,
ASQ/ACQ, DPTR, queue base, doorbell offset) and raw memory as addresses or pointers. The values
themselves are checked in the no-IOMMU lane by tests/leakscan.py (every public attribute of every
result against the pool's physical pages)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from nvmevfio.blockdev import BlockDevice, BlockFile, DeviceInfo
from nvmevfio.broker import Namespace, RegisteredBuffer
from nvmevfio.dma import DmaBuffer
from nvmevfio.events import AsyncEvent
from nvmevfio.nvme.controller import Registers
from nvmevfio.nvme.perfloop import PerfLoop
from nvmevfio.nvme.zns import Zone
from nvmevfio.provider import ControllerSession, Provider
from nvmevfio.service.client import ServiceBuffer, ServiceDevice, ServiceSlots
from nvmevfio.verbs import NamespaceVerb, Verb

# a device address (IOVA, physical), a PRP or a data pointer, a queue base, a doorbell's offset,
# or a raw host address / pointer
ADDRESS = re.compile(r"(^|_)(iovas?|phys(ical)?|paddr|vaddr|prps?|prp[12]|dptr|asq|acq|queue_base|base_addr|"
                     r"doorbell_offset|address|addr|ptr|pointer)($|_)")

SURFACE = [Provider, ControllerSession, BlockDevice, BlockFile, ServiceDevice]
RESULTS = [DmaBuffer, RegisteredBuffer, PerfLoop, Namespace, Registers, DeviceInfo, AsyncEvent, ServiceBuffer,
           ServiceSlots, Zone]

# (class, member): why it may carry an address
ALLOWED = {
    ("ControllerSession", "address"): "the PCI address of the function (0000:00:04.0), not a device address",
    ("DeviceInfo", "address"): "the PCI address of the function, as ControllerSession.address",
    ("Provider", "device_address"): "the validated lane (Model B) only: the daemon tells a client its own "
                                    "buffers' IOVAs, and validates every entry on the doorbell",
    ("Provider", "device_address_ranges"): "the validated lane's validator: the usable IOVA space",
    ("ServiceBuffer", "iova"): "the validated lane only (None otherwise): the client's own buffer's IOVA",
    ("Registers", "asq"): "the ASQ register's value: an IOVA with an IOMMU, withheld (None) in the no-IOMMU lane",
    ("Registers", "acq"): "the ACQ register's value: as asq",
}


def _public_members(cls: type) -> dict[str, object]:
    members: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass.__module__.split(".")[0] not in ("nvmevfio",):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                members[name] = value
        for name in getattr(klass, "__annotations__", {}):
            if not name.startswith("_"):
                members.setdefault(name, None)
        init = vars(klass).get("__init__")
        if inspect.isfunction(init):  # instance attributes: self.name = ... in __init__
            try:
                source = inspect.getsource(init)
            except OSError:  # generated (a dataclass's): its fields are read below
                source = ""
            for name in re.findall(r"self\.([a-z]\w*)\s*(?::[^=\n]*)?=(?!=)", source):
                members.setdefault(name, None)
    if dataclasses.is_dataclass(cls):
        members.update({f.name: None for f in dataclasses.fields(cls) if not f.name.startswith("_")})
    return members


def _callable(member: object) -> object:
    """What a member runs: a property's getter, a verb's declared method (nvmevfio/verbs.py)."""
    if isinstance(member, property):
        return member.fget
    if isinstance(member, (Verb, NamespaceVerb)):
        return member.method
    return member


def _parameters(member: object) -> list[str]:
    func = _callable(member)
    if isinstance(func, (staticmethod, classmethod)):
        func = func.__func__
    if not callable(func):
        return []
    try:
        return [p for p in inspect.signature(func).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        return []


def violations(cls: type) -> list[str]:
    """Members of ``cls`` whose name, or a parameter's name, says it is an address."""
    found = []
    for name, member in _public_members(cls).items():
        if ADDRESS.search(name) and not any((k.__name__, name) in ALLOWED for k in cls.__mro__):
            found.append(f"{cls.__name__}.{name}")
        found += [f"{cls.__name__}.{name}({p})" for p in _parameters(member) if ADDRESS.search(p)]
    return found


@pytest.mark.parametrize("cls", SURFACE + RESULTS, ids=lambda c: c.__name__)
def test_no_member_takes_or_returns_an_address(cls):
    assert violations(cls) == []


def test_the_surface_is_what_this_test_thinks_it_is():
    """Every verb's return annotation names a type checked here (or a plain value): a new result
    type must join RESULTS."""
    plain = {"None", "int", "str", "bool", "float", "bytes", "Any", "np.ndarray", "list[int]", "dict[str, Any]",
             "dict[str, int]", "tuple[int, bytes | None]", "Iterator[AsyncEvent]", "list[AsyncEvent]",
             "dict[int, Namespace]", "tuple[int, int]", "int | None", "bytes | None", "list[tuple[int, int]]",
             "list[tuple[int, int, str, int]]", "dict[str, dict[str, int]]"}
    known = {c.__name__ for c in RESULTS + SURFACE} | {"ServicePerfLoop", "BlockDevice", "BlockFile"}
    unknown = []
    for cls in SURFACE:
        for name, member in _public_members(cls).items():
            func = _callable(member)
            if not callable(func) or isinstance(func, type):
                continue
            ret = getattr(func, "__annotations__", {}).get("return")
            if ret is None:
                continue
            text = ret if isinstance(ret, str) else getattr(ret, "__name__", str(ret))
            if text not in plain and not any(t in known for t in re.findall(r"[A-Za-z_]+", text)):
                unknown.append(f"{cls.__name__}.{name} -> {text}")
    assert unknown == [], "add these result types to RESULTS (and check their fields): " + ", ".join(unknown)


def test_the_check_finds_an_address_wherever_it_is_named():
    """The checker is not blind: a planted verb, parameter and field are each found."""

    class Planted:
        def prp_entries(self) -> list[int]:
            return []

        def read_to(self, lba: int, host_ptr: int) -> None: ...

        def fine(self, lba: int, count: int) -> None: ...

        @property
        def sq_iova(self) -> int:
            return 0

    Planted.__module__ = "nvmevfio.planted"

    @dataclasses.dataclass
    class Result:
        phys_addr: int
        size: int

    Result.__module__ = "nvmevfio.planted"
    assert violations(Planted) == ["Planted.prp_entries", "Planted.read_to(host_ptr)", "Planted.sq_iova"]
    assert violations(Result) == ["Result.phys_addr"]


def test_every_allowed_exception_still_exists():
    """An exception left in ALLOWED after its member went away would hide a new one of that name."""
    classes = {c.__name__: c for c in SURFACE + RESULTS}
    stale = [f"{c}.{m}" for c, m in ALLOWED if m not in vars(classes[c]) and m not in _public_members(classes[c])]
    assert stale == []



def test_the_check_reads_a_verb_s_declared_method():
    """A verb declared once (nvmevfio/verbs.py) is checked on the component method it exposes."""

    class Component:
        def read_to(self, nsid: int, host_ptr: int) -> None: ...

    class Front:
        read_to = Verb(Component.read_to)
        ns_read = NamespaceVerb(Component.read_to, name="read_to")

    Front.__module__ = "nvmevfio.planted"
    assert violations(Front) == ["Front.read_to(host_ptr)", "Front.ns_read(host_ptr)"]


@pytest.mark.parametrize("cls", [Provider, BlockDevice], ids=lambda c: c.__name__)
def test_no_verb_is_a_one_line_hand_off(cls):
    """A method whose whole body hands its arguments to the same-named verb of the layer below is
    a verb written twice: declare it with Verb / NamespaceVerb instead (issue 22, item 4)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    twice = []
    for f in tree.body[0].body:
        if not isinstance(f, ast.FunctionDef) or f.decorator_list:
            continue
        body = [n for n in f.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if len(body) != 1 or not isinstance(body[0], (ast.Return, ast.Expr)) or body[0].value is None:
            continue
        call = body[0].value
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == f.name
                and isinstance(call.func.value, ast.Attribute) and call.func.value.attr in ("_broker", "provider")):
            continue
        passed = list(call.args) + [k.value for k in call.keywords]
        if all(isinstance(a, ast.Name) or (isinstance(a, ast.Attribute) and a.attr == "nsid") for a in passed):
            twice.append(f.name)  # its arguments handed on as they came: nothing of its own
    assert twice == []
