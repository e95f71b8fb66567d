"""The judge of assert tests and the plain data it trusts (paper 2.6.4; issue 20: a pass must mean the
tests ran to completion and held).

Standard library only: this module also runs inside the sandbox container, where the launcher
(``isolation.container_command``) registers its source as ``k15sys_sandbox_judge`` for the zygote.

An assert test runs in the *judge* (D), a process beside the program (C) that the program cannot
read or trace. After the program's top level, C sends its names: modules by name, plain values,
handles for everything else. D runs the test code against :class:`Remote` proxies of those names;
every use of a proxy (call, attribute, iteration, ``len``, index, ``str``, ``bool``; ``in`` iterates
here, so the item is never sent) is one message to C (:func:`serve`), answered with plain data
(:func:`encode`: None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset, checked
recursively; JSON with tagged containers, never pickle, never code) or a new handle. D compares
genuine built-in objects itself, so the program's ``__eq__`` never runs in D, and the test text and
expected values never reach C (only the arguments of the calls the test makes). Names of built-ins
and standard-library modules stay the judge's own, whatever the program bound to them.
"""
import base64
import builtins
import importlib
import json
import struct
import sys
import traceback
import types

MAX_MESSAGE = 16 << 20  # one message between the program and its judge
MAX_DEPTH = 200         # nesting of a value


def encode(value, handles=None, depth=0):
    """``value`` as plain data. In C, ``handles`` is its table: a non-plain object is stored there and
    sent as a handle. In D (``handles`` None) only plain data and D's :class:`Remote` handles may be
    sent; anything else is a TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested deeper than %d" % MAX_DEPTH)
    t = type(value)
    if value is None or t is bool or t is int or t is float or t is str:
        return value
    if isinstance(value, Remote):
        return {"h": object.__getattribute__(value, "_id")}
    if handles is None and t not in (bytes, list, tuple, dict, set, frozenset):
        raise TypeError("cannot pass a %s to the program (plain data only)" % t.__name__)
    # in C, subclasses of plain types are read as their plain value (the program controls them anyway)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    nested = lambda items: [encode(v, handles, depth + 1) for v in items]  # noqa: E731
    if isinstance(value, list):
        return nested(list.__iter__(value))
    if isinstance(value, tuple):
        return {"t": nested(tuple.__iter__(value))}
    if isinstance(value, frozenset):
        return {"f": nested(frozenset.__iter__(value))}
    if isinstance(value, set):
        return {"s": nested(set.__iter__(value))}
    if isinstance(value, dict):
        return {"d": [[encode(k, handles, depth + 1), encode(v, handles, depth + 1)]
                      for k, v in dict.items(value)]}
    handles[len(handles) + 1] = value
    return {"h": len(handles)}


def decode(obj, resolve, depth=0):
    """Rebuild plain data from ``encode``'s form; ``resolve(id)`` turns a handle into an object."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested deeper than %d" % MAX_DEPTH)
    t = type(obj)
    if obj is None or t is bool or t is int or t is float or t is str:
        return obj
    if t is list:
        return [decode(v, resolve, depth + 1) for v in obj]
    if t is dict and len(obj) == 1:
        (tag, body), = obj.items()
        if tag == "h" and type(body) is int:
            return resolve(body)
        if tag == "b" and type(body) is str:
            return base64.b64decode(body, validate=True)
        if type(body) is list:
            if tag == "t":
                return tuple(decode(v, resolve, depth + 1) for v in body)
            if tag == "s":
                return set(decode(v, resolve, depth + 1) for v in body)
            if tag == "f":
                return frozenset(decode(v, resolve, depth + 1) for v in body)
            if tag == "d":
                return {decode(k, resolve, depth + 1): decode(v, resolve, depth + 1) for k, v in body}
    raise ValueError("not plain data: %r" % (obj,))


