"""Command-line pieces the eval (``python -m entropix_vllm.eval``) and the tuner
(``python -m entropix_vllm.tune``) share: the server and request arguments, the
progress bar."""

from __future__ import annotations

import argparse
import sys

from .tasks import SCORERS


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Arguments the eval and the tuner share."""
    ap.add_argument("--base-url", default="http://127.0.0.1:8000",
                    help="the server's OpenAI base URL (default: %(default)s)")
    ap.add_argument("--model", default=None, help="model name (default: the server's first)")
    ap.add_argument("--scorer", default=None, choices=sorted(SCORERS),
                    help="scorer for task items that name none")
    ap.add_argument("--max-tokens", type=int, default=24,
                    help="output tokens per answer, unless an item says (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="requests in flight (default: %(default)s)")
    ap.add_argument("--trace", default=None, metavar="FILE",
                    help="the server's Entropix trace file (its trace_path), for the branch mix")
    ap.add_argument("--seed", type=int, default=0, help="base of the request seeds (default: 0)")
    ap.add_argument("--no-logprobs", action="store_true",
                    help="do not ask for logprobs (no 'not argmax' column)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def progress_bar(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=disable, dynamic_ncols=True,
                file=sys.stderr)
