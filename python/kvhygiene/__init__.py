"""kvhygiene for PyTorch: verified zeroization of freed GPU memory.

Three calls cover the integration::

    import kvhygiene
    kvhygiene.install()              # before the first CUDA allocation
    with kvhygiene.context(tenant_id="acme", request_id="r-42", model_id="llama-3-8b"):
        ...                          # tensors allocated here are stamped with these ids
    kvhygiene.stats()                # the allocator's counters as a dict

Engines with a paged KV cache (vLLM, SGLang) hand cache blocks between requests themselves;
they call :func:`scrub_blocks` when blocks leave a request::

    layout = kvhygiene.KvLayout.from_tensors(kv_caches, block_dim=1)   # once
    kvhygiene.scrub_blocks(layout, finished_request_block_ids)          # per finished request

and, as the eviction gate that catches a free path the engine forgot, claim blocks when they
are handed to a request (inside its ``context``)::

    kvhygiene.claim_blocks(layout, newly_allocated_block_ids)          # per block allocation

``kvhygiene.vllm`` does the claims from a vLLM v1 worker's ``SchedulerOutput``;
``kvhygiene.sglang`` puts the scrub on an SGLang token allocator's ``free``.

``install`` makes ``libkvhygiene.so`` PyTorch's CUDA allocator through
``torch.cuda.memory.CUDAPluggableAllocator``: every tensor's memory then comes from the
kvhygiene pool, and memory freed by one request is zeroed and verified before any other
request can get it back.

The package is pure Python (ctypes); the library is found by :func:`find_library`. Only
:func:`install` needs torch; everything else works on the host backend without it, which is how
the tests run in CI.
"""

from __future__ import annotations

import atexit
import collections.abc
import contextlib
import collections.abc
import contextvars
import ctypes
import functools
import inspect
import json
import numbers
import operator
import os
import re
import sys
import threading
import types
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Tuple

__all__ = [
    "KvhError",
    "ScrubVerificationError",
    "ClaimRefusedError",
    "AllocatorAlreadyInUseError",
    "GRAPH_CAPTURE_REFUSED",
    "KvLayout",
    "scrub_blocks",
    "claim_blocks",
    "refuse_blocks",
    "find_library",
    "load",
    "install",
    "installed",
    "context",
    "task_factory",
    "install_asyncio",
    "stats",
    "memory_stats",
    "synchronize",
    "empty_cache",
    "forget_stream",
    "mark_ipc_exported",
    "version",
]

LIBRARY_NAME = "libkvhygiene.so"
#: The LD_PRELOAD library, which exports the same C API as ``LIBRARY_NAME``.
PRELOAD_LIBRARY_NAME = "libkvhygiene_preload.so"
# The C ABI's result codes (``kvh_result`` in include/kvhygiene.h, which says what each
# means): what :attr:`KvhError.code` holds.
KVH_OK = 0
KVH_ERR_PANIC = 7000
KVH_ERR_NULL_PARAMETER = 7001
KVH_ERR_INVALID_SIZE = 7002
KVH_ERR_OUT_OF_MEMORY = 7003
#: A pointer inside no memory kvhygiene holds (an invalid free; mark_ipc_exported: not its to
#: mark).
KVH_ERR_UNKNOWN_POINTER = 7004
KVH_ERR_DOUBLE_FREE = 7005
KVH_ERR_INTERIOR_POINTER = 7006
KVH_ERR_SIZE_MISMATCH = 7007
KVH_ERR_WRONG_DEVICE = 7008
#: A scrub that did not verify.
KVH_ERR_VERIFY_FAILED = 7009
KVH_ERR_INVALID_CONTEXT = 7010
KVH_ERR_CONFIG = 7011
KVH_ERR_BACKEND = 7012
#: A caller's buffer too small (out_len says how much).
KVH_ERR_BUFFER_TOO_SMALL = 7013
KVH_ERR_INVALID_DEVICE = 7014
KVH_ERR_CAPTURE_ACTIVE = 7015
KVH_ERR_SHUTTING_DOWN = 7016
KVH_ERR_UNKNOWN_CODE = 7017
KVH_ERR_LOG = 7018
KVH_ERR_INVALID_LAYOUT = 7019
#: Memory not inside a live allocation of kvhygiene.
KVH_ERR_NOT_LIVE = 7020
#: A claim the eviction gate refused (``KVH_KV_GATE=enforce``).
KVH_ERR_KV_GATE = 7021
#: A claim some of whose blocks another claim took while the claim ran.
KVH_ERR_KV_TAKEN = 7022
KVH_ERR_FORKED_CHILD = 7023


class KvhError(RuntimeError):
    """A kvhygiene call failed; ``code`` is the library's error code."""

    def __init__(self, call: str, code: int, message: str):
        super().__init__(f"{call} failed: {message} (kvhygiene error {code})")
        self.call = call
        self.code = code
        self.message = message

    def __reduce__(self):
        # Pickled with the constructor's arguments (an engine's worker processes send their
        # exceptions to the driver pickled), not with the formatted text alone, and with the
        # attributes set since (``refused_requests`` of a scheduled claim).
        return (type(self), (self.call, self.code, self.message), self.__dict__)


class ScrubVerificationError(KvhError):
    """:func:`scrub_blocks` ran, but ``failed_blocks`` did not verify zero: they must not be
    handed to another request (retire them)."""

    def __init__(self, failed_blocks: list, scrubbed: int):
        super().__init__(
            "kvh_scrub_blocks",
            KVH_ERR_VERIFY_FAILED,
            f"{len(failed_blocks)} of {scrubbed} KV blocks failed verification "
            f"(first: {failed_blocks[0] if failed_blocks else None}); they must not be reused",
        )
        self.failed_blocks = failed_blocks
        self.scrubbed = scrubbed

    def __reduce__(self):
        return (type(self), (self.failed_blocks, self.scrubbed), self.__dict__)


class ClaimRefusedError(KvhError):
    """:func:`claim_blocks` did not hand ``refused_blocks`` to the request: their scrub failed
    verification (``code`` 7009; the other blocks were handed over), another claim took them
    while the claim ran (``code`` 7022: two requests were given the same blocks, or
    the gate lost track of them, its ledger pushed out at every try; the other blocks were
    handed over), or, with ``KVH_KV_GATE=enforce``, some would change owner
    without a verified scrub (``code`` 7021; nothing of the refusing library call was handed
    over, so ``refused_blocks`` holds all its blocks, and a claim split over several calls
    hands over the calls before it: see :func:`claim_blocks`). Refused blocks must not be
    used.

    ``unscrubbed_blocks`` (7021 only, else empty) are the blocks among them the library named
    as changing owner unscrubbed or failed at their last scrub: :func:`scrub_blocks` them
    before claiming the set again. The others of the refused call had passed the gate."""

    def __init__(self, code: int, message: str, refused_blocks: list, unscrubbed_blocks: Optional[list] = None):
        super().__init__("kvh_claim_blocks", code, message)
        self.refused_blocks = refused_blocks
        self.unscrubbed_blocks = [] if unscrubbed_blocks is None else unscrubbed_blocks

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.refused_blocks, self.unscrubbed_blocks), self.__dict__)


class AllocatorAlreadyInUseError(RuntimeError):
    """:func:`install` was called after CUDA was initialised in this process (a first tensor
    on CUDA, or any call that initialises it): PyTorch's allocator is then set up, whether or
    not it holds memory yet, and cannot be swapped."""


_lock = threading.RLock()


def _new_lock_in_child() -> None:
    # Another thread may have held the lock (inside install(), say) when this process forked:
    # held for good in the child, it would hang the child's first load(). The child has one
    # thread, so no call of its own can be inside the lock.
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None
#: The library loaded (``_lib_path`` is the name it was loaded by).
_lib_loaded: Optional[_Loaded] = None
_allocator = None
_reset_hook_installed = False


def _candidates(path: Optional[str]) -> list:
    """Where to look for the library, in order. A path the caller or ``KVH_LIBRARY`` names is
    the only candidate: when it is wrong, another build must not be loaded in its place."""
    if path is not None:
        return [Path(path)]
    env = os.environ.get("KVH_LIBRARY")
    if env:
        return [Path(env)]
    # Only places fixed by where the package lies, never the working directory: a process
    # started in a directory someone else can write to would load (and run) their library.
    out = []
    here = Path(__file__).resolve().parent
    out.append(here / LIBRARY_NAME)  # a wheel that carries the library
    out.append(here.parent.parent / "lib" / LIBRARY_NAME)  # a release distribution's python/
    checkout = here.parent.parent
    if (checkout / "Cargo.toml").is_file() and (checkout / "python" / "kvhygiene").is_dir():
        out.append(checkout / "target" / "release" / LIBRARY_NAME)  # the source checkout's build
    return out


def find_library(path: Optional[str] = None) -> str:
    """The absolute path of ``libkvhygiene.so``: ``path`` if given, else ``$KVH_LIBRARY`` (each
    alone), else the package directory, then ``lib/`` of the release distribution the package
    came in (``OUTDIR/python`` beside ``OUTDIR/lib``), then ``target/release`` of the source
    checkout the package lies in. Never the current directory, whose files another user may
    have put there. Absolute, since PyTorch loads it again later, maybe from another working
    directory.

    Raises ``FileNotFoundError`` naming every place searched.
    """
    tried = _candidates(path)
    for candidate in tried:
        if candidate.is_file():
            return str(candidate.resolve())
    hint = "build it with `cargo build --release`, or name the built file (path or KVH_LIBRARY)"
    if path is not None:
        raise FileNotFoundError(f"{LIBRARY_NAME}: {path} is not a file; {hint}")
    if os.environ.get("KVH_LIBRARY"):
        raise FileNotFoundError(f"{LIBRARY_NAME}: {tried[0]} (from KVH_LIBRARY) is not a file; {hint}")
    where = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (searched: {where}); build it with "
        "`cargo build --release` or set KVH_LIBRARY"
    )


class _CLayout(ctypes.Structure):
    """``kvh_kv_layout`` of include/kvhygiene.h."""

    _fields_ = [
        ("region_bases", ctypes.POINTER(ctypes.c_uint64)),
        ("region_count", ctypes.c_size_t),
        ("block_bytes", ctypes.c_uint64),
        ("block_stride", ctypes.c_uint64),
        ("blocks_per_region", ctypes.c_uint64),
    ]


