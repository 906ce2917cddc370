"""entropix-vllm: Entropix sampling for vLLM."""

__version__ = "0.1.0"


def _bind_source_kernels() -> None:
    """A bare source checkout (not installed; e.g. ``PYTHONPATH=.`` on a GPU
    machine without vLLM): ``setup.py`` installs the top-level
    ``triton_kernels/`` directory as ``entropix_vllm.triton_kernels``; bind that
    name to the directory here so the same imports work. Installed (also
    editable) packages are left alone, and no top-level ``triton_kernels``
    (OpenAI's package of that name, which vLLM imports) is ever shadowed."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".triton_kernels"
    if name in sys.modules:
        return
    try:
        if importlib.util.find_spec(name) is not None:
            return
    except (ImportError, ValueError):
        pass
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "triton_kernels")
    init = os.path.join(d, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[d])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


_bind_source_kernels()
