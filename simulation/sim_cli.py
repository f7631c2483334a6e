"""`osteo-sim [--no-baselines] [--telemetry] [hydra overrides]`: what `make demo` runs (see sim.py)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteo-sim", description=__doc__.splitlines()[0])
    p.add_argument("--no-baselines", action="store_true", help="only the federated method and onboarding")
    p.add_argument("--telemetry", action="store_true", help="allow Flower's usage telemetry (off by default)")
    args, overrides = p.parse_known_args(argv)
    # Before Flower is imported: no telemetry unless asked, no dependency installs, no update check.
    os.environ["FLWR_TELEMETRY_ENABLED"] = "1" if args.telemetry else "0"
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU simulation: silence Ray's GPU notice
    from osteo_model.cli._common import run_cli
    from osteofl.simulation.sim import simulate

    print(f"osteo-sim: Flower telemetry {'ON' if args.telemetry else 'off (--telemetry to opt in)'}", flush=True)
    return run_cli(lambda: simulate(overrides, log=lambda m: print(m, flush=True), baselines=not args.no_baselines))


if __name__ == "__main__":
    sys.exit(main())