#: Arguments of kvh_scrub_blocks and kvh_claim_blocks: layout, ids, count, device, stream, and
#: the buffer, capacity and count of the blocks they name back.
_KV_CALL_ARGS = [
    ctypes.POINTER(_CLayout),
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_size_t),
]


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and return types of the C ABI (include/kvhygiene.h)."""
    c_ssize = ctypes.c_ssize_t
    sigs = {
        "kvh_malloc": (ctypes.c_void_p, [c_ssize, ctypes.c_int, ctypes.c_void_p]),
        "kvh_free": (None, [ctypes.c_void_p, c_ssize, ctypes.c_int, ctypes.c_void_p]),
        "kvh_free_checked": (
            ctypes.c_int,
            [ctypes.c_void_p, c_ssize, ctypes.c_int, ctypes.c_void_p],
        ),
        "kvh_record_stream": (None, [ctypes.c_void_p, ctypes.c_void_p]),
        "kvh_forget_stream": (None, [ctypes.c_void_p]),
        "kvh_mark_ipc_exported": (ctypes.c_int, [ctypes.c_void_p]),
        "kvh_empty_cache": (None, []),
        "kvh_set_context": (
            ctypes.c_int,
            [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p],
        ),
        "kvh_clear_context": (None, []),
        "kvh_synchronize": (ctypes.c_int, []),
        "kvh_stats_json": (
            ctypes.c_int,
            [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
        ),
        "kvh_last_error": (ctypes.c_uint32, []),
        "kvh_strerror": (
            ctypes.c_int,
            [
                ctypes.c_uint32,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_size_t),
            ],
        ),
        "kvh_last_error_message": (
            ctypes.c_int,
            [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
        ),
        "kvh_version": (ctypes.c_char_p, []),
        "kvh_scrub_blocks": (ctypes.c_int, _KV_CALL_ARGS),
        "kvh_claim_blocks": (ctypes.c_int, _KV_CALL_ARGS),
        "kvh_refuse_blocks": (
            ctypes.c_int,
            [
                ctypes.POINTER(_CLayout),
                ctypes.POINTER(ctypes.c_uint32),
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_char_p,
            ],
        ),
        "kvh_memory_stats_json": (
            ctypes.c_int,
            [
                ctypes.c_int32,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_size_t),
            ],
        ),
        "kvh_reset_peak_memory_stats": (ctypes.c_int, [ctypes.c_int32]),
        "kvh_reset_accumulated_memory_stats": (ctypes.c_int, [ctypes.c_int32]),
        "kvh_shutdown": (None, []),
        "kvh_init": (ctypes.c_int, []),
        "kvh_check_config": (ctypes.c_int, []),
        "kvh_oom_throws": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


class _DlInfo(ctypes.Structure):
    """``Dl_info`` of ``<dlfcn.h>``."""

    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


#: Exports a library must have, all from one object, to be taken for a kvhygiene already
#: loaded: one exported name alone could be another library's.
_KVHYGIENE_EXPORTS = ("kvh_malloc", "kvh_free", "kvh_version", "kvh_init", "kvh_stats_json")


class _Loaded(NamedTuple):
    """A kvhygiene library: the name to load it by, its file's path (for messages), and,
    once it is in the process, its loader handle, which is the same for every name of one
    loaded object and differs for any other object (``None`` before it is loaded)."""

    name: str
    file: str
    handle: Optional[int]


def _handle_if_loaded(name: str) -> Optional[int]:
    """The loader's handle of the object ``name`` loads, when it is loaded already (by that
    name, or its file by device and inode as the loader recorded them); ``None`` when it is
    not, without loading anything (``RTLD_NOLOAD``)."""
    try:
        return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.DEFAULT_MODE)._handle
    except OSError:
        return None


def _preloaded() -> Optional[_Loaded]:
    """A kvhygiene library this process already has in its global symbol scope (the
    LD_PRELOAD library, which exports the same C API, or one loaded with ``RTLD_GLOBAL``);
    ``None`` when it has none.

    Found by what it exports, not by a file name on disk. Its name is the loader's own
    (``LD_PRELOAD``'s as written, a relative or symlinked one included): loading that name
    returns the loaded library, also after a ``chdir`` or when its file was deleted or
    replaced since."""
    try:
        process = ctypes.CDLL(None)
        dladdr = process.dladdr
    except (AttributeError, OSError):  # no dladdr (neither glibc nor musl)
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    objects = set()
    for export in _KVHYGIENE_EXPORTS:
        symbol = getattr(process, export, None)
        info = _DlInfo()
        if symbol is None or not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)):
            return None
        if not info.dli_fname:
            return None
        objects.add((info.dli_fbase, os.fsdecode(info.dli_fname)))
    if len(objects) != 1:
        return None
    ((base, name),) = objects
    file = _mapped_path(base) or os.path.abspath(name)
    return _Loaded(name, file, _handle_if_loaded(name))


def _mapped_path(base: Optional[int]) -> Optional[str]:
    """The path of the file mapped at ``base`` (a loaded object's first mapping), as
    ``/proc/self/maps`` writes it, for messages; ``None`` when none is found."""
    if not base:
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and int(fields[0].split("-")[0], 16) == base:
                    path = fields[5].rstrip("\n")
                    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path
    except (OSError, ValueError):
        return None
    return None


def _is_loaded_file(path: str, loaded: _Loaded) -> bool:
    """Whether ``path`` names the library ``loaded``, as the dynamic loader judges it (the
    name it was loaded by, or its file by device and inode as the loader recorded them): the
    object ``path`` loads is loaded already, and is that one (not another object, such as a
    library that links it)."""
    handle = _handle_if_loaded(path)
    return handle is not None and handle == loaded.handle


def _exec_ld_preload() -> str:
    """``LD_PRELOAD`` as the loader saw it (the environment at exec, which the program may
    have changed since), else as it is now."""
    try:
        with open("/proc/self/environ", "rb") as env:
            entries = env.read().split(b"\0")
    except OSError:
        return os.environ.get("LD_PRELOAD", "")
    # The loader takes the last assignment; none means the process started without it.
    found = [e[len(b"LD_PRELOAD=") :] for e in entries if e.startswith(b"LD_PRELOAD=")]
    return os.fsdecode(found[-1]) if found else ""


def _preloaded_by_ld_preload(loaded: _Loaded) -> bool:
    """Whether ``LD_PRELOAD`` named the library ``loaded``: as the loader's name, by a bare
    file name the loader searched for, or as a path to its file."""
    entries = _exec_ld_preload().replace(":", " ").split()
    base = {os.path.basename(loaded.name), os.path.basename(loaded.file)}
    return any(
        e == loaded.name or ("/" not in e and e in base) or _is_loaded_file(e, loaded)
        for e in entries
    )


def _second_kvhygiene(loaded: _Loaded, named: str) -> ValueError:
    """The refusal to load ``named`` beside the kvhygiene ``loaded``."""
    if _preloaded_by_ld_preload(loaded):
        how = "by LD_PRELOAD"
        fix = (
            "Use one route: remove LD_PRELOAD (the PyTorch route), or leave the path unset "
            "(or name the preloaded file) to use the preloaded one"
        )
    else:
        how = "by this process"
        fix = "Leave the path unset (or name that file) to use it"
    return ValueError(
        f"kvhygiene is already loaded in this process ({loaded.file}, {how}) and runs its "
        f"allocator; loading {named} would start a second one. {fix}"
    )


def _library_to_load(path: Optional[str]) -> Tuple[_Loaded, bool]:
    """The library :func:`load` loads, and whether the process has it already: a kvhygiene
    the process has in its global scope, since it already holds the process's allocator (a
    second library would run a second one, with its own pools and log chain, and the first
    to start takes the HMAC secret from the environment); else :func:`find_library`'s. A
    ``path`` naming another file than the loaded one is a ``ValueError``: the two are not
    combined. ``$KVH_LIBRARY`` is not used then: it says where the library is for processes
    that have none (an image sets it for every process, those started with LD_PRELOAD too)."""
    loaded = _preloaded()
    if loaded is None:
        found = find_library(path)
        return _Loaded(found, found, None), False
    if path is not None:
        wanted = find_library(path)
        if not _is_loaded_file(wanted, loaded):
            raise _second_kvhygiene(loaded, path)
    return loaded, True


def load(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads the library once per process (later calls return the same handle). A ``path``
    given once it is loaded must name the same file: ``FileNotFoundError`` when it names
    none, ``ValueError`` when it names another. ``OSError`` when the file is not a library
    this process can load, not kvhygiene's, or a kvhygiene of another build that lacks an
    export this package uses (the message gives its version). In a process started with the
    LD_PRELOAD library it is that library (one process runs one kvhygiene): a ``path`` naming
    another file is then a ``ValueError``, and ``$KVH_LIBRARY`` is not used."""
    global _lib, _lib_path, _lib_loaded
    with _lock:
        if _lib is not None and path is not None:
            wanted = find_library(path)
            if not _is_loaded_file(wanted, _lib_loaded):
                raise _second_kvhygiene(_lib_loaded, path)
        if _lib is None:
            loaded, already = _library_to_load(path)
            # A library the process has is loaded by the loader's own name, and only if it is
            # still that one (RTLD_NOLOAD): never a second copy from the file now there.
            mode = os.RTLD_NOLOAD | ctypes.DEFAULT_MODE if already else ctypes.DEFAULT_MODE
            lib = ctypes.CDLL(loaded.name, mode=mode)
            try:
                _declare(lib)
            except AttributeError as e:  # a library, but not kvhygiene's, or not this one
                raise OSError(_not_this_library(lib, loaded.name, e)) from e
            _lib, _lib_path = lib, loaded.name
            _lib_loaded = loaded._replace(handle=lib._handle)
            # Registered at first load, so that it runs late at exit (atexit runs handlers in
            # reverse order): after handlers registered later that may still free or allocate
            # CUDA memory. It scrubs and verifies everything freed and writes the log's stop
            # record while CUDA is still up; the library's own exit handler then makes no
            # driver calls, and tensors still alive after it are leaked, not scrubbed.
            atexit.register(lib.kvh_shutdown)
            _shut_down_in_forked_workers(lib)
        return _lib


def _not_this_library(lib: ctypes.CDLL, name: str, missing: AttributeError) -> str:
    """Why library ``name`` cannot serve this package, which lacks an export (``missing``):
    not kvhygiene at all, or a kvhygiene of another build (an older ``KVH_LIBRARY``, a stale
    ``target/``), said with its version, so the fix (load the matching build) is plain."""
    if not all(hasattr(lib, export) for export in _KVHYGIENE_EXPORTS):
        return f"{name} is not {LIBRARY_NAME}: {missing}"
    # Every one of kvhygiene's own exports is there: its kvh_version is kvhygiene's.
    version_of = lib.kvh_version
    version_of.restype, version_of.argtypes = ctypes.c_char_p, []
    version = (version_of() or b"unknown").decode("utf-8", "replace")
    return (
        f"{name} is a {LIBRARY_NAME} of another build (version {version}) than this package "
        f"was written for ({missing}): load the library built from the same tree or release "
        "as the package (rebuild it, or point KVH_LIBRARY at that one)"
    )


def _shut_down_in_forked_workers(lib) -> None:
    """Makes a worker that ``multiprocessing`` forks shut kvhygiene down as it ends.

    A forked worker (start method ``fork`` or ``forkserver``) ends with ``os._exit``, which
    runs neither Python's ``atexit`` handlers nor the C library's: a kvhygiene the worker
    started (its first allocation came after the fork) would leave frees unverified and its
    log chain without a ``stop`` record, which reads as a crash. ``multiprocessing`` runs its
    finalizers before that ``os._exit`` (once the worker's target returned). Loaded in the
    worker, the finalizer is registered at once; loaded in the parent before the fork, it is
    registered in the worker as it starts (its registry is emptied then). A spawned worker's
    interpreter exits normally and runs ``atexit``, later: it gets none. In a worker that
    inherited the parent's started kvhygiene, ``kvh_shutdown`` leaves it alone (a forked child
    never touches the parent's runtime).
    """
    import multiprocessing.util as mp_util

    def in_worker(lib) -> None:
        # Lowest of the priorities run at exit: after finalizers that may still free memory.
        mp_util.Finalize(lib, lib.kvh_shutdown, exitpriority=0)

    mp_util.register_after_fork(lib, in_worker)
    if _in_forked_worker():
        in_worker(lib)


def _in_forked_worker() -> bool:
    """Whether this process is a ``multiprocessing`` worker started by forking (``fork``,
    ``forkserver``), which ends with ``os._exit``, rather than a spawned one."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return False
    # A context's Process names its start method; the default one leaves it to the default
    # context, which a spawned worker is given by its parent and a forked one inherits.
    method = getattr(multiprocessing.current_process(), "_start_method", None)
    method = method or multiprocessing.get_start_method(allow_none=True)
    return method != "spawn"


def _read_string(fill, call: str) -> str:
    """Calls a `(buf, len, out_len) -> code` export, growing the buffer when asked to.

    The stats change while the allocator runs (a counter gains a digit between two calls), so
    a grown buffer gets slack beyond the size last reported, and a few attempts are allowed.
    """
    size = 4096
    for _ in range(4):
        buf = ctypes.create_string_buffer(size)
        needed = ctypes.c_size_t(0)
        code = fill(buf, size, ctypes.byref(needed))
        if code == KVH_OK:
            return buf.raw[: needed.value].decode("utf-8", "replace").rstrip("\0")
        if code != KVH_ERR_BUFFER_TOO_SMALL:
            raise _error(call, code)
        size = needed.value + needed.value // 4 + 1024
    raise KvhError(call, KVH_ERR_BUFFER_TOO_SMALL, "the result kept growing")


def _message(code: int) -> str:
    lib = load()
    buf = ctypes.create_string_buffer(512)
    needed = ctypes.c_size_t(0)
    if lib.kvh_strerror(code, buf, len(buf), ctypes.byref(needed)) != KVH_OK:
        return "unknown error"
    return buf.raw[: needed.value].decode("utf-8", "replace").rstrip("\0")


def _error(call: str, code: int) -> KvhError:
    # The thread's last message names the bad value (or says the library's stored error);
    # the code's generic text only when there is none.
    return KvhError(call, code, _last_message() or _message(code))


def _check(call: str, code: int) -> None:
    if code != KVH_OK:
        raise _error(call, code)


def version() -> str:
    """The library's version string."""
    raw = load().kvh_version()
    return raw.decode() if raw else ""


def stats() -> dict:
    """The allocator's counters (``kvh_stats_json``) as a dict. Before the allocator started
    in this process (its first allocation), ``{"started": False, "version": ...}``: reading
    them does not start it, so a launcher may call it before forking its workers (an invalid
    policy is still refused, :class:`KvhError` naming the key). After a ``kvh_shutdown`` that
    came first (the exit hook :func:`load` registers), also ``"shut_down": True``. Once
    started, ``"started": True`` and the counters, with ``"shut_down"`` true after shutdown."""
    lib = load()
    text = _read_string(lib.kvh_stats_json, "kvh_stats_json")
    return json.loads(text)


def _device_index(device) -> int:
    """``device`` as the C ABI's ``int32_t``: an integer in its range (ctypes would refuse a
    larger one with an error naming no argument)."""
    index = _integer(device, "device")
    if not -(1 << 31) <= index < 1 << 31:
        raise ValueError(f"device {index} is not a device index")
    return index


def memory_stats(device: int = 0) -> dict:
    """PyTorch's memory statistics of ``device`` as kvhygiene's pool keeps them, in the layout
    of ``torch.cuda.memory_stats_as_nested_dict``: ``allocated_bytes``, ``requested_bytes``,
    ``active_bytes``, ``reserved_bytes``, ``allocation``, ``active``, ``segment`` (and the
    split statistics, always zero), each with ``all``, ``small_pool`` and ``large_pool``
    entries of ``current``, ``peak``, ``allocated`` and ``freed``; and the counters
    ``num_alloc_retries``, ``num_ooms``, ``num_device_alloc``, ``num_device_free``. Blocks
    handed out are allocated; those freed whose scrub is not verified yet are active too;
    every block held from the driver is reserved. Before the allocator started, every
    statistic is zero (reading them does not start it). :func:`install` makes
    ``torch.cuda.memory_stats`` (and ``memory_allocated``, ``max_memory_allocated``,
    ``memory_reserved``, ``memory_summary``, which read it), ``reset_peak_memory_stats`` and
    ``reset_accumulated_memory_stats`` answer from here. Raises :class:`KvhError` for a device
    the backend does not have, once the allocator started (a negative one always;
    ``KVH_ERR_INVALID_DEVICE``)."""
    index = _device_index(device)
    lib = load()

    def fill(buf, size, needed):
        return lib.kvh_memory_stats_json(index, buf, size, needed)

    return json.loads(_read_string(fill, "kvh_memory_stats_json"))


def synchronize() -> None:
    """Waits until the scrub of every block freed before the call has completed and been
    verified (frees other threads make meanwhile are not waited for). Before the allocator
    started, returns at once (nothing was freed) without starting it."""
    _check("kvh_synchronize", load().kvh_synchronize())


def empty_cache() -> None:
    """Flushes pending scrubs and returns clean cached blocks to the driver (before the
    allocator started, nothing: it is not started). Raises :class:`KvhError` when the
    allocator could not start (an invalid policy, a log directory it refused, a forked child)
    or was shut down (``KVH_ERR_SHUTTING_DOWN``): nothing was flushed or returned."""
    lib = load()
    lib.kvh_empty_cache()
    # kvh_empty_cache returns nothing: it leaves a failed start-up in kvh_last_error and
    # clears it when it ran.
    _check("kvh_empty_cache", lib.kvh_last_error())


def forget_stream(stream) -> None:
    """Says that ``stream`` is about to be destroyed: kvhygiene submits now the scrubs that
    wait on it or run on it, and never names it to the driver again (later scrubs of the
    blocks allocated or freed on it run on the legacy default stream). For a stream the
    application owns and destroys (a ``torch.cuda.ExternalStream``, a raw handle), after its
    work finished and before it is destroyed; the streams of PyTorch's pool are never
    destroyed and need no call. ``stream`` is as for :func:`scrub_blocks` (not ``None``).
    Raises :class:`KvhError` when the allocator could not start or was shut down."""
    if stream is None:
        raise TypeError("forget_stream needs a stream: the legacy default stream is never forgotten")
    handle = _stream_handle(stream)
    lib = load()
    lib.kvh_forget_stream(ctypes.c_void_p(handle))
    # kvh_forget_stream returns nothing: it leaves a failed start-up in kvh_last_error and
    # clears it when it ran.
    _check("kvh_forget_stream", lib.kvh_last_error())


def mark_ipc_exported(memory) -> bool:
    """Says that ``memory`` is about to be exported to another process through a CUDA IPC
    handle the application takes itself (``cudaIpcGetMemHandle`` from a C++ extension, cupy
    or cuda-python; PyTorch's own tensor sharing raises under the pluggable allocator). The
    importer may keep its mapping after the tensor is freed, so kvhygiene then never pools
    that allocation again: its free scrubs and verifies it, then returns it to the driver.
    ``memory`` is a tensor (its ``data_ptr()``), or an address anywhere inside the allocation
    (an integer, a ``ctypes.c_void_p``, cuda-python's ``CUdeviceptr``). Returns True when
    kvhygiene holds the allocation (now marked), False when it does not (memory of another
    allocator, or none: an empty tensor's NULL; also before kvhygiene started). Raises
    :class:`KvhError` with
    ``KVH_ERR_NOT_LIVE`` (7020) for memory kvhygiene holds that is not allocated (freed or
    pooled: exporting it would hand out the next owner's bytes), or when the allocator could
    not start."""
    raw = memory.data_ptr() if hasattr(memory, "data_ptr") else memory
    address = _raw_u64(raw, "memory", "a device address")
    if address == 0:
        return False
    code = load().kvh_mark_ipc_exported(ctypes.c_void_p(address))
    if code == KVH_ERR_UNKNOWN_POINTER:
        return False
    _check("kvh_mark_ipc_exported", code)
    return True


_CONTEXT_FIELDS = ("tenant_id", "request_id", "model_id")


def _text_is_an_address(value) -> bool:
    """Whether ``str(value)`` is only where the object lives: an object with neither a
    ``__str__`` nor a ``__repr__`` of its own, or a callable given for the id it would return
    (a method, a function, a partial: ``request_id=req.request_id`` without its call)."""
    kind = type(value)
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        return True
    return isinstance(
        value,
        (types.MethodType, types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType, functools.partial),
    )


# Python's default text of an object, which names where it lives: "<coroutine object f at
# 0x7f...>" (an async id getter called without await), "<Future at 0x... state=pending>",
# "<weakref at 0x...; to ...>", also inside other text (f"req-{obj}"). The name before the
# address may hold brackets of its own ("<coroutine object f.<locals>.g at 0x...>").
_AT_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")


def _names_an_address(text: str) -> bool:
    """Whether ``text`` holds a ``<`` followed, on the same line, by ``at 0x`` and hex digits.

    Two linear scans per line rather than one pattern with ``<.*`` before the address: that
    pattern backtracks from every ``<``, and a client's id of thousands of them would hold the
    GIL for seconds before its length is even checked."""
    for line in text.split("\n"):
        first = line.find("<")
        if first >= 0 and any(m.start() > first for m in _AT_ADDRESS.finditer(line)):
            return True
    return False


def _encode(value: Optional[str], name: str) -> Optional[bytes]:
    if value is None:
        return None
    # A container's or a bool's text ("['a']", "True") is a mis-passed argument, not an id.
    if isinstance(value, (bool, list, tuple, dict, set, frozenset)):
        raise TypeError(f"{name} {value!r} is a {type(value).__name__}, not an id: give it as a str")
    if isinstance(value, (bytes, bytearray, memoryview)):
        # Their text, not their repr: b"acme" is the tenant "acme", not "b'acme'".
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name} {value!r} is not UTF-8") from None
    if _text_is_an_address(value):
        # Its text would be its address ("<Request object at 0x...>"), which another object
        # takes once this one is gone: two requests would share one identity.
        raise TypeError(
            f"{name}: a {type(value).__name__} has no text of its own (its str() is its address); "
            "give its id as a str"
        )
    try:
        # A str subclass (an Enum member of str) is its text, not its __str__ ("Tenant.ACME").
        text = str.__str__(value) if isinstance(value, str) else str(value)
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError(f"{name} {value!r} has no UTF-8 (a lone surrogate)") from None
    # ctypes passes bytes as a C string, which ends at the first NUL: "acme\0evil" would reach
    # the library as "acme", and two tenants would share one identity.
    if b"\0" in raw:
        raise ValueError(f"{name} {value!r} contains a NUL character")
    # An object's address, which another object takes once this one is gone: two requests
    # would share one identity. Objects whose text is their default one are refused above;
    # this catches those that print their address in a text of their own (coroutines,
    # generators, futures, locks, weak references) and ids built from such a text.
    if _names_an_address(text):
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{name} {text!r} names an object's memory address, which a later object may "
            "take; give the id itself as a str"
        )
    return raw


