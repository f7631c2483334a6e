"""What every osteo_model command line shares: Hydra overrides after our flags, one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from osteo_model.errors import OsteoError


def run_cli(body: Callable[[], object]) -> int:
    """Run ``body``; an int it returns is the exit code (commands that wrap a child process pass its status
    on). An OsteoError prints ``error: <path>: <reason>`` (exit 1), a config error exit 2."""
    try:
        result = body()
    except OsteoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: config: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def run_config_cli(prog: str, description: str, argv: Sequence[str] | None, body: Callable[[DictConfig], None]) -> int:
    """A command whose arguments are all Hydra overrides: compose, seed torch, run ``body(cfg)``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _, overrides = parser.parse_known_args(argv)

    def composed() -> None:
        import torch

        from osteo_model.config import compose

        cfg = compose(overrides)
        torch.manual_seed(int(cfg.seed))
        body(cfg)

    return run_cli(composed)
