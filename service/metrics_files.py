"""The multiprocess metrics folder, made safe to serve from: whatever its state, metrics never take serving down.

prometheus_client keeps each worker's series in memory-mapped files in PROMETHEUS_MULTIPROC_DIR. As shipped, it
grows them sparse (``truncate``), so on a full volume the first write into a new page kills the worker with SIGBUS,
and a folder that is read-only or deleted raises inside the request that creates a series. Here:

- ``GuardedFile`` replaces its file class: space is reserved with ``posix_fallocate`` before it is mapped, so a full
  volume is an ``OSError`` at growth, never SIGBUS; a write that cannot be placed keeps the value in memory (tried
  again every few seconds), is logged once per worker, and the request goes on;
- ``compact(folder, pid)`` runs in the gunicorn master when a worker exits: the dead worker's counters and histograms
  are added into one archive file per type and its files removed (its live gauges are dropped, as prometheus_client
  does), so the folder holds the live workers' files plus one archive, however many workers have lived;
- ``MappedValue`` replaces its value class, and ``Histogram`` its histogram's observe, with ones that write the
  same files for less per update (a request makes 38 updates, 14 of them observations);
- ``collect(folder)`` reads the folder under a shared lock that compaction takes exclusively, so a scrape never sees
  a dead worker's counts twice or not at all.
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import logging
import mmap
import os
import struct
import threading
import time
from contextlib import contextmanager, suppress

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.settings import prometheus_folder

log = logging.getLogger("convserve")

INITIAL_BYTES = 1 << 16  # prometheus_client's own starting size; a file doubles when full
RETRY_SECONDS = 5.0  # how often a value kept in memory tries again for a place in its file
ARCHIVE = "archive"  # <type>_archive.db: the dead workers' counts (prometheus_client reads the type from the name)
MERGED_TYPES = ("counter", "histogram", "summary")  # what a dead worker leaves; its gauges are all "live" modes
LOCK_NAME = ".lock"  # not *.db: the collector reads every *.db file

_INTEGER = struct.Struct("i")
_TWO_DOUBLES = struct.Struct("dd")
_reported: set[str] = set()


def _entry(key: str, value: float = 0.0) -> bytes:
    """One series in prometheus_client's file layout: its key's length, the key padded to 8 bytes, value, timestamp."""
    encoded = key.encode("utf-8")
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return struct.pack(f"i{len(padded)}sdd".encode(), len(encoded), padded, value, 0.0)


def _report_once(what: str, error: OSError) -> None:
    """One log line per worker and kind of failure, however many writes fail."""
    if what in _reported:
        return
    _reported.add(what)
    log.warning("metrics: %s (%s); serving goes on, and the series this worker cannot write are kept in memory and "
                "not exported until the folder has room (PROMETHEUS_MULTIPROC_DIR; logged once per worker)",
                what, error.strerror or error)


class GuardedFile(MmapedDict):
    """prometheus_client's MmapedDict, with space reserved before it is mapped and no write that can raise.

    Its values (MappedValue) call it with their one per-process lock held, so a write here may also retry the other
    files' pending values."""

    def __init__(self, filename, read_mode=False):  # noqa: D107 - the parent's signature
        self._fname = filename
        self._f = self._m = None
        self._capacity = self._used = 0
        self._positions: dict[str, int] = {}
        self._unplaced: dict[str, tuple[float, float]] = {}  # values with no place in the file yet
        self._attach()

    def _attach(self) -> bool:
        try:
            handle = open(self._fname, "a+b")  # noqa: SIM115 - kept open for the worker's life, as the parent does
        except OSError as error:
            _report_once(f"cannot create {os.path.basename(self._fname)}", error)
            return False
        capacity = 0
        try:
            capacity = os.fstat(handle.fileno()).st_size
            if capacity == 0:
                os.posix_fallocate(handle.fileno(), 0, INITIAL_BYTES)
                capacity = INITIAL_BYTES
            mapped = mmap.mmap(handle.fileno(), capacity, access=mmap.ACCESS_WRITE)
        except OSError as error:
            handle.close()
            if capacity == 0:  # an empty file would break every scrape: the collector reads its header
                with suppress(OSError):
                    os.remove(self._fname)
            _report_once(f"cannot reserve space for {os.path.basename(self._fname)}", error)
            return False
        self._f, self._m, self._capacity = handle, mapped, capacity
        self._used = _INTEGER.unpack_from(mapped, 0)[0]
        if self._used == 0:
            self._used = 8
            mapped[0:4] = _INTEGER.pack(8)
        else:
            self._positions = {key: pos for key, _, _, pos in self._read_all_values()}
        return True

    def _init_value(self, key):
        entry = _entry(key)
        if self._used + len(entry) > self._capacity:
            capacity = self._capacity
            while self._used + len(entry) > capacity:
                capacity *= 2
            os.posix_fallocate(self._f.fileno(), 0, capacity)  # ENOSPC here, not SIGBUS later
            self._m = mmap.mmap(self._f.fileno(), capacity)
            self._capacity = capacity
        self._m[self._used:self._used + len(entry)] = entry
        self._used += len(entry)
        self._m[0:4] = _INTEGER.pack(self._used)
        self._positions[key] = self._used - 16

    def _place(self, key: str) -> int | None:
        """The key's position in the file, made if it has none; None when the file has no room for it."""
        position = self._positions.get(key)
        if position is not None:
            return position
        if self._m is None and not self._attach():
            return None
        try:
            self._init_value(key)
        except OSError as error:
            _report_once(f"cannot grow {os.path.basename(self._fname)}", error)
            return None
        return self._positions[key]

    def _flush(self) -> bool:
        """Write the pending values that now fit; True when none is left."""
        for key, value in list(self._unplaced.items()):
            position = self._place(key)
            if position is None:
                return False
            self._m[position:position + 16] = _TWO_DOUBLES.pack(*value)
            del self._unplaced[key]
        return True

    def position_of(self, key: str) -> int | None:
        """Where the key's value is in the mapped file; None while it is kept in memory."""
        return None if self._m is None or key in self._unplaced else self._positions.get(key)

    def read_value(self, key):
        if key in self._unplaced:
            return self._unplaced[key]
        position = self._place(key)
        if position is None:
            self._defer(key, (0.0, 0.0))
            return 0.0, 0.0
        return _TWO_DOUBLES.unpack_from(self._m, position)

    def write_value(self, key, value, timestamp):
        _retry_pending()
        position = None if key in self._unplaced else self._place(key)
        if position is None:
            self._defer(key, (value, timestamp))
            return
        self._m[position:position + 16] = _TWO_DOUBLES.pack(value, timestamp)

    def _defer(self, key: str, value: tuple[float, float]) -> None:
        self._unplaced[key] = value
        _pending.add(self)

    def read_all_values(self):
        if self._m is not None:
            yield from super().read_all_values()

    def close(self):
        if self._f is not None:
            super().close()