class _Entry:
    """One entered :func:`context`: its ids, and its state.

    A context variable's value holds in every copy of the context it was set in (a task
    created inside the block, a job given ``contextvars.copy_context()``), wherever the copy
    runs, and a block left in the context that entered it drops the entry from that context
    alone: such copies keep the ids, as they keep any context variable. A block left in any
    other context (a generator finished on another thread, or in a copy) cannot drop the
    entry from the context that entered it, nor tell that context from copies made since: its
    entry is *abandoned* and holds nowhere, so that no later work claims as that request
    (copies made inside the block lose the ids too, which only costs a scrub).

    A block entered by a generator (its ``owner``, see :func:`_generator_owner`) holds only
    while that generator runs: one paused at a ``yield`` inside the block shares its caller's
    execution context, and the caller's work (another request's) must not carry its ids."""

    __slots__ = ("ids", "state", "owner")

    ENTERED, LEFT, ABANDONED = range(3)

    def __init__(self, ids, owner):
        self.ids = ids
        self.state = _Entry.ENTERED
        self.owner = owner

    def holds(self) -> bool:
        return self.state != _Entry.ABANDONED

    def holds_in(self, running) -> bool:
        """Whether the entry holds for code whose call stack is ``running()`` (its frames,
        computed once per lookup, and only when an entry has an owner)."""
        if not self.holds():
            return False
        return self.owner is None or any(f is self.owner for f in running())


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR
_CONTEXTLIB_FILE = contextlib.__file__


