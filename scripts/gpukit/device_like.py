"""A CPU stand-in for the GPU machine's Python: an interpreter that sees, of this Python's
site-packages, only the distributions the device image has (``device_image_packages.txt``),
so that vLLM from the kit (``PYTHONPATH=/tmp/site``) imports here exactly what it would
find there, or fails naming what the kit lacks.

    python scripts/gpukit/device_like.py DIR     # writes DIR/filtered/ (links) and DIR/python

``DIR/python`` runs this interpreter with ``-S`` (no site-packages, no .pth files) and
``DIR/filtered`` appended to ``PYTHONPATH``. Torch and Triton are this machine's (CPU
torch 2.13, Triton 3.9), not the device's (torch 2.11 + CUDA 13, Triton 3.6).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path=os.path.join(HERE, "device_image_packages.txt")):
    with open(path) as f:
        return {norm(ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")}


def top_level_entries(dist, sp):
    """The names under site-packages that belong to ``dist`` (its RECORD, else top_level.txt)."""
    out = set()
    files = dist.files or []
    for f in files:
        parts = str(f).replace("\\", "/").split("/")
        if parts[0] in ("..", "") or parts[0].endswith(".pth"):
            continue
        out.add(parts[0])
    if not out:
        tl = dist.read_text("top_level.txt") or ""
        for name in tl.split():
            for cand in (name, name + ".py"):
                if os.path.exists(os.path.join(sp, cand)):
                    out.add(cand)
    return {e for e in out if os.path.exists(os.path.join(sp, e)) and e != "__pycache__"}


def build(dest, sp=None):
    sp = sp or sysconfig.get_paths()["purelib"]
    allowed = image_packages()
    filtered = os.path.join(dest, "filtered")
    if os.path.exists(filtered):
        shutil.rmtree(filtered)
    os.makedirs(filtered)
    kept, hidden = [], []
    for dist in md.distributions(path=[sp]):
        name = dist.metadata["Name"] or ""
        if norm(name) not in allowed:
            hidden.append(name)
            continue
        kept.append(name)
        for e in top_level_entries(dist, sp):
            link = os.path.join(filtered, e)
            if not os.path.lexists(link):
                os.symlink(os.path.join(sp, e), link)
    wrapper = os.path.join(dest, "python")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n# device_like.py: this Python, only the device image's packages\n"
                f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{filtered}" exec {sys.executable} -S "$@"\n')
    os.chmod(wrapper, 0o755)
    return {"python": wrapper, "filtered": filtered, "kept": sorted(kept), "hidden": sorted(hidden)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python device_like.py DIR")
    r = build(os.path.abspath(sys.argv[1]))
    print(f"{r['python']}: {len(r['kept'])} distributions kept, {len(r['hidden'])} hidden "
          f"({', '.join(h for h in r['hidden'] if 'vllm' in h.lower() or 'entropix' in h.lower())} among them)")