class Channel:
    """Length-prefixed JSON messages on a stream socket, bounded in size."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, obj):
        data = json.dumps(obj).encode()
        if len(data) > MAX_MESSAGE:
            raise ValueError("message of %d bytes (limit %d)" % (len(data), MAX_MESSAGE))
        self.sock.sendall(struct.pack(">I", len(data)) + data)

    def recv(self):
        head = self._exact(4)
        if head is None:
            return None
        size = struct.unpack(">I", head)[0]
        if size > MAX_MESSAGE:
            raise ValueError("message of %d bytes (limit %d)" % (size, MAX_MESSAGE))
        data = self._exact(size)
        return None if data is None else json.loads(data)

    def _exact(self, n):
        buf = bytearray(n)
        view, pos = memoryview(buf), 0
        while pos < n:
            got = self.sock.recv_into(view[pos:])
            if not got:
                return None
            pos += got
        return bytes(buf)


class ProgramGone(BaseException):
    """The program exited or died during a call: the test cannot pass (not an ``Exception``, so a test's
    ``except Exception`` does not swallow it)."""


class Remote:
    """D's handle to an object that stays in the program's process; every use is a call over the socket."""

    __slots__ = ("_id",)
    channel = None  # set by the judge
    gone = False    # the program exited during a call: the test fails even if it caught that

    def __init__(self, ident):
        object.__setattr__(self, "_id", ident)

    def _ask(self, op, **extra):
        extra.update(op=op, h=object.__getattribute__(self, "_id"))
        Remote.channel.send(extra)
        reply = Remote.channel.recv()
        if reply is None:
            Remote.gone = True
            raise ProgramGone("the program exited during the test")
        if "v" in reply:
            return decode(reply["v"], Remote)
        if "e" in reply:
            name, message = reply["e"]
            kind = getattr(builtins, str(name), None)
            if isinstance(kind, type) and issubclass(kind, Exception):
                raise kind(message)
            raise RuntimeError("the program raised %s: %s" % (name, message))
        Remote.gone = True
        raise ProgramGone("the program exited (%s) during the test" % reply.get("x"))

    def __call__(self, *args, **kwargs):
        return self._ask("call", a=encode(list(args)), k=encode(kwargs))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", n=name)

    def __iter__(self):
        return iter(self._ask("list"))

    def __len__(self):
        return self._ask("len")

    def __getitem__(self, key):
        return self._ask("getitem", i=encode(key))

    def __contains__(self, item):  # decided here: the item (often the expected value) is not sent
        return item in self._ask("list")

    def __str__(self):
        return self._ask("str")

    def __bool__(self):
        return self._ask("bool")

    def __repr__(self):
        return "<object #%d of the program>" % object.__getattribute__(self, "_id")


def run_test(test, sock):
    """D: run the assert-test code against the program on the other end of ``sock``; returns
    ``(passed, message)``. It passes only if the program's top level finished, the test code ran to its
    end, and the program never exited during a call."""
    Remote.channel, Remote.gone = Channel(sock), False
    channel = Remote.channel
    try:
        hello = channel.recv()
        if hello is None:
            return False, "the program exited before its tests ran"
        if not hello.get("ok"):
            return False, str(hello.get("why"))[:2000]
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        for name, entry in hello["names"].items():
            if hasattr(builtins, name):  # the test's sorted/len/abs/... stay the judge's own
                continue
            if name in sys.stdlib_module_names:  # math.isclose in a test is the real one, whatever the program bound
                try:
                    namespace[name] = importlib.import_module(name)
                    continue
                except Exception:
                    pass
            if "m" in entry:  # a module: the judge's own copy
                try:
                    namespace[name] = importlib.import_module(entry["m"])
                except Exception:
                    pass
            else:
                namespace[name] = decode(entry["v"], Remote)
        exec(compile(test, "<test>", "exec"), namespace)
        if Remote.gone:
            return False, "the program exited during the test (the test caught it)"
        return True, ""
    except BaseException as e:  # where in the test, and what (the judge's own frames are left out)
        source = test.splitlines()
        where = ["test line %d: %s\n" % (f.lineno, source[f.lineno - 1].strip())
                 for f in traceback.extract_tb(e.__traceback__)
                 if f.filename == "<test>" and 0 < f.lineno <= len(source)]
        return False, ("".join(where) + "".join(traceback.format_exception_only(type(e), e)))[-4000:]


def _apply(request, handles):
    """One call of the judge on the program's objects (in C)."""
    resolve = handles.__getitem__
    target = resolve(request["h"])
    op = request["op"]
    if op == "call":
        args = decode(request["a"], resolve)
        kwargs = decode(request["k"], resolve)
        return target(*args, **kwargs)
    if op == "getattr":
        return getattr(target, request["n"])
    if op == "list":
        return list(target)
    if op == "len":
        return len(target)
    if op == "getitem":
        return target[decode(request["i"], resolve)]
    if op == "str":
        return str(target)
    if op == "bool":
        return bool(target)
    raise ValueError("unknown operation %r" % (op,))


def serve(namespace, failure, sock):
    """C, after the program's top level (``failure``: why it did not finish, or None): send its names,
    then answer the judge's calls until the judge closes ``sock``."""
    channel = Channel(sock)
    if failure:
        channel.send({"ok": False, "why": failure})
        return
    handles = {}
    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            names[name] = {"m": str(value.__name__)}
            continue
        try:
            names[name] = {"v": encode(value, handles)}
        except (ValueError, RecursionError):
            handles[len(handles) + 1] = value
            names[name] = {"v": {"h": len(handles)}}
    channel.send({"ok": True, "names": names})
    while True:
        request = channel.recv()
        if request is None:
            return
        try:
            reply = {"v": encode(_apply(request, handles), handles)}
        except Exception as e:
            reply = {"e": [type(e).__name__, str(e)[:2000]]}
        except BaseException as e:  # SystemExit, KeyboardInterrupt inside a tested function
            reply = {"x": type(e).__name__}
        channel.send(reply)