def _is_contextlib(frame) -> bool:
    return frame.f_code.co_filename == _CONTEXTLIB_FILE


def _generator_owner(frame):
    """The generator frame that owns a :func:`context` entered in ``frame`` (the frame whose
    ``with`` entered it), or ``None`` when a function or coroutine entered it.

    contextlib's own frames are looked through (``ExitStack.enter_context``), and so is a
    generator that contextlib drives as a context manager (``@contextmanager`` around
    ``with kvhygiene.context(...)``): its caller's body runs inside the block by design,
    while it is paused, so the owner is whoever entered *it*. A generator driven any other way
    (a streaming response, an async generator an ``async for`` reads) is paused between items
    with its caller running other work, another request's included, in the same execution
    context. Coroutines are not owners: one paused at an ``await`` runs nothing of its
    caller's in its context, and tasks it creates are meant to keep its ids."""
    while frame is not None:
        while frame is not None and _is_contextlib(frame):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_flags & _GENERATOR_FLAGS:
            return None
        driver = frame.f_back
        if driver is None or not _is_contextlib(driver):
            return frame
        frame = driver
    return None


def _running_frames():
    """The frames of the calling thread's stack, innermost first."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


#: The contexts entered in the running code's own execution context (a thread, or an asyncio
#: task, which runs in a copy of its creator's), outermost first. A :class:`contextvars.ContextVar`
#: rather than a thread-local: tasks that take turns on one thread each keep their own.
_entered: contextvars.ContextVar = contextvars.ContextVar("kvhygiene_contexts", default=())

def _innermost():
    """The ids of the innermost context that holds here, or ``None``: entries abandoned (left
    in another context than the one that entered them) are skipped, and so are those of a
    generator that is not running (paused inside its block)."""
    stack = None

    def running():
        nonlocal stack
        if stack is None:
            stack = _running_frames()
        return stack

    for entry in reversed(_entered.get()):
        if entry.holds_in(running):
            return entry.ids
    return None


def _resync_context() -> None:
    """Gives the library this execution context's ids for the calling thread, before a call
    whose effect depends on whose request is served (a claim, a scrub): the library keeps ids
    per thread, and another task on this thread, a context left from another thread, native
    code or another green thread (gevent, eventlet) on this thread may have set others
    meanwhile.

    Given every time rather than only when they differ from the ids this package gave last:
    no Python record of what the thread holds survives those writers. A thread-local one is
    per green thread under gevent's and eventlet's patches, not per thread, and native code
    writes none; one stale entry would make a claim as the request that wrote a block, which
    hands the block over unscrubbed."""
    _set(_innermost())


def _set(ids) -> None:
    """Gives the library ``ids`` (encoded, as :func:`_encoded_ids` makes them; ``None``:
    none) for the calling thread."""
    global _contexts_used
    lib = load()
    if ids is None:
        lib.kvh_clear_context()
    else:
        _contexts_used = True
        _check("kvh_set_context", lib.kvh_set_context(*ids))


def _encoded_ids(tenant_id, request_id, model_id) -> tuple:
    """The ids as the library gets them. Held and compared in this form: ids equal as Python
    objects but not as text (``1`` and ``1.0``, ``1`` and ``True``) are other requests."""
    values = (tenant_id, request_id, model_id)
    return tuple(_encode(v, name) for v, name in zip(values, _CONTEXT_FIELDS))


class _ContextBlock(contextlib._GeneratorContextManager):
    """A :func:`context` block; as a decorator, of plain functions only.

    A ``@contextmanager`` object also decorates, entering the block around each call of the
    function. Around a coroutine function, a generator function or an async generator
    function, the call only creates the coroutine or generator, and the block is left
    before its body runs: the body would carry none of the ids. Refused instead
    (``TypeError``), so that the mistake shows at import rather than in the forensic log."""

    def __call__(self, func):
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            kind = "an async function"
        elif inspect.isgeneratorfunction(func):
            kind = "a generator function"
        else:
            return super().__call__(func)
        raise TypeError(
            f"kvhygiene.context cannot decorate {kind} ({func.__qualname__}): the block would "
            "be left before its body runs; enter it inside the body "
            "(with kvhygiene.context(...): ...)"
        )


def context(
    tenant_id: Optional[str] = None,
    request_id: Optional[str] = None,
    model_id: Optional[str] = None,
) -> "contextlib.AbstractContextManager[None]":
    """Stamps allocations and frees made by this thread inside the block with these ids.

    Contexts nest: an id not given (``None``) is the enclosing block's, so that a request's
    block inside its tenant's keeps the tenant; an empty id is none, for the block. Leaving an
    inner block restores the outer ids. Ids are their text (``str``
    of a number; a ``str`` subclass's own text, not its ``__str__``; bytes, bytearray and
    memoryview as UTF-8): ``1`` and ``1.0`` are two requests. An object with no text of its
    own (whose ``str()`` is its address, which a later object may take), or a method or
    function given for the id it returns, or any other object whose text names its address
    (a coroutine called without ``await``, a generator, a future), is refused
    (``TypeError``), as is text that is not UTF-8, holds a NUL character or names an
    object's address (``"<... at 0x...>"``, ``ValueError``). The library refuses ids over 128 bytes or
    with control or invisible formatting characters (:class:`KvhError`).

    Each asyncio task keeps its own contexts (they are held in a :mod:`contextvars` variable):
    a task's :func:`claim_blocks` and :func:`scrub_blocks` are made under its own ids, also
    when another task on the same thread entered a context while it waited. A task created
    inside a context, or a job given a copy of it (``asyncio.to_thread``,
    ``contextvars.copy_context().run``), keeps its ids after its creator leaves the block,
    on whichever thread it runs, for its :func:`claim_blocks` and :func:`scrub_blocks`. The
    library keeps one set of ids per thread, so an allocation or free a task makes after an
    ``await``, or a job makes on a pool's thread, carries the ids last set on that thread
    (another job's, or none) until the task's or job's next :func:`context`,
    :func:`claim_blocks` or :func:`scrub_blocks`: a job that allocates enters
    :func:`context` itself, and an event loop whose tasks allocate inside their contexts
    (a server running the model in its request handlers) is given :func:`install_asyncio`,
    which sets each task's ids at every step it takes.

    A context left in another execution context than the one that entered it (a generator
    advanced from a thread pool, finished on another thread or in a copy) holds nowhere from
    then on, in copies made inside the block too (they lose its ids, which only costs a
    scrub), so that no later work claims as that request. The leaving thread gets the ids of
    its own innermost context (none, outside any); the entering thread's ids are set back to
    its innermost context at its next :func:`context`, :func:`claim_blocks` or
    :func:`scrub_blocks` (allocations it makes before that still carry the left ids).

    A context a generator enters holds only while that generator runs. Paused at a ``yield``
    inside the block (a streamed response), it shares its caller's execution context, and the
    caller's own claims, scrubs and contexts (another request's included) neither carry its
    ids nor inherit its tenant; the caller's allocations and frees carry the ids last set on
    the thread, the generator's, until the caller's next :func:`context`,
    :func:`claim_blocks` or :func:`scrub_blocks` (a task's next step, under
    :func:`install_asyncio`). A generator driven by :func:`contextlib.contextmanager`,
    :func:`contextlib.asynccontextmanager` or an :class:`contextlib.ExitStack` is the
    exception: the body of the caller's ``with`` is meant to run inside its block. A resumed
    generator's allocations carry the ids last set on the thread until its next
    :func:`context`, :func:`claim_blocks` or :func:`scrub_blocks`, as a task's do after an
    ``await``; tasks and copies of the execution context made inside its block never get its
    ids (which only costs a scrub).

    Each :func:`claim_blocks`, :func:`scrub_blocks` and :func:`refuse_blocks` gives the
    library the calling context's ids first, so that native code calling ``kvh_set_context``
    or ``kvh_clear_context`` on the same thread, or another green thread (gevent, eventlet)
    entering a context on it, does not change whose claim it is. Allocations and frees carry
    whichever ids were set on the thread last, by either side.

    Used as a decorator, it enters the block around each call of a plain function; a
    coroutine function, generator function or async generator function is refused
    (``TypeError``): the block would be left before its body runs.
    """
    return _ContextBlock(_context_block, (tenant_id, request_id, model_id), {})


def _context_block(tenant_id, request_id, model_id) -> Iterator[None]:
    """The body of a :func:`context` block, which :class:`_ContextBlock` drives."""
    given = (tenant_id, request_id, model_id)
    own = _encoded_ids(*given)
    outer = _innermost()
    if outer is None:
        ids = own
    else:
        ids = tuple(theirs if g is None else mine for g, mine, theirs in zip(given, own, outer))
    _set(ids)
    # Each entry is its own object: leaving a context marks its entry, wherever it is (one
    # left out of order, by interleaved generators, must not take another's with it).
    # This generator's frame, contextlib's __enter__, then the frame of the `with`.
    entry = _Entry(ids, _generator_owner(sys._getframe(2)))
    token = _entered.set(_entered.get() + (entry,))
    try:
        yield
    finally:
        entered = _entered.get()
        try:
            # Succeeds only in the context that entered the block: the test of where it is left.
            _entered.reset(token)
            entry.state = _Entry.LEFT
        except ValueError:
            entry.state = _Entry.ABANDONED
        # The entries that still hold here, without this one (reset took out the later ones
        # too, which may still be entered: out of order).
        _entered.set(tuple(e for e in entered if e is not entry and e.holds()))
        _resync_context()


#: Whether any :func:`context` gave the library ids in this process: until one did, a task
#: step of :func:`task_factory` has nothing of this package's to set (and leaves ids that
#: native code set alone, and the library unloaded).
_contexts_used = False


class _IdsPerStep(collections.abc.Coroutine):
    """A task's coroutine that gives the library the task's ids before each step.

    The library keeps one set of ids per thread; tasks that take turns on the loop's thread
    each hold their own contexts (:data:`_entered`, a context variable of the task's
    context, in which asyncio runs its every step). So each step, the code between two
    ``await`` s that suspend, starts by setting the thread's ids to those of the task's
    innermost context (none outside any): what it allocates and frees carries its own
    request's ids rather than those of the task that ran last."""

    def __init__(self, coro):
        self._coro = coro
        # Named as the wrapped coroutine in a task's repr.
        self.__qualname__ = getattr(coro, "__qualname__", type(coro).__qualname__)
        self.__name__ = getattr(coro, "__name__", type(coro).__name__)

    def send(self, value):
        _ids_for_this_step()
        return self._coro.send(value)

    def throw(self, typ, val=None, tb=None):
        _ids_for_this_step()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self):
        return self._coro.close()

    def __await__(self):
        return self._coro.__await__()

    def __getattr__(self, name):
        # The coroutine's own state (cr_frame, cr_running, cr_suspended...), which asyncio
        # reads to name a task and show its stack, and inspect.getcoroutinestate (anyio, on a
        # task group's cancellation) to tell its state: the wrapped one's.
        if name.startswith("cr_"):
            return getattr(self._coro, name)
        raise AttributeError(name)

    def __repr__(self):
        return repr(self._coro)


