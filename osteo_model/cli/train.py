"""``osteo-train [hydra overrides]``: central training on pooled site caches (SSL, then multi-task).

The sites are ``train.sites`` (caches under ``paths.cache_root``); the checkpoint goes to
``train.out_dir/checkpoint.pt`` after every epoch; ``train.resume=true`` carries on from it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from osteo_model.cli._common import run_config_cli


def train(cfg: DictConfig) -> None:
    from osteo_model.central import load_sites, train_central

    datas = load_sites(cfg, cfg.train.sites)
    for site, d in datas.items():
        print(f"{site}: {len(d.splits['unlabeled'])} crops for SSL, {len(d.splits['train'])} labeled for training "
              f"({d.manufacturer})")
    train_central(cfg, datas, Path(cfg.train.out_dir))
    print(f"checkpoint: {Path(cfg.train.out_dir) / 'checkpoint.pt'}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_cli(
        "osteo-train",
        "Train the model centrally on pooled site caches. Arguments are Hydra overrides, e.g. "
        "train.sites=[site_a,site_b] train.task_epochs=4 model=resnet train.resume=true.",
        argv,
        train,
    )


if __name__ == "__main__":
    sys.exit(main())
