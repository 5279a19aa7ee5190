"""What the app keeps between clicks, and how it knows it is stale.

Everything the Compare tab and the run list show is computed from files in run folders, and those
change only by files appearing or being replaced (run.json, exit files, checkpoint-N renamed into
place, samples) or by growing (metrics.jsonl, eval.jsonl, train.log). So each entry is keyed on the
stamps (path, mtime_ns, size) of the files it was computed from: a new, replaced or appended file
gives a new key, the old entry is never returned again and ages out of a bounded LRU.

    RUN_INFO   a run folder's RunInfo (app.runs.info), keyed on the stamps of the folder itself (a file
               created, renamed or removed in it moves its mtime: checkpoints, exit files, the final
               adapter), metrics.jsonl, eval.jsonl and train.log; never for a queued or running run,
               whose status also depends on whether a process is alive
    METRICS    per metrics.jsonl: the rows parsed so far and the byte offset reached (app.runs reads
               only the appended bytes; a replaced or truncated file starts over)
    TILES      a sample PNG decoded and resized to a grid cell, keyed on the PNG's stamp and the cell
    FIGURES    a rendered plot (PNG data URL), keyed on the data it draws (no file involved)

A file changed twice within one tick of the filesystem clock could keep its stamp, so a stamp younger
than FRESH_S seconds is not trusted: such entries are computed and not stored ("racy" stamps, as git
treats its index).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

FRESH_S = 2.0
_MISS = object()


class LRU:
    """A thread-safe mapping that keeps the `size` most recently used entries."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)


def stamp(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """(path, mtime_ns, size) of a file or folder, None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_mtime_ns, st.st_size


def settled(stamps) -> bool:
    """Every stamp is older than FRESH_S (missing files count as settled)."""
    newest = max((s[1] for s in stamps if s is not None), default=0)
    return time.time_ns() - newest > FRESH_S * 1e9


def memo(cache: LRU, key: Hashable, compute: Callable[[], Any], store: Callable[[Any], bool] | None = None):
    """cache[key], computed once; `store(value)` False keeps a value out of the cache."""
    value = cache.get(key, _MISS)
    if value is _MISS:
        value = compute()
        if store is None or store(value):
            cache.put(key, value)
    return value


def file_memo(cache: LRU, paths: list[Path], compute: Callable[[], Any], extra: Hashable = (),
              store: Callable[[Any], bool] | None = None):
    """compute() keyed on the stamps of `paths` (plus `extra`); not stored while a stamp is fresh."""
    stamps = tuple(stamp(p) for p in paths)
    if not settled(stamps):
        return compute()
    return memo(cache, (stamps, extra), compute, store)


RUN_INFO = LRU(2048)       # RunInfo is small: a few hundred bytes each
METRICS = LRU(256)         # summary keys only: ~0.7 KB a step as dicts, 0.2 MB for a 300-step run
TILES = LRU(1024)          # 128 x 128 RGB: 48 KiB each, 48 MiB at most
FIGURES = LRU(64)          # a 640 x 320 PNG as base64: ~30-60 KiB each


def clear() -> None:
    for cache in (RUN_INFO, METRICS, TILES, FIGURES):
        cache.clear()
