"""``python -m entropix_vllm.report TRACE ...`` (see the package docstring)."""

import sys

from . import main

sys.exit(main())