_pending: set[GuardedFile] = set()  # files holding values that found no room
_next_retry = [0.0]


def _retry_pending() -> None:
    """At most every RETRY_SECONDS, on a write: the values kept in memory are written where there is room now."""
    if not _pending or time.monotonic() < _next_retry[0]:
        return
    _next_retry[0] = time.monotonic() + RETRY_SECONDS
    for waiting in list(_pending):
        if waiting._flush():
            _pending.discard(waiting)
    if not _pending:
        log.info("metrics: every series kept in memory is written to the metrics folder again")


class MappedValue:
    """prometheus_client's multiprocess value (values.MultiProcessValue): the same files, keys and modes, cheaper per
    update.

    A classify request makes 38 updates. The stock value takes its lock, calls ``os.getpid()`` to notice a fork,
    then looks the key up in its file and packs the doubles on each one: 2.4–2.9 µs an update on a 2-core VM, against
    1.0–1.3 µs here. This one learns of a fork from ``os.register_at_fork`` and remembers its place in the file, so an
    update is the lock, an add and one ``pack_into``; the file is asked again only while some value has no place in
    it (a full volume, GuardedFile)."""

    _multiprocess = True
    __slots__ = ("_params", "_file", "_key", "_value", "_timestamp", "_position", "_generation")

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="", **kwargs):
        self._params = typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode
        with _values_lock:
            self._reset()

    def _reset(self) -> None:
        typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode = self._params
        prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        file = _files.get(prefix)
        if file is None:
            folder = prometheus_folder()
            file = _files[prefix] = GuardedFile(os.path.join(folder, f"{prefix}_{os.getpid()}.db"))
        self._file = file
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value, self._timestamp = file.read_value(self._key)
        self._position = file.position_of(self._key)
        self._generation = _generation[0]

    def _write(self) -> None:
        mapped = self._file._m
        if self._position is None or mapped is None or _pending:
            self._file.write_value(self._key, self._value, self._timestamp)
            self._position = self._file.position_of(self._key)
        else:
            _TWO_DOUBLES.pack_into(mapped, self._position, self._value, self._timestamp)

    def inc(self, amount):
        with _values_lock:
            if self._generation != _generation[0]:  # forked since: this process has files of its own
                self._reset()
            self._value += amount
            self._timestamp = 0.0
            self._write()

    def set(self, value, timestamp=None):
        with _values_lock:
            if self._generation != _generation[0]:
                self._reset()
            self._value = value
            self._timestamp = timestamp or 0.0
            self._write()

    def set_exemplar(self, exemplar):
        return  # prometheus_client's multiprocess mode keeps no exemplars either

    def get(self):
        with _values_lock:
            if self._generation != _generation[0]:
                self._reset()
            return self._value

    def get_exemplar(self):
        return None


