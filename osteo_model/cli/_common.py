"""What every osteo_model command line shares: Hydra overrides after our flags, one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

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
        print(f"error: config: {config_problem(exc)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def config_problem(exc: Exception) -> str:
    """Hydra's error in one line that says what to do: an override of a setting that does not exist is
    named as such (Hydra's own line only says it "could not override"), a missing option lists the options."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)) and first.startswith("Could not override"):
        return f"{first[:-1] if first.endswith('.') else first}: no such setting (a typo?)"
    if "Available options" in " ".join(lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        options = [line for line in lines[start:] if not line.startswith(("Config search path", "provider="))]
        return f"{first} (options: {', '.join(options)})"
    return first


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
