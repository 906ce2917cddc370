"""The per-token Entropix trace: one JSON object per sampled token, one per line.

Record format (JSON Lines, UTF-8, keys in this order)::

    {"request_id": str, "index": int, "token_id": int,
     "entropy": float, "varentropy": float,
     "attn_entropy": float, "attn_varentropy": float,
     "agreement": float, "interaction_strength": float,
     "branch": str, "temperature": float, "top_k": int, "top_p": float,
     "min_p": float}

* ``index`` is the token's position in the request's output (0 = first token).
* ``branch`` is a name from :data:`reference.BRANCH_NAMES` (``argmax``,
  ``insert_cot``, ``explore``, ``resample``, ``adaptive``); a code outside
  0..4 is written as ``"code<N>"``.
* entropy is in bits, varentropy in bits^2 (SPEC sections 1-2).
* Float values are the exact values of the float32 (or float64) tensors the
  sampler produced, written with Python's shortest round-tripping ``repr`` of
  that value: parsing the text gives back the same number, bit for bit.
  Non-finite values are written as ``NaN`` / ``Infinity`` / ``-Infinity``
  (what Python's :mod:`json` reads and writes).

:class:`TraceWriter` keeps all of this off the sampler's hot path: ``submit``
only enqueues device work (a gather and an asynchronous copy to pinned host
memory) and a background thread waits for the copy, formats the lines and
appends them. Each submitted batch is appended with a single ``os.write`` on an
``O_APPEND`` descriptor, so several writers (threads, vLLM workers, engines)
can share one file: lines never interleave or tear. The reader (and the check
of traced branches against SPEC section 3) is ``entropix_vllm.report.reader``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import threading
import weakref
from typing import Mapping, Optional, Sequence

import torch

from .device import to_device
from .reference import BRANCH_NAMES

logger = logging.getLogger("entropix_vllm")

#: Tensor names ``submit`` takes, in the order they are stacked and written.
TENSOR_FIELDS = ("token_id", "entropy", "varentropy", "attn_entropy", "attn_varentropy",
                 "agreement", "interaction_strength", "branch", "temperature", "top_k",
                 "top_p", "min_p")
#: Keys of one record, in the order they are written.
RECORD_FIELDS = ("request_id", "index") + TENSOR_FIELDS
_INT_FIELDS = frozenset({"token_id", "top_k"})
#: ``branch`` of a record whose token vLLM's own sampler chose because the
#: Entropix step failed (the record also has a ``fallback`` key: the cause).
FALLBACK_BRANCH = "fallback"


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
class TraceWriter:
    """Appends trace records to ``path`` from a background thread.

    ``submit`` never synchronises the host with the GPU; formatting and file
    I/O happen on a daemon thread. Write errors (disk full, file removed, ...)
    are logged once on the ``entropix_vllm`` logger and the affected records are
    dropped; they never raise into the caller. Opening the file happens here,
    so an unusable path raises :class:`OSError` naming it at construction.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot open the Entropix trace file {self.path!r} "
                                   f"for appending: {e.strerror}", self.path) from None
        self._closed = False
        self._error_logged = False
        self._start_thread()
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().flush(timeout=10.0))
        atexit.register(self._atexit)

    # -- thread management -----------------------------------------------------
    def _start_thread(self) -> None:
        self._pid = os.getpid()
        self._queue: "queue.Queue" = queue.Queue()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._thread = threading.Thread(target=self._run, name="entropix-trace", daemon=True)
        self._thread.start()

    def _ensure_thread(self) -> None:
        # After a fork the child has the descriptor but not the thread.
        if os.getpid() != self._pid:
            self._start_thread()

    # -- public API ------------------------------------------------------------
    def submit(self, request_ids: Sequence[str], indices: Sequence[int],
               tensors: Mapping[str, torch.Tensor],
               rows: Optional[Sequence[int]] = None) -> None:
        """Queue one record per selected row.

        tensors:     ``{name: [B] tensor}`` for every name in :data:`TENSOR_FIELDS`,
                     all on one device (``branch`` holds int codes).
        rows:        host ints selecting the rows to record (None: all ``B``).
        request_ids, indices: one per selected row, in the order of ``rows``.

        Raises ValueError for mismatched arguments (a caller bug); never for
        I/O. CUDA tensors are gathered on device and copied asynchronously into
        pinned memory on the current stream; nothing here waits for the GPU.
        """
        if self._closed:
            self._log_error_once("submit() after close(); records dropped", None)
            return
        missing = [n for n in TENSOR_FIELDS if n not in tensors]
        if missing:
            raise ValueError(f"trace submit: missing tensors {missing}")
        first = tensors[TENSOR_FIELDS[0]]
        n = first.shape[0] if rows is None else len(rows)
        if len(request_ids) != n or len(indices) != n:
            raise ValueError(f"trace submit: {n} rows selected but {len(request_ids)} request "
                             f"ids and {len(indices)} indices given")
        if n == 0:
            return
        self._ensure_thread()
        # [F, B] float64, a fresh tensor: one stack (type promotion into the output)
        parts = [tensors[name].detach().reshape(-1) for name in TENSOR_FIELDS]
        stacked = torch.stack(parts, out=torch.empty((len(parts), parts[0].shape[0]),
                                                     dtype=torch.float64, device=first.device))
        event = None
        if stacked.is_cuda:
            if rows is not None:
                idx = to_device(torch.tensor(list(rows), dtype=torch.int64), stacked.device)
                stacked = stacked.index_select(1, idx)
            host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(stacked.device))
        else:
            host = stacked
            if rows is not None:
                host = host.index_select(1, torch.tensor(list(rows), dtype=torch.int64))
        with self._cond:
            self._submitted += 1
        self._queue.put((list(request_ids), [int(i) for i in indices], host, event))

    def submit_fallback(self, request_ids: Sequence[str], indices: Sequence[int],
                        token_ids: Sequence[int], cause: str) -> None:
        """Queue records for rows whose token vLLM's own sampler chose because
        the Entropix step failed: ``branch`` is :data:`FALLBACK_BRANCH`, the
        figures and parameters NaN, ``fallback`` the cause."""
        if self._closed or not request_ids:
            return
        self._ensure_thread()
        lines = []
        for rid, idx, tok in zip(request_ids, indices, token_ids):
            rec = {"request_id": str(rid), "index": int(idx), "token_id": int(tok)}
            for name in TENSOR_FIELDS[1:]:
                rec[name] = FALLBACK_BRANCH if name == "branch" else math.nan
            rec["fallback"] = str(cause)[:200]
            lines.append(json.dumps(rec, separators=(",", ":")))
        with self._cond:
            self._submitted += 1
        self._queue.put(("\n".join(lines) + "\n",))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every batch submitted so far is written (or dropped on
        error). Returns False if ``timeout`` seconds passed first."""
        if os.getpid() != self._pid:
            return True  # a forked child that has submitted nothing yet
        if not self._thread.is_alive():
            return self._submitted == self._done
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self) -> None:
        """Flush, stop the thread and close the file. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if os.getpid() == self._pid and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        try:
            os.close(self._fd)
        except OSError:
            pass
        atexit.unregister(self._atexit)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- background thread -----------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(item)
            except Exception as e:  # never let the thread die
                self._log_error_once(f"cannot write the Entropix trace file {self.path!r}", e)
            finally:
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()

    def _write(self, item) -> None:
        if len(item) == 1:  # pre-formatted lines (fallback records)
            data = item[0].encode("utf-8")
        else:
            request_ids, indices, host, event = item
            if event is not None:
                event.synchronize()
            data = format_records(request_ids, indices, host.tolist()).encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one call; loop only on a short write
            written = os.write(self._fd, view)
            view = view[written:]

    def _log_error_once(self, message: str, exc: Optional[BaseException]) -> None:
        if not self._error_logged:
            self._error_logged = True
            detail = f": {exc}" if exc is not None else ""
            logger.error("%s%s (further trace errors are not logged)", message, detail)