def _ids_for_this_step() -> None:
    """:func:`_resync_context` for a task's step, once a context was used in this process."""
    if _contexts_used:
        _resync_context()


def task_factory(loop, coro, **kwargs):
    """An asyncio task factory (``loop.set_task_factory(kvhygiene.task_factory)``) whose tasks
    give the library their own ids at each step: see :func:`install_asyncio`, which sets it
    and keeps a task factory the loop already had."""
    import asyncio

    return _made_with_ids_per_step(coro, lambda wrapped: asyncio.Task(wrapped, loop=loop, **kwargs))


def _made_with_ids_per_step(coro, make):
    """The task ``make`` makes of ``coro`` wrapped in :class:`_IdsPerStep`; what is not a
    coroutine is given unwrapped, for the task to refuse it (``TypeError``) as it would.

    A task may take its first step as it is made (an eager task, Python 3.12+): the caller's
    ids are given back to the library after it, since the caller goes on running on this
    thread."""
    import asyncio

    if not asyncio.iscoroutine(coro):
        return make(coro)
    try:
        return make(_IdsPerStep(coro))
    finally:
        _ids_for_this_step()


def install_asyncio(loop=None) -> None:
    """Makes each task of ``loop`` (the running loop by default) carry its own ids.

    Without it, the library's ids are per thread: a task that allocates after an ``await``
    carries the ids of the context another task on the loop's thread entered or left
    meanwhile, so that its memory is stamped as that tenant's (pooled for it under
    ``KVH_TENANT_ISOLATION=strict``, and named as its in the forensic log). With it, every
    task created from then on gives the library its own ids (those of its innermost
    :func:`context`, none outside any) at each step. Work the loop runs outside tasks
    (callbacks, protocols) carries the ids the last step left.

    A task factory the loop already has is kept: it is given the coroutine wrapped. Calling
    this again on the same loop changes nothing. Each step costs one library call, about a
    microsecond, once a :func:`context` was entered in the process.
    """
    import asyncio

    if loop is None:
        loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if previous is task_factory or getattr(previous, "_kvhygiene_ids_per_step", False):
        return
    if previous is None:
        loop.set_task_factory(task_factory)
        return

    def chained(loop, coro, **kwargs):
        return _made_with_ids_per_step(coro, lambda wrapped: previous(loop, wrapped, **kwargs))

    chained._kvhygiene_ids_per_step = True
    loop.set_task_factory(chained)


_U64 = (1 << 64) - 1


class KvLayout:
    """Where the blocks of a paged KV cache are (``kvh_kv_layout``).

    ``regions`` are device addresses (for example one per layer and per K/V); each holds
    ``blocks_per_region`` blocks, block ``i`` starting ``i * block_stride`` bytes after its
    region's base and ``block_bytes`` long (``block_stride`` defaults to ``block_bytes``). Every
    region must lie inside one tensor allocated through kvhygiene (install it before the cache
    is allocated), and no two blocks may overlap; the library checks both and refuses the call
    otherwise.
    """

    def __init__(self, regions, block_bytes: int, blocks_per_region: int, *, block_stride=None, device: int = 0):
        self.regions = regions
        self.block_bytes = block_bytes
        self.block_stride = block_bytes if block_stride is None else block_stride
        self.blocks_per_region = blocks_per_region
        self.device = device

    def __setattr__(self, name, value) -> None:
        """Each field is checked when it is set, at construction and after: a value changed
        later (``layout.device = 2**32``) would otherwise reach the C call wrapped by ctypes,
        and the call would scrub another device, or another size, than the one named."""
        if name == "regions":
            if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__iter__"):
                raise TypeError(f"regions {value!r} is not a sequence of region base addresses")
            value = tuple(_u64(r, "region base") for r in value)
        elif name in ("block_bytes", "block_stride", "blocks_per_region"):
            value = _u64(value, name)
        elif name == "device":
            value = _integer(value, "device")
            # The C argument is an int: ctypes would wrap a larger value silently (2**32 is 0).
            if not 0 <= value < 2**31:
                raise ValueError(f"device {value} is not a device index (0 .. 2**31 - 1)")
        # Other attributes (an integration's own, as kvhygiene.sglang's page_size) are the
        # caller's: kept as given, never read by the C call.
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"KvLayout({len(self.regions)} regions, block_bytes={self.block_bytes}, "
            f"block_stride={self.block_stride}, blocks_per_region={self.blocks_per_region}, "
            f"device={self.device})"
        )

    @classmethod
    def from_tensors(cls, tensors, block_dim: int, *, blocks_per_block: int = 1) -> "KvLayout":
        """The layout of KV-cache tensors whose dimension ``block_dim`` indexes blocks.

        Every index of the dimensions before ``block_dim`` is a region; the dimensions after it
        must cover one dense run of memory per block, in any order (vLLM's HND and NHD layouts
        both do). vLLM's per-layer ``[2, num_blocks, block_size, heads, head_size]`` caches use
        ``block_dim=1`` (K and V are two regions); a ``[num_blocks, 2, ...]`` cache uses
        ``block_dim=0``. All tensors must share one block geometry and one device. A mapping
        (vLLM's layer name -> cache tensor) gives its tensors, in its order.

        ``blocks_per_block`` makes each run of that many consecutive tensor blocks one block of
        the layout: for an engine whose tensors count smaller blocks than the ids it hands out
        (vLLM shapes a cache in the attention kernel's block size when that is smaller than the
        KV cache manager's: ``block_size // kernel_block_size`` of them make one of the
        scheduler's blocks). The tensor blocks must lie back to back, and their count be a
        multiple of it.
        """
        if hasattr(tensors, "data_ptr"):
            # One tensor, not a list: iterated, it would be read as the list of its halves
            # along dimension 0, and block_dim would index something else in each.
            raise TypeError("from_tensors takes a list of tensors: pass [tensor] for one")
        if isinstance(tensors, collections.abc.Mapping):
            tensors = tensors.values()  # iterated, a mapping gives its keys (layer names)
        tensors = list(tensors)
        if not tensors:
            raise ValueError("from_tensors needs at least one tensor")
        # True would index dimension 1, and 1.0 fail deep in the slicing.
        block_dim = _integer(block_dim, "block_dim")
        regions, geometry, device = [], None, None
        for n, t in enumerate(tensors):
            g, bases = _tensor_blocks(t, block_dim, f"tensor {n}")
            if geometry is None:
                geometry = g
            elif g != geometry:
                raise ValueError(
                    f"tensor {n} has block geometry (block_bytes, block_stride, blocks) = {g}, "
                    f"tensor 0 has {geometry}: one layout needs one geometry"
                )
            index = _cuda_index(t, f"tensor {n}")
            if device is not None and index != device:
                raise ValueError(f"tensor {n} is on device {index}, tensor 0 on device {device}")
            device = index
            # One tensor bound to several layers (vLLM's cross-layer KV sharing) lists the same
            # regions again: they are one region each. Regions that only partly overlap are left
            # to the library, which refuses them.
            regions.extend(b for b in bases if b not in regions)
        block_bytes, block_stride, blocks = geometry
        per = _integer(blocks_per_block, "blocks_per_block")
        if per < 1:
            raise ValueError(f"blocks_per_block {per} is not a positive count")
        if per > 1:
            if blocks % per:
                raise ValueError(
                    f"the tensors hold {blocks} blocks, not a multiple of blocks_per_block {per}: "
                    "they are not the engine's blocks cut in equal parts"
                )
            if block_stride != block_bytes and blocks > 1:
                raise ValueError(
                    f"the tensors' blocks are {block_stride} bytes apart but {block_bytes} bytes "
                    f"long: {per} of them do not make one run of memory"
                )
            block_bytes, block_stride, blocks = block_bytes * per, block_bytes * per, blocks // per
        return cls(regions, block_bytes, blocks, block_stride=block_stride, device=device)


