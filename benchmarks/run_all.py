"""Run every ``benchmarks/bench_*.py`` and print one table of its measurements."""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(names: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    modules = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    rows: list[tuple[str, str, float, str]] = []
    for name in modules:
        if names and name not in names:
            continue
        start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        for measurement, value, unit in importlib.import_module(f"benchmarks.{name}").run():
            rows.append((name, measurement, value, unit))
        print(f"  {name} done in {time.perf_counter() - start:.1f} s", flush=True)
    width = max((len(r[1]) for r in rows), default=10)
    print(f"\n{'benchmark':<18} {'measurement':<{width}} {'value':>12}  unit")
    for bench, measurement, value, unit in rows:
        print(f"{bench:<18} {measurement:<{width}} {value:>12.3f}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
