"""What identifies a served model, for ``preset: auto``.

A preset made by ``python -m entropix_vllm.tune`` records the model it was
fitted to (its ``match``); ``preset: auto`` picks the preset whose record is the
served model's. The record is three SHA-256 hashes, none of which depends on
the folder's name or path (a renamed or symlinked copy has the same record;
another model never does):

* ``architecture``: the structural fields of ``config.json``
  (:data:`ARCH_KEYS`; those of ``text_config`` too, when it has one);
* ``tokenizer``: the vocabulary: token -> id, the BPE merges and the added
  tokens of ``tokenizer.json`` (else ``vocab.json`` + ``merges.txt``, else the
  bytes of ``tokenizer.model`` / ``*.tiktoken``), in a canonical form, so a
  re-saved but equal tokenizer has the same hash;
* ``weights``: every tensor of the ``*.safetensors`` files (those of
  ``model.safetensors.index.json`` when there is one), sorted by name: its
  name, dtype, shape and :data:`SAMPLE_WINDOWS` windows of
  :data:`SAMPLE_BYTES` bytes of its data (start, middle, end). Cheap at
  start-up (the headers and a few bytes per tensor; about 800 small reads for
  the bundled model), and a fine-tune, another precision or another
  quantisation changes them. Models without safetensors weights cannot be
  identified (``auto`` then means ``classic``, saying why).

A model given as a Hugging Face id is looked up in the local Hugging Face cache
only (nothing is downloaded here); a model whose files are not there yet is not
identified.

CLI::

    python -m entropix_vllm.model_id MODEL                     # print its record (JSON)
    python -m entropix_vllm.model_id MODEL --add-to PRESET.json  # write it as the preset's match

Nothing here imports vLLM or the rest of the package.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

#: The version of the recipe below; a preset's match names the one it was made with.
SCHEME = "entropix-model-id/1"
#: The config.json fields that fix the model's structure.
ARCH_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "tie_word_embeddings")
#: Bytes read per window of a tensor's data, and windows per tensor.
SAMPLE_BYTES = 64
SAMPLE_WINDOWS = 3
#: A safetensors header larger than this is refused (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The keys of one match record, in the order they are written.
RECORD_KEYS = ("scheme", "architecture", "tokenizer", "weights", "model")
HASH_PARTS = ("architecture", "tokenizer", "weights")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class ModelIdError(Exception):
    """The model cannot be identified; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """Where a served model's files are: vLLM's ``model`` / ``tokenizer`` settings."""

    model: str
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    download_dir: Optional[str] = None

    @classmethod
    def of_vllm_config(cls, vllm_config) -> Optional["ModelSource"]:
        """The source of a ``VllmConfig`` (None without a model)."""
        mc = getattr(vllm_config, "model_config", None)
        model = getattr(mc, "model", None)
        if not isinstance(model, str) or not model:
            return None
        tok = getattr(mc, "tokenizer", None)
        lc = getattr(vllm_config, "load_config", None)

        def text(v):
            return v if isinstance(v, str) and v else None

        return cls(model=model, tokenizer=text(tok) if text(tok) != model else None,
                   revision=text(getattr(mc, "revision", None)),
                   tokenizer_revision=text(getattr(mc, "tokenizer_revision", None)),
                   download_dir=text(getattr(lc, "download_dir", None)))


@dataclass(frozen=True)
class ModelIdentity:
    """The three hashes of a model (each ``"sha256:<hex>"``) and its folder's name."""

    architecture: str
    tokenizer: str
    weights: str
    model: str = ""        # the folder name or hub id (informational: never compared)
    tensors: int = 0

    def record(self) -> dict:
        """The ``match`` record a preset file stores."""
        return {"scheme": SCHEME, "architecture": self.architecture, "tokenizer": self.tokenizer,
                "weights": self.weights, "model": self.model}

    @property
    def fingerprint(self) -> str:
        """One short text for logs (the first 12 hex digits over the three hashes)."""
        return fingerprint_of(self.record())

    def compare(self, record: Mapping[str, Any]) -> tuple:
        """The parts of ``record`` that equal this model's (of :data:`HASH_PARTS`)."""
        if record.get("scheme") != SCHEME:
            return ()
        return tuple(p for p in HASH_PARTS if record.get(p) == getattr(self, p))

    def matches(self, record: Mapping[str, Any]) -> bool:
        return len(self.compare(record)) == len(HASH_PARTS)