def _layouts_by_geometry(parts) -> list:
    """Layouts from ``(geometry, region bases)`` pairs, a geometry being ``(block_bytes,
    block_stride, blocks, device)``: one layout per geometry, its regions in first-seen order
    and each once (a tensor bound to several layers, KV cache groups laid over one another)."""
    by_geometry: dict = {}
    for geometry, bases in parts:
        by_geometry.setdefault(geometry, {}).update(dict.fromkeys(bases))
    return [
        KvLayout(list(regions), block_bytes, blocks, block_stride=stride, device=device)
        for (block_bytes, stride, blocks, device), regions in by_geometry.items()
    ]


def _integer(value, name: str) -> int:
    """``value`` as an int: an integer (Python's, numpy's), never a float (127.9 would be
    127, leaving a byte of every block unscrubbed), a string or a bool."""
    if isinstance(value, bool):
        raise TypeError(f"{name} {value!r} is a bool, not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} {value!r} is not an integer") from None


def _stream_handle(stream) -> int:
    """The raw handle of a stream: a ``torch.cuda.Stream`` (its ``cuda_stream``), an integer,
    a ``ctypes.c_void_p``, or a handle object that converts with ``int()`` (cuda-python's
    ``CUstream``, numba's streams). Checked to be a 64-bit value: ctypes would keep only the
    low 64 bits of a larger or negative one, and the call would run on another stream than
    the one named, unordered with its work; a float or a string is no handle."""
    return _raw_u64(getattr(stream, "cuda_stream", stream), "stream", "a stream handle")


def _raw_u64(raw, name: str, what: str) -> int:
    """A raw 64-bit value (a stream handle, a device address): an integer, a
    ``ctypes.c_void_p``, or an object that converts with ``int()`` (cuda-python's ``CUstream``
    and ``CUdeviceptr``). A number with a fraction (numpy's floats, Fraction, Decimal), which
    ``int()`` would truncate onto another value, a bool, a string or bytes is refused
    (TypeError), and so is a value outside 64 bits (ValueError)."""
    if isinstance(raw, ctypes.c_void_p):
        raw = raw.value or 0
    fractional = isinstance(raw, numbers.Number) and not isinstance(raw, numbers.Integral)
    if fractional or isinstance(raw, (bool, str, bytes, bytearray)):
        raise TypeError(f"{name} {raw!r} is not {what}")
    try:
        value = operator.index(raw)
    except TypeError:
        if not hasattr(type(raw), "__int__"):
            raise TypeError(f"{name} {raw!r} is not {what}") from None
        value = int(raw)
    return _u64(value, name)


def _u64(value, name: str) -> int:
    v = _integer(value, name)
    if not 0 <= v <= _U64:
        raise ValueError(f"{name} {v} is not a 64-bit unsigned value")
    return v


def _cuda_index(t, name: str) -> int:
    """The CUDA device index of tensor ``t``. A host tensor is refused: its index is None,
    which would read as device 0."""
    device = getattr(t, "device", None)
    kind = getattr(device, "type", "cuda")
    if kind != "cuda":
        raise ValueError(f"{name} is on device type {kind!r}: a KV cache is CUDA memory")
    return getattr(device, "index", None) or 0


def _tensor_blocks(t, block_dim: int, name: str):
    """``((block_bytes, block_stride, blocks), region bases)`` of one tensor (see from_tensors)."""
    shape, stride = list(t.shape), list(t.stride())
    if not 0 <= block_dim < len(shape):
        raise ValueError(f"{name}: block_dim {block_dim} is not a dimension of shape {tuple(shape)}")
    esize = t.element_size()
    # One block is the elements sharing a block index: dense when its dimensions, taken from
    # the smallest stride up, each step over exactly the elements of the ones before.
    inner = sorted((st, size) for size, st in zip(shape[block_dim + 1 :], stride[block_dim + 1 :]) if size != 1)
    elements = 1
    for st, size in inner:
        if st != elements:
            raise ValueError(
                f"{name}: the dimensions after block_dim {block_dim} do not cover one dense run "
                f"of memory (shape {tuple(shape)}, stride {tuple(stride)}); pass the tensor that "
                "owns the storage"
            )
        elements *= size
    blocks = shape[block_dim]
    block_bytes = elements * esize
    # A dimension of size 1 has an arbitrary stride: one block needs none.
    block_stride = stride[block_dim] * esize if blocks > 1 else block_bytes
    bases = [t.data_ptr()]
    for size, st in zip(shape[:block_dim], stride[:block_dim]):
        bases = [b + i * st * esize for b in bases for i in range(size)]
    return (block_bytes, block_stride, blocks), bases


