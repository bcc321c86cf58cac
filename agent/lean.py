"""An idle daemon's memory (issue 10; docs/performance.md, "Idle memory").

``defer_import(name)`` puts a stand-in for module ``name`` in ``sys.modules``:
importing ``name`` then binds the stand-in, and the first use of any of its
attributes (read, write or delete) imports the real module, puts it back in
``sys.modules`` and on its package, and goes on with it. It is for modules
that code we do not own imports at module level but uses only on rare paths;
our own code imports such modules inside the function that needs them.

``ascii_idna()`` answers the ``idna`` codec for plain ASCII host names
without ``encodings.idna``, which imports ``stringprep`` and ``unicodedata``
(0.35 MiB) for the Unicode names a broker's host name never has; every other
input goes to the real codec. ``socket.getaddrinfo`` and ``ssl`` encode every
host name with ``idna``, so a broker connection loads it otherwise.

``release_memory()`` gives the free pages of the C heap back to the kernel
(glibc's ``malloc_trim``): memory freed after start-up or a job stays
resident otherwise, above all in the malloc arenas of worker threads.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer

# What the idle daemon would load only because another module imports it at
# module level (measured with bench/idle_rss.py; docs/performance.md):
# - urllib.request, with http.client and email.* (1.4 MiB): paho-mqtt uses it
#   only in Client._get_proxy(), after ``if socks is None: return None``
#   (PySocks is not a dependency); agent/adapters/edgecore.py only to ask a
#   configured MetaServer. (agent/adapters/registry.py subclasses one of its
#   classes at import, so a docker, containerd or auto backend loads it.)
# - bz2 and lzma (0.4 MiB with their C libraries): shutil imports them only to
#   learn whether they exist; tarfile imports them itself when it needs them.
# - uuid (0.15 MiB): structlog.threadlocal (a deprecated module structlog
#   imports anyway) and agent/messages/kubeedge.py call it, on a message.
# - tarfile and shutil (with zlib, grp and pwd: 0.35 MiB): the docker and
#   containerd backends extract and clean up with them in a job, but the
#   config imports a configured backend's module at start to parse its
#   settings. (argparse imports shutil for the terminal width whenever a parser
#   is built: agent/cli.py's formatter asks os instead.)
DEFERRED = ("urllib.request", "bz2", "lzma", "uuid", "tarfile", "shutil")
# Deferred only if their C part exists: a Python built without it must go on
# telling shutil that bz2 or lzma is missing.
_NEEDS = {"bz2": "_bz2", "lzma": "_lzma"}

_swap = threading.Lock()  # held only to swap sys.modules entries, never across an import
_trim: Callable[[int], int] | None = None
_later: asyncio.TimerHandle | None = None
SETTLE_SECONDS = 5.0


class _Deferred(types.ModuleType):
    """The stand-in: the real module is imported on the first attribute access."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_load(self), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        # A monkeypatch must reach the module the code calls, not the stand-in.
        setattr(_load(self), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(_load(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_load(self))


def _load(stub: _Deferred) -> types.ModuleType:
    name = stub.__name__
    with _swap:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
    # importlib's own per-module lock makes a concurrent first use (a worker
    # thread, say) wait for this import rather than run it twice.
    module = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    if parent and getattr(sys.modules.get(parent), child, None) is stub:
        setattr(sys.modules[parent], child, module)
    return module


def defer_import(name: str) -> None:
    """Import ``name`` on first use instead of now; no-op if it is already loaded."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)  # imports the parent package, if any
    if spec is None:
        return  # not installed: the real import raises, as it would have
    stub = _Deferred(name)
    # Set in the instance's dict, bypassing __setattr__. The import system reads
    # __spec__ (its ``_initializing``) when the name is imported again: a plain
    # attribute, so that read does not load the module.
    stub.__dict__.update(__spec__=spec, __loader__=spec.loader, __package__=spec.parent)
    with _swap:
        if name in sys.modules:
            return
        sys.modules[name] = stub
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stub)


def is_loaded(name: str) -> bool:
    """Whether module ``name`` is really imported (not absent, not a stand-in)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Deferred)


def defer_imports() -> None:
    """Defer every module of ``DEFERRED``; called before anything imports them."""
    for name in DEFERRED:
        if name not in _NEEDS or importlib.util.find_spec(_NEEDS[name]) is not None:
            defer_import(name)


def ascii_idna() -> None:
    """Serve ``idna`` for ASCII host names before the standard codec is asked.

    Only in front of ``encodings.search_function`` (Python's own codecs) can a
    search function answer a name the standard library also knows, hence the
    unregister and register again. A no-op once done, and too late (harmless)
    if something looked ``idna`` up before: the interpreter caches a lookup.
    """
    import encodings  # noqa: PLC0415 (loaded at interpreter start anyway)

    if _idna_search in _registered:
        return
    codecs.unregister(encodings.search_function)
    codecs.register(_idna_search)
    codecs.register(encodings.search_function)
    _registered.append(_idna_search)


def _idna_search(name: str) -> codecs.CodecInfo | None:
    return _IDNA if name == "idna" else None


def _idna_encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    # encodings.idna's own ASCII fast path, taken only where it succeeds: an
    # error, or any non-ASCII name, is the real codec's to raise or to map.
    if errors == "strict" and text.isascii():
        labels = text.split(".")
        if all(0 < len(label) < 64 for label in labels[:-1]) and len(labels[-1]) < 64:
            return text.encode("ascii"), len(text)
    return _real_idna().Codec().encode(text, errors)  # type: ignore[no-any-return]


def _idna_decode(data: Buffer, errors: str = "strict") -> tuple[str, int]:
    return _real_idna().Codec().decode(data, errors)  # type: ignore[no-any-return]


def _real_idna() -> types.ModuleType:
    import encodings.idna  # noqa: PLC0415 (the point: only for a name that needs it)

    return encodings.idna


_IDNA = codecs.CodecInfo(
    name="idna",
    encode=_idna_encode,
    decode=_idna_decode,
    incrementalencoder=lambda errors="strict": _real_idna().IncrementalEncoder(errors),
    incrementaldecoder=lambda errors="strict": _real_idna().IncrementalDecoder(errors),
    streamwriter=lambda stream, errors="strict": _real_idna().StreamWriter(stream, errors),
    streamreader=lambda stream, errors="strict": _real_idna().StreamReader(stream, errors),
)
_registered: list[Callable[[str], codecs.CodecInfo | None]] = []


def release_memory() -> None:
    """Return the C heap's free pages to the kernel, now and once more
    ``SETTLE_SECONDS`` later if an event loop runs.

    Called after READY=1 and after each job. The later pass is for what follows
    each: at start the broker connection (TLS handshake, the certificates'
    fingerprint) and the first presence (version detection), after a job the
    version check and presence, much of it in worker threads, whose malloc
    arenas glibc never trims by itself. A pass takes well under a millisecond.
    Only glibc has ``malloc_trim``; elsewhere (musl) this does nothing.
    """
    global _later  # noqa: PLW0603 (one pending pass at a time)
    _malloc_trim()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if _later is not None:
        _later.cancel()
    _later = loop.call_later(SETTLE_SECONDS, _malloc_trim)


def _malloc_trim() -> None:
    global _trim  # noqa: PLW0603 (looked up once)
    if _trim is None:
        try:
            # Only here: ctypes costs about 0.25 MiB, paid once a trim is wanted.
            import ctypes  # noqa: PLC0415

            _trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim = _no_trim
    _trim(0)


def _no_trim(_pad: int) -> int:
    return 0