def fingerprint_of(record: Mapping[str, Any]) -> str:
    h = hashlib.sha256("|".join(str(record.get(p)) for p in HASH_PARTS).encode())
    return h.hexdigest()[:12]


class RecordError(ValueError):
    """A malformed match record: ``field`` is the record's key at fault ('' for the whole)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


def parse_record(value: Any) -> dict:
    """A match record from a preset file (:class:`RecordError` naming the field)."""
    if not isinstance(value, Mapping):
        raise RecordError("", f"expected an object with {', '.join(RECORD_KEYS[:4])}, "
                              f"got {type(value).__name__}")
    unknown = [k for k in value if k not in RECORD_KEYS]
    if unknown:
        raise RecordError("", f"unknown key {str(unknown[0])[:80]!r}; a match record has "
                              f"{', '.join(RECORD_KEYS)}")
    for key in ("scheme",) + HASH_PARTS:
        if key not in value:
            raise RecordError(key, "missing (write the record with `python -m "
                                   "entropix_vllm.model_id MODEL --add-to PRESET.json`)")
    if value["scheme"] != SCHEME:
        raise RecordError("scheme", f"expected {SCHEME!r} (what this version computes), "
                                    f"got {str(value['scheme'])[:80]!r}")
    for key in HASH_PARTS:
        v = value[key]
        if not isinstance(v, str) or not _HASH.match(v):
            raise RecordError(key, f"expected 'sha256:' and 64 lowercase hex digits, "
                                   f"got {str(v)[:80]!r}")
    model = value.get("model", "")
    if not isinstance(model, str) or len(model) > 256:
        raise RecordError("model", "expected a text of at most 256 characters")
    return {k: value[k] for k in RECORD_KEYS if k in value}


# ----------------------------------------------------------------------------
# Locating the files
# ----------------------------------------------------------------------------
def local_folder(name: str, revision: Optional[str] = None,
                 download_dir: Optional[str] = None) -> Path:
    """The local folder of a model: ``name`` itself, or its snapshot in the
    local Hugging Face cache (never downloaded here)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelIdError(f"{name} is a file, not a model folder")
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id=name, revision=revision, cache_dir=download_dir,
                                   local_files_only=True)
    except Exception as e:  # not cached, not a repo id, no huggingface_hub
        raise ModelIdError(f"{name} is neither a local folder nor in the local Hugging Face "
                           f"cache ({type(e).__name__})") from None
    return Path(folder)


# ----------------------------------------------------------------------------
# The three parts
# ----------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelIdError(f"cannot read {path.name}: {e}") from None


def architecture_hash(folder: Path) -> str:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelIdError(f"no config.json in {folder}")
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ModelIdError("config.json is not a JSON object")
    fields = {k: cfg.get(k) for k in ARCH_KEYS}
    text = cfg.get("text_config")
    if isinstance(text, dict):
        fields["text_config"] = {k: text.get(k) for k in ARCH_KEYS}
    return _digest(fields)


def _merges(merges: Any) -> list:
    out = []
    for m in merges or []:
        if isinstance(m, str):
            out.append(m.split(" ", 1))
        else:
            out.append(list(m))
    return out


def tokenizer_hash(folder: Path) -> str:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise ModelIdError("tokenizer.json has no model section")
        vocab = model.get("vocab")
        vocab = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])) if isinstance(vocab, dict) \
            else vocab
        added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or []
                       if isinstance(t, dict))
        return _digest({"kind": "tokenizer.json", "type": model.get("type"), "vocab": vocab,
                        "merges": _merges(model.get("merges")), "added": added})
    added_path = folder / "added_tokens.json"
    added = _read_json(added_path) if added_path.is_file() else {}
    vj = folder / "vocab.json"
    if vj.is_file():
        vocab = _read_json(vj)
        merges = []
        mt = folder / "merges.txt"
        if mt.is_file():
            lines = mt.read_text(encoding="utf-8").splitlines()
            merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        return _digest({"kind": "vocab.json", "vocab": sorted(vocab.items()) if isinstance(
            vocab, dict) else vocab, "merges": _merges(merges), "added": added})
    files = sorted(folder.glob("tokenizer.model")) + sorted(folder.glob("*.tiktoken"))
    if files:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes())
        return _digest({"kind": "files", "files": h.hexdigest(), "added": added})
    raise ModelIdError(f"no tokenizer files in {folder} (tokenizer.json, vocab.json, "
                       "tokenizer.model or *.tiktoken)")