def _current_stream(device: int) -> int:
    """PyTorch's current stream on ``device`` when torch has CUDA up, else the default stream."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0


def scrub_blocks(layout: KvLayout, block_ids, stream=None) -> None:
    """Zeroes and verifies KV-cache blocks ``block_ids`` of ``layout`` and waits for the verdict.

    Call it when the engine frees blocks (their last reference: with prefix caching a block
    may be shared by several requests), before they can be handed to another request. The
    scrub runs on ``stream`` (a ``torch.cuda.Stream`` of the layout's device, a raw
    ``cudaStream_t`` as an int, or ``None`` for PyTorch's current stream), after the work
    queued there; the stream must stay valid until the cache is freed.

    Raises :class:`ScrubVerificationError` listing the blocks that did not verify (they must not
    be reused) and :class:`KvhError` when the call was refused or did not finish (then no block
    may be taken as clean; its ``failed_blocks`` lists those found failed before the call
    stopped, not to be handed to another request either). Ids must be distinct and below
    ``layout.blocks_per_region``.
    """
    failed, scrubbed = [], 0
    for code, named, ids, message in _kv_calls("kvh_scrub_blocks", layout, block_ids, stream):
        scrubbed += len(ids)
        if code == KVH_ERR_VERIFY_FAILED:
            failed.extend(named)
        elif code != KVH_OK:
            error = KvhError("kvh_scrub_blocks", code, message)
            # Blocks found failed before the error, by this library call's batches that
            # completed or by an earlier call of a set split in several: not to be handed to
            # another request, whatever is done about the error.
            error.failed_blocks = failed + named
            raise error
    if failed:
        raise ScrubVerificationError(failed, scrubbed)


def claim_blocks(layout: KvLayout, block_ids, stream=None) -> None:
    """Hands KV-cache blocks ``block_ids`` of ``layout`` to the calling thread's request: the
    eviction gate.

    Call it inside the request's :func:`context` when the engine gives it blocks from its free
    pool (evicted prefix-cache blocks included; not prefix-cache hits it shares). A block that
    would change owner without a verified scrub since its last owner is scrubbed and verified
    first (``KVH_KV_GATE=scrub``, the default), or the claim is refused
    (``KVH_KV_GATE=enforce``). ``KVH_KV_GATE_SCOPE=tenant`` lets a tenant's requests share
    blocks. An owner is its ids alone: a request that carries the ids of one that finished is
    that owner again and is handed its blocks unscrubbed, so give each request a
    ``request_id`` of its own (or :func:`scrub_blocks` a finished request's blocks before its
    id can come back). ``stream`` is as for :func:`scrub_blocks`.

    Raises :class:`ClaimRefusedError` naming the blocks not handed over (they must not be used),
    and :class:`KvhError` when the call was refused or did not finish (then no block of it may
    be taken as handed over; its ``refused_blocks`` lists the blocks an earlier library call
    of a split claim refused and those the gate's scrub found not zero before it stopped,
    to be retired as :func:`scrub_blocks`'s ``failed_blocks`` are).

    More blocks than one library call takes (2**20 segments: blocks × regions) are claimed in
    several calls, in order; under ``KVH_KV_GATE=enforce`` a refused one ends the claim: the
    blocks of the calls before it were handed over, and ``refused_blocks`` holds every other
    block (the refused call's and those of the calls it stopped).
    """
    refused, refusal, unscrubbed = [], None, []
    block_ids = _id_list(block_ids)
    made = 0  # ids passed to the calls made so far
    for code, named, ids, message in _kv_calls("kvh_claim_blocks", layout, block_ids, stream):
        made += len(ids)
        if code == KVH_ERR_KV_GATE:
            # Enforce refused this call whole and ends the claim: nothing of it was handed
            # over, nor of the calls it stops (never made: their blocks were neither claimed
            # nor scrubbed); the blocks of the calls before were, but for those already named.
            # In the order given: the call's own ids, the ones the library named among them.
            refused.extend(ids)
            refused.extend(_block_id(i) for i in block_ids[made:])
            unscrubbed = named
            refusal = (code, message)
            break
        if code in (KVH_ERR_VERIFY_FAILED, KVH_ERR_KV_TAKEN):
            refused.extend(named)
            # As one call reports it: a failed verification before blocks taken.
            if refusal is None or code == KVH_ERR_VERIFY_FAILED:
                refusal = (code, message)
        elif code != KVH_OK:
            error = KvhError("kvh_claim_blocks", code, message)
            # Blocks an earlier library call of a set split in several refused (failed
            # verification, or taken), and those this call's gate scrub found not zero before
            # it stopped: still not to be used, whatever is done about the error.
            error.refused_blocks = refused + named
            raise error
    if refusal is not None:
        raise ClaimRefusedError(refusal[0], refusal[1], refused, unscrubbed)


def refuse_blocks(layout: KvLayout, block_ids, reason: str) -> None:
    """Records that the calling thread's request (its :func:`context`) is refused KV-cache
    blocks ``block_ids`` of ``layout`` for ``reason``, a refusal the engine decides itself
    (one block given to two requests in the same step, which no scrub can separate): a
    ``policy_violation`` record (policy ``kv_gate``), counted with the refused claims. Nothing
    is scrubbed or handed over; the blocks must not be used by the request.

    ``reason`` is free text, not an id: a ``str``, bytes, ``None`` or any object's ``str()``
    (an exception), recorded as given but cut at 512 bytes, with bytes that are not UTF-8 and
    NUL characters replaced (U+FFFD).

    Raises :class:`KvhError` when the refusal could not be recorded (a bad layout or ids, as
    :func:`claim_blocks` checks them). Ids must be distinct and below
    ``layout.blocks_per_region``; a set larger than one library call takes is recorded in
    several records."""
    _check_layout(layout, "kvh_refuse_blocks")
    lib = load()
    ids = [_block_id(i) for i in _id_list(block_ids)]
    bad = next((i for i in ids if not 0 <= i <= 0xFFFF_FFFF), None)
    if bad is not None:
        raise ValueError(f"block id {bad} is not in 0..2**32-1")
    bases = (ctypes.c_uint64 * len(layout.regions))(*layout.regions)
    c_layout = _CLayout(
        bases, len(layout.regions), layout.block_bytes, layout.block_stride, layout.blocks_per_region
    )
    text = _reason_bytes(reason)
    _resync_context()
    per_call = max(1, _MAX_KV_SEGMENTS // max(1, len(layout.regions)))
    if len(ids) > per_call:
        # Checked whole first, as _kv_calls does: no record for part of a set that is refused.
        ids = _ids_at_fault(ids, layout.blocks_per_region) or ids
    for start in range(0, max(1, len(ids)), per_call):
        chunk = ids[start : start + per_call]
        c_ids = (ctypes.c_uint32 * len(chunk))(*chunk)
        code = lib.kvh_refuse_blocks(ctypes.byref(c_layout), c_ids, len(chunk), layout.device, text)
        if code != KVH_OK:
            raise KvhError("kvh_refuse_blocks", code, _last_message() or _message(code))


#: U+FFFD in UTF-8, the library's replacement for bytes that are not UTF-8.
_REPLACEMENT = "\ufffd".encode("utf-8")


def _reason_bytes(reason) -> Optional[bytes]:
    """A refusal's reason as ``kvh_refuse_blocks`` takes it. Free text, unlike an id: no check
    refuses it, since a refusal the engine decided must be recorded whatever its wording. A
    NUL would end the C string there and drop the rest, so it is replaced as the library
    replaces bytes that are not UTF-8 (a lone surrogate is passed on for the library to
    replace)."""
    if reason is None:
        return None
    if isinstance(reason, (bytes, bytearray, memoryview)):
        raw = bytes(reason)
    else:
        text = str.__str__(reason) if isinstance(reason, str) else str(reason)
        raw = text.encode("utf-8", "surrogatepass")
    return raw.replace(b"\0", _REPLACEMENT)


def _check_layout(layout, call: str) -> None:
    """Refuses anything but one KvLayout by name: the engine's cache tensors, or a list of
    layouts, would fail later on a missing attribute."""
    if not isinstance(layout, KvLayout):
        raise TypeError(
            f"{call}: the layout is a {type(layout).__name__}, not a KvLayout: pass one "
            "KvLayout (KvLayout.from_tensors(...), or one element of the list "
            "kvhygiene.sglang.layouts_of(...) returns)"
        )


def _id_list(block_ids) -> list:
    """Block ids as a list: a tensor or array in one transfer, not one per element. Bytes and
    strings are refused: iterating them gives byte values or characters, not the ids meant."""
    if isinstance(block_ids, (bytes, bytearray, memoryview, str)):
        raise TypeError(
            f"block ids given as {type(block_ids).__name__}: pass a sequence of integers "
            "(a list, a tuple, a tensor or an array)"
        )
    if hasattr(block_ids, "tolist"):
        block_ids = block_ids.tolist()
        if isinstance(block_ids, int):  # a 0-d tensor: one id
            return [block_ids]
    if not hasattr(block_ids, "__iter__"):
        raise TypeError(
            f"block ids given as {type(block_ids).__name__}: pass a sequence of integers "
            "(a list, a tuple, a tensor or an array)"
        )
    return block_ids if isinstance(block_ids, list) else list(block_ids)


def _block_id(value) -> int:
    """A block id as an int: an integer (Python's, numpy's, a tensor element's), never a float
    (2.9 would be block 2), a string or a bool (a mask would name blocks 1 and 0)."""
    if isinstance(value, bool):
        raise TypeError(f"block id {value!r} is a bool: pass the ids a mask selects, not the mask")
    return _integer(value, "block id")


#: Most segments (blocks × regions) one kvh_scrub_blocks or kvh_claim_blocks call takes
#: (include/kvhygiene.h).
_MAX_KV_SEGMENTS = 1 << 20


def _kv_calls(name: str, layout: KvLayout, block_ids, stream):
    """Calls kvh_scrub_blocks or kvh_claim_blocks over ``block_ids``, in as many library calls
    as the per-call segment limit needs, in order; yields, for each, the code, the block ids
    it named back (failed or refused), the ids passed and the error message ("" on success).
    Ids are checked (distinct, below ``blocks_per_region``) before any call when there are
    several, since then no one call sees them all: a set that fails the check makes one call,
    of the ids at fault alone, which the library refuses, counts and logs as it does a single
    call's."""
    _check_layout(layout, name)
    lib = load()
    ids = [_block_id(i) for i in _id_list(block_ids)]
    bad = next((i for i in ids if not 0 <= i <= 0xFFFF_FFFF), None)
    if bad is not None:
        raise ValueError(f"block id {bad} is not in 0..2**32-1")
    per_call = max(1, _MAX_KV_SEGMENTS // max(1, len(layout.regions)))
    if len(ids) > per_call:
        ids = _ids_at_fault(ids, layout.blocks_per_region) or ids
    if stream is None:
        stream = _current_stream(layout.device)
    stream_device = getattr(getattr(stream, "device", None), "index", None)
    if stream_device is not None and stream_device != layout.device:
        raise ValueError(f"the stream is on device {stream_device}, the layout on device {layout.device}")
    stream = _stream_handle(stream)
    bases = (ctypes.c_uint64 * len(layout.regions))(*layout.regions)
    c_layout = _CLayout(
        bases, len(layout.regions), layout.block_bytes, layout.block_stride, layout.blocks_per_region
    )
    _resync_context()
    # An empty list is still one call: the library checks the layout's geometry.
    for start in range(0, max(1, len(ids)), per_call):
        chunk = ids[start : start + per_call]
        c_ids = (ctypes.c_uint32 * len(chunk))(*chunk)
        named = (ctypes.c_uint32 * max(1, len(chunk)))()
        count = ctypes.c_size_t(0)
        code = getattr(lib, name)(
            ctypes.byref(c_layout),
            c_ids,
            len(chunk),
            layout.device,
            stream or None,
            named,
            len(chunk),
            ctypes.byref(count),
        )
        message = "" if code == KVH_OK else (_last_message() or _message(code))
        yield code, list(named)[: count.value], chunk, message


def _ids_at_fault(ids: list, blocks_per_region: int) -> Optional[list]:
    """The library's id checks, in its order, for ids split over several calls: the first id
    past the last block, else the first named twice (the KV cache's double free) twice;
    ``None`` when the ids pass. Given to the library alone, they are refused whatever the
    layout, with the error one call of all the ids would get."""
    past = next((i for i in ids if i >= blocks_per_region), None)
    if past is not None:
        return [past]
    seen = set()
    for i in sorted(ids):
        if i in seen:
            return [i, i]
        seen.add(i)
    return None


def _last_message() -> str:
    """The calling thread's last error message (it names the bad value), or "" when there is
    none or it cannot be read. Never raises: every error path calls it."""
    lib = load()
    size = 1024
    for _ in range(4):
        buf = ctypes.create_string_buffer(size)
        needed = ctypes.c_size_t(0)
        code = lib.kvh_last_error_message(buf, size, ctypes.byref(needed))
        if code == KVH_OK:
            return buf.raw[: needed.value].decode("utf-8", "replace").rstrip("\0")
        if code != KVH_ERR_BUFFER_TOO_SMALL:
            return ""
        size = needed.value + 1
    return ""


def _function_address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _cuda_state(torch) -> Optional[str]:
    """Why PyTorch can no longer switch allocators, or None when it still can.

    PyTorch initialises its allocator at CUDA initialisation (the first tensor on CUDA, or any
    call that initialises CUDA) and refuses to swap an initialised allocator.
    """
    if not torch.cuda.is_initialized():
        return None
    try:
        held = sum(torch.cuda.memory_reserved(d) for d in range(torch.cuda.device_count()))
    except RuntimeError:
        # Another pluggable allocator (RMM, or kvhygiene set up by hand) keeps no device
        # statistics: CUDA is initialised under it all the same.
        return "CUDA is already initialised in this process, under another pluggable allocator"
    if held:
        return f"PyTorch already holds {held} bytes of CUDA memory from its default allocator"
    return "CUDA is already initialised in this process"


def _register_hooks(raw_allocator, lib: ctypes.CDLL, torch) -> None:
    """Record-stream and reset (empty_cache) hooks.

    PyTorch 2.x exposes them on the object ``CUDAPluggableAllocator.allocator()`` returns
    (``set_record_stream_fn``, ``set_reset_fn``). Without the record-stream hook, a tensor used
    on a second stream could be scrubbed while that stream still uses it; without the reset
    hook, ``torch.cuda.empty_cache()`` would not reach the pool. Where a build lacks the reset
    setter, ``torch.cuda.empty_cache`` is wrapped instead; there is no substitute for the
    record-stream hook, so its absence is an error.
    """
    global _reset_hook_installed
    set_record = getattr(raw_allocator, "set_record_stream_fn", None)
    if set_record is None:
        raise RuntimeError(
            "this PyTorch build does not expose set_record_stream_fn on the pluggable "
            "allocator; kvhygiene cannot order scrubs after tensors used on other streams"
        )
    set_record(_function_address(lib, "kvh_record_stream"))
    set_reset = getattr(raw_allocator, "set_reset_fn", None)
    if set_reset is not None:
        set_reset(_function_address(lib, "kvh_empty_cache"))
    elif not _reset_hook_installed:
        original = torch.cuda.empty_cache

        def empty_cache_with_kvhygiene() -> None:
            original()
            # Only once kvhygiene is the allocator: after a refused switch, the call would
            # start a kvhygiene that serves nothing.
            if _allocator is not None:
                lib.kvh_empty_cache()

        torch.cuda.empty_cache = empty_cache_with_kvhygiene
    _reset_hook_installed = True


def _route_memory_stats(lib: ctypes.CDLL, torch) -> None:
    """Makes PyTorch's memory statistics kvhygiene's.

    PyTorch's pluggable allocator keeps none: under it ``torch.cuda.memory_stats``,
    ``memory_allocated``, ``max_memory_allocated``, ``memory_reserved`` and
    ``reset_peak_memory_stats`` raise ("does not yet support getDeviceStats", or
    "resetPeakStats"), and so do their
    ``torch.accelerator`` counterparts; engines call them: vLLM sizes its KV cache from the
    peak of allocated bytes during a profiling run and from the bytes reserved (recent
    releases through ``torch.accelerator``). Each of those functions calls one of three
    ``torch._C`` functions at every call (``_cuda_*`` for ``torch.cuda``, ``_accelerator_*``
    for ``torch.accelerator``, whose accelerator is CUDA in a process kvhygiene serves),
    which are replaced here. A set a build lacks in part (a layout this does not know) is
    left as it is: those statistics raise there, as under any pluggable allocator.

    ``torch.accelerator``'s functions first ask ``_accelerator_isAllocatorInitialized`` (or, in
    some builds, ``_accelerator_allocatorInitialized``), and
    its ``empty_cache`` calls ``_accelerator_emptyCache``: both go to the accelerator's
    registered device allocator, which PyTorch's allocator swap may leave being its own
    caching allocator, never initialised (then the statistics read empty and ``empty_cache``
    does nothing, and vLLM's profiling would size the KV cache without them). When the build
    has them they are replaced too: the allocator counts as initialised, and ``empty_cache``
    is kvhygiene's (``kvh_empty_cache``, what ``torch.cuda.empty_cache`` reaches through the
    reset hook).
    """
    c = getattr(torch, "_C", None)
    if c is None:
        return

    def reset_peak(device) -> None:
        _check("kvh_reset_peak_memory_stats", lib.kvh_reset_peak_memory_stats(_device_index(device)))

    def reset_accumulated(device) -> None:
        code = lib.kvh_reset_accumulated_memory_stats(_device_index(device))
        _check("kvh_reset_accumulated_memory_stats", code)

    routes = (
        {
            "_cuda_memoryStats": memory_stats,
            "_cuda_resetPeakMemoryStats": reset_peak,
            "_cuda_resetAccumulatedMemoryStats": reset_accumulated,
        },
        {
            "_accelerator_getDeviceStats": memory_stats,
            "_accelerator_resetPeakStats": reset_peak,
            "_accelerator_resetAccumulatedStats": reset_accumulated,
        },
    )
    for route in routes:
        if all(hasattr(c, name) for name in route):
            for name, fn in route.items():
                setattr(c, name, fn)

    accelerator = (
        ("_accelerator_isAllocatorInitialized", lambda: True),
        # The same question under the name some builds of torch/accelerator/memory.py ask.
        ("_accelerator_allocatorInitialized", lambda: True),
        ("_accelerator_emptyCache", empty_cache),
    )
    for name, fn in accelerator:
        if hasattr(c, name):
            setattr(c, name, fn)


#: Why a CUDA graph capture is refused under kvhygiene, and what to do instead.
GRAPH_CAPTURE_REFUSED = (
    "kvhygiene: CUDA graph capture is not supported with kvhygiene as PyTorch's allocator: "
    "PyTorch keeps no graph memory pool for a pluggable allocator, so memory the graph's "
    "kernels write at replay could be scrubbed and handed to another request, and a capture "
    "that needs memory fails. Run without CUDA graphs (vLLM: --enforce-eager; SGLang: "
    "--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled, before 0.5.23 "
    "--disable-cuda-graph; torch.compile: not mode='reduce-overhead'); see docs/cuda.md"
)


def _refuse_graph_capture(torch) -> None:
    """Makes ``torch.cuda.CUDAGraph.capture_begin`` raise :data:`GRAPH_CAPTURE_REFUSED` before
    any capture begins (``torch.cuda.graph`` and ``make_graphed_callables`` go through it).

    Under a pluggable allocator PyTorch calls no pool of its own for a graph: a block freed
    during the capture would be scrubbed and reused once it ends while the graph still writes
    it at every replay, and fresh memory is refused during a capture anyway. Refused before
    the capture starts, the error is clear and leaves no stream capturing. The context manager
    ``torch.cuda.graph`` is refused on entry too: it makes its side stream current before it
    calls ``capture_begin``, and a ``with`` whose entry raises never leaves that stream, so
    a caller that caught the error would go on running on it. The device-generic
    ``torch.accelerator.Graph`` of newer releases, which captures through its own binding
    rather than through ``CUDAGraph``, is refused the same way (its ``capture_begin``, and its
    entry as a context manager). A build without a class is left as it is.
    """

    def refuse(*args, **kwargs):
        raise RuntimeError(GRAPH_CAPTURE_REFUSED)

    refuse._kvhygiene_refusal = True
    graph = getattr(torch.cuda, "CUDAGraph", None)
    accelerator_graph = getattr(getattr(torch, "accelerator", None), "Graph", None)
    for cls, name in (
        (graph, "capture_begin"),
        (getattr(torch.cuda, "graph", None), "__enter__"),
        (accelerator_graph, "capture_begin"),
        (accelerator_graph, "__enter__"),
    ):
        method = getattr(cls, name, None) if isinstance(cls, type) else None
        if method is not None and not getattr(method, "_kvhygiene_refusal", False):
            setattr(cls, name, refuse)


def _refuse_null_on_failure(lib) -> None:
    """Refuses (:class:`KvhError`, ``KVH_ERR_CONFIG``) a policy whose ``kvh_malloc`` returns
    NULL on failure (``oom = "null"``, for C engines): PyTorch does not check the result, and
    would hand out a tensor at address 0, whose first kernel faults and takes the process's
    CUDA context, and every tenant's requests, with it."""
    throws = ctypes.c_int(1)
    _check("kvh_oom_throws", lib.kvh_oom_throws(ctypes.byref(throws)))
    if not throws.value:
        raise KvhError(
            "kvhygiene.install",
            KVH_ERR_CONFIG,
            'the policy sets oom = "null" (KVH_OOM or the KVH_CONFIG file): a failed '
            "allocation would return NULL, which PyTorch does not check and would use as "
            "device memory; under PyTorch leave KVH_OOM unset or set it to throw (the default)",
        )


def install(path: Optional[str] = None):
    """Makes kvhygiene PyTorch's CUDA allocator. Call before the first CUDA allocation.

    Returns the ``CUDAPluggableAllocator``. PyTorch's memory statistics
    (``torch.cuda.memory_stats`` and the functions that read it, ``reset_peak_memory_stats``),
    which a pluggable allocator does not keep, then answer from kvhygiene's pool (see
    :func:`memory_stats`), and CUDA graph capture is refused with
    :data:`GRAPH_CAPTURE_REFUSED` (PyTorch keeps no graph memory pool for a pluggable
    allocator). Calling it again is a no-op (a ``path`` given
    again must name the library installed). Raises
    :class:`AllocatorAlreadyInUseError` when CUDA is already initialised in this process
    (PyTorch cannot swap allocators then; the message says whether memory is held), ``ImportError`` without torch, ``FileNotFoundError`` when the
    library cannot be found (``ValueError`` when ``path`` names another file than the one
    already loaded, ``OSError`` when the file is not a library this process can load, or
    not kvhygiene's),
    ``RuntimeError`` when this PyTorch build lacks the record-stream hook or CUDA (a CPU-only
    build), and
    :class:`KvhError` for an invalid configuration (the message names the key) or one whose
    failed allocation returns NULL (``oom = "null"``, which PyTorch would use). The allocator
    itself starts at the first allocation, in the process that makes it: the files and
    directories the policy names (keys, log directory) are opened then, and a start-up that
    fails makes that allocation fail (the reason on stderr). ``kvh preflight`` checks them
    beforehand, through the same code.
    """
    global _allocator
    try:
        import torch  # only install() needs torch
    except ImportError as e:
        raise ImportError(
            "kvhygiene.install() needs PyTorch: install torch (or the package's torch extra: "
            "pip install -e './python[torch]' from a checkout); "
            "the rest of kvhygiene (stats, contexts, the KV scrubs) works without it"
        ) from e

    # One lock for the whole installation: two threads must not both swap allocators.
    with _lock:
        if _allocator is not None:
            if path is not None:
                load(path)  # the same file, or the error load() gives
            return _allocator
        why = _cuda_state(torch)
        if why is not None:
            raise AllocatorAlreadyInUseError(
                f"kvhygiene.install() must run before CUDA is initialised: {why}, and PyTorch "
                "cannot swap its allocator after that. Call install() at the top of the "
                "program, before any tensor is created on CUDA."
            )
        lib = load(path)
        assert _lib_path is not None
        # A bad configuration is reported here, where it can be handled, not at PyTorch's
        # first CUDA allocation as std::bad_alloc. Checked, not started: a launcher that
        # installs, then forks its workers, leaves each to start its own allocator.
        code = lib.kvh_check_config()
        if code != KVH_OK:
            raise _error("kvh_check_config", code)
        _refuse_null_on_failure(lib)
        try:
            allocator = torch.cuda.memory.CUDAPluggableAllocator(
                _lib_path, "kvh_malloc", "kvh_free"
            )
        except AttributeError as e:
            # A CPU-only build of torch lacks the CUDA bindings the allocator is made with; an
            # old one, the allocator itself.
            cpu_only = getattr(getattr(torch, "version", None), "cuda", "") is None
            why = "a CPU-only build has none: install a CUDA build of torch" if cpu_only else (
                "kvhygiene needs PyTorch 2.3 or later, built with CUDA"
            )
            raise RuntimeError(
                f"kvhygiene.install(): this PyTorch build takes no pluggable CUDA allocator ({e}); {why}"
            ) from e
        _register_hooks(allocator.allocator(), lib, torch)
        try:
            torch.cuda.memory.change_current_allocator(allocator)
        except RuntimeError as e:
            raise AllocatorAlreadyInUseError(
                f"PyTorch refused to switch allocators ({e}); call kvhygiene.install() before "
                "the first CUDA allocation"
            ) from e
        _route_memory_stats(lib, torch)
        _refuse_graph_capture(torch)
        _allocator = allocator
        return allocator


def __getattr__(name: str):
    # The engine adapters load on first use (PEP 562), so that `kvhygiene.vllm.X` works after
    # a bare `import kvhygiene`, as the docs write it, and importing kvhygiene loads neither.
    if name in ("vllm", "sglang"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def installed() -> bool:
    """Whether :func:`install` has made kvhygiene PyTorch's CUDA allocator."""
    return _allocator is not None
