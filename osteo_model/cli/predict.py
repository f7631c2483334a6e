"""``osteo-predict --site X [--model PATH] [--study ID ...] [--ct PATH --labels PATH ...] [--out DIR] [hydra overrides]``:
the screening report (report.csv, report.json, index.html, one PNG per study) of a site's studies."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from osteo_model.cli._common import run_cli
from osteo_model.config import compose_site
from osteo_model.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="osteo-predict",
        description="Screening report from a trained model: per-level HU, BMD, T-score, WHO category and "
        "P(osteoporosis), the patient by ISCD rules, the L1-HU rule, intervals and out-of-distribution flags, "
        "one PNG per study and an index.html. Research use only. Other arguments are Hydra overrides.",
    )
    parser.add_argument("--site", help="site name (sets site.name; its cache, state and output folders follow)")
    parser.add_argument("--model", help="model file: central checkpoint.pt, federated round-NNNN.npz or a site "
                        "model (default: <site.state_dir>/site_model.pt)")
    parser.add_argument("--study", nargs="+", metavar="ID", help="prepared studies to report (default: all)")
    parser.add_argument("--ct", action="append", default=[], metavar="PATH", help="a new CT (file or DICOM folder)")
    parser.add_argument("--labels", action="append", default=[], metavar="PATH", help="its vertebra label map")
    parser.add_argument("--out", help="output folder (default: predict.out_dir = outputs/predict/<site>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, overrides = parser.parse_known_args(argv)
    if args.study:  # "--study A B key=value": the Hydra overrides that followed the ids are not ids
        overrides += [s for s in args.study if "=" in s]
        args.study = [s for s in args.study if "=" not in s]
    if args.site:
        overrides = [f"site.name={args.site}", *overrides]

    def body() -> None:
        if len(args.ct) != len(args.labels):
            raise ConfigError(None, f"give one --labels per --ct ({len(args.ct)} --ct, {len(args.labels)} --labels)")
        from osteo_model.predict import run_predict  # heavy imports after argument errors

        index = run_predict(compose_site(overrides), args.model, args.study, list(zip(args.ct, args.labels)), args.out,
                            progress=not args.no_progress)
        print(f"osteo-predict: report {index}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