#: One record's text with ``%s`` slots: request id (a JSON string), index, then
#: every field of TENSOR_FIELDS (JSON texts), keys in RECORD_FIELDS order.
_RECORD_TEMPLATE = ('{"request_id":%s,"index":%s,'
                    + ",".join(f'"{n}":%s' for n in TENSOR_FIELDS) + "}")
_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _float_text(v: float) -> str:
    """JSON text of a float as :mod:`json` writes it (shortest round trip; NaN,
    Infinity, -Infinity)."""
    t = repr(v)
    return _NONFINITE.get(t, t)


def _int_text(v: float) -> str:
    return str(int(v)) if math.isfinite(v) else _float_text(v)


def format_records(request_ids: Sequence[str], indices: Sequence[int],
                   columns: Sequence[Sequence[float]]) -> str:
    """JSON Lines text for one batch; ``columns[f][r]`` is field ``TENSOR_FIELDS[f]``
    of row ``r`` (as float64 values). The text is what ``json.dumps`` of the
    record (compact separators) gives, built column by column: this runs on
    the trace thread, which holds the GIL while it formats."""
    texts = [json.dumps(str(r)) for r in request_ids], [str(int(i)) for i in indices]
    cols = list(texts)
    for name, col in zip(TENSOR_FIELDS, columns):
        if name == "branch":
            cols.append([json.dumps(_branch_name(v)) for v in col])
        elif name in _INT_FIELDS:
            cols.append([_int_text(v) for v in col])
        else:
            cols.append([_float_text(v) for v in map(float, col)])
    return "".join(_RECORD_TEMPLATE % row + "\n" for row in zip(*cols))


def _branch_name(code: float) -> str:
    if math.isfinite(code) and code == int(code) and 0 <= int(code) < len(BRANCH_NAMES):
        return BRANCH_NAMES[int(code)]
    return f"code{code:g}"
