"""What every osteo_model command line shares: Hydra overrides after our flags, one-line errors."""
from __future__ import annotations

import sys
from typing import Callable

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from osteo_model.errors import OsteoError


def run_cli(body: Callable[[], None]) -> int:
    """Run ``body``; an OsteoError prints ``error: <path>: <reason>`` (exit 1), a config error exit 2."""
    try:
        body()
    except OsteoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: config: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