class Histogram(prometheus_client.Histogram):
    """prometheus_client's Histogram, whose observation into MappedValues takes their lock once and finds its bucket
    by bisection, instead of two locked updates after a walk through the buckets (14 observations a request). Into
    other values (no multiprocess folder), with an exemplar, or of NaN, it is prometheus_client's own observe."""

    def observe(self, amount: float, exemplar=None) -> None:
        total = getattr(self, "_sum", None)  # a parent with labels has none: prometheus_client says why it can't
        if type(total) is not MappedValue or exemplar or amount != amount:
            return super().observe(amount, exemplar)
        bucket = self._buckets[bisect.bisect_left(self._upper_bounds, amount)]  # the first bound >= amount (+Inf last)
        with _values_lock:
            if total._generation != _generation[0]:
                total._reset()
                bucket._reset()
            total._value += amount
            bucket._value += 1.0
            total._timestamp = bucket._timestamp = 0.0
            total._write()
            bucket._write()


_values_lock = threading.Lock()
_files: dict[str, GuardedFile] = {}
_generation = [0]  # bumped in a forked child: every value finds its own file on its next use


def _after_fork_in_child() -> None:
    global _values_lock
    _values_lock = threading.Lock()  # another thread may have held it at the fork
    for file in _files.values():
        file.close()
    _files.clear()
    _generation[0] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def install() -> None:
    """Every metric made from now on in this process keeps its values in GuardedFile files, through MappedValue when
    prometheus_client chose multiprocess mode (PROMETHEUS_MULTIPROC_DIR set at its import)."""
    values.MmapedDict = GuardedFile
    if getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = MappedValue


@contextmanager
def locked(folder: str, exclusive: bool):
    """The folder's lock: shared for a scrape, exclusive for compaction. Without a lock file (the folder is full of
    inodes, or read-only) the work goes on unlocked rather than not at all."""
    try:
        descriptor = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(descriptor)


def collect(folder: str) -> bytes:
    """The text exposition of every worker's files in ``folder``, dead workers' archive included."""
    with locked(folder, exclusive=False):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)


def encode(entries: dict[str, float]) -> bytes:
    """A whole file in prometheus_client's layout: bytes used, padding, then one entry per series."""
    body = b"".join(_entry(key, value) for key, value in entries.items())
    return _INTEGER.pack(8 + len(body)) + b"\0" * 4 + body


def compact(folder: str, pid: int) -> None:
    """In the master, when worker ``pid`` has exited: its live gauges go, its counts join the archive. A merge that
    cannot be written (a full volume) leaves the dead worker's file where it is: counts are never lost."""
    with locked(folder, exclusive=True):
        mark_process_dead(pid, folder)
        for kind in MERGED_TYPES:
            dead = os.path.join(folder, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = os.path.join(folder, f"{kind}_{ARCHIVE}.db")
            totals: dict[str, float] = {}
            try:
                for path in (archive, dead):
                    if os.path.exists(path):
                        for key, value, _, _ in MmapedDict.read_all_values_from_file(path):
                            totals[key] = totals.get(key, 0.0) + value
                staged = os.path.join(folder, f".{kind}_{ARCHIVE}.tmp")
                with open(staged, "wb") as out:
                    out.write(encode(totals))
                os.replace(staged, archive)
                os.remove(dead)
            except (OSError, RuntimeError) as error:
                log.warning("metrics: could not merge the exited worker %d's %s file into the archive (%s); it stays "
                            "as it is and is still exported", pid, kind, error)


def size(folder: str) -> int:
    """Bytes the metrics files take on disk (allocated, not apparent)."""
    total = 0
    for path in glob.glob(os.path.join(folder, "*.db")):
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total