def _weight_files(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ModelIdError(f"{index.name} has no weight_map")
        return [folder / f for f in sorted(set(wm.values()))]
    return sorted(folder.glob("*.safetensors"))


def _windows(size: int) -> list:
    if size <= SAMPLE_BYTES * SAMPLE_WINDOWS:
        return [(0, size)]
    last = size - SAMPLE_BYTES
    starts = sorted({round(i * last / (SAMPLE_WINDOWS - 1)) for i in range(SAMPLE_WINDOWS)})
    return [(s, SAMPLE_BYTES) for s in starts]


def weights_hash(folder: Path) -> tuple:
    """(hash, number of tensors) of the safetensors weights of ``folder``."""
    files = _weight_files(folder)
    if not files:
        raise ModelIdError(f"no safetensors weights in {folder} (auto identifies a model by "
                           "its *.safetensors files)")
    entries = []
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ModelIdError(f"{path.name} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise ModelIdError(f"{path.name}: safetensors header of {n} bytes")
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ModelIdError(f"{path.name}: unreadable safetensors header ({e})") from None
                if not isinstance(header, dict):
                    raise ModelIdError(f"{path.name}: safetensors header is not an object")
                base = 8 + n
                tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1].get("data_offsets", [0])[0]
                                 if isinstance(kv[1], dict) else 0)
                for name, info in tensors:
                    try:
                        start, end = (int(x) for x in info["data_offsets"])
                        dtype, shape = str(info["dtype"]), [int(d) for d in info["shape"]]
                    except (KeyError, TypeError, ValueError):
                        raise ModelIdError(f"{path.name}: malformed entry for tensor "
                                           f"{str(name)[:80]!r}") from None
                    h = hashlib.sha256()
                    for off, length in _windows(end - start):
                        f.seek(base + start + off)
                        chunk = f.read(length)
                        if len(chunk) != length:
                            raise ModelIdError(f"{path.name} is truncated (tensor {name!r})")
                        h.update(chunk)
                    entries.append([name, dtype, shape, h.hexdigest()])
        except OSError as e:
            raise ModelIdError(f"cannot read {path.name}: {e.strerror or e}") from None
    entries.sort()
    return _digest({"tensors": entries}), len(entries)


@functools.lru_cache(maxsize=16)
def identify(source: ModelSource) -> ModelIdentity:
    """The identity of ``source``'s model (``ModelIdError`` saying why not).

    Cached per process: the front end, the engine core and the worker each
    compute it once.
    """
    folder = local_folder(source.model, source.revision, source.download_dir)
    tok_folder = folder
    if source.tokenizer:
        tok_folder = local_folder(source.tokenizer, source.tokenizer_revision, source.download_dir)
    weights, count = weights_hash(folder)
    name = source.model if not Path(os.path.expanduser(source.model)).is_dir() \
        else Path(os.path.abspath(os.path.expanduser(source.model))).name
    return ModelIdentity(architecture=architecture_hash(folder),
                         tokenizer=tokenizer_hash(tok_folder), weights=weights,
                         model=name[:256], tensors=count)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def add_match(preset_path: str, record: Mapping[str, Any]) -> dict:
    """Write ``record`` as the ``match`` of the preset file (everything else kept,
    ``match`` placed after ``coefficients``); returns the new content."""
    with open(preset_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "coefficients" not in data:
        raise ValueError(f"{preset_path} is not a preset file with a 'coefficients' object")
    out = {}
    for k, v in data.items():
        if k == "match":
            continue
        out[k] = v
        if k == "coefficients":
            out["match"] = dict(record)
    Path(preset_path).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entropix_vllm.model_id",
                                 description="Print the record that identifies a model for "
                                             "`preset: auto` (or write it into a preset file).")
    ap.add_argument("model", help="a model folder (or a Hugging Face id in the local cache)")
    ap.add_argument("--tokenizer", default=None, help="the tokenizer, when not the model's")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--add-to", metavar="PRESET.json", default=None,
                    help="write the record as this preset file's `match`")
    args = ap.parse_args(argv)
    try:
        ident = identify(ModelSource(args.model, args.tokenizer, args.revision))
    except ModelIdError as e:
        print(f"error: cannot identify {args.model}: {e}", file=sys.stderr)
        return 2
    record = ident.record()
    print(json.dumps(record, indent=1))
    if args.add_to:
        try:
            add_match(args.add_to, record)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"match written to {args.add_to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
