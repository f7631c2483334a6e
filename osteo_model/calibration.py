"""Site-local DXA calibration: standardised BMD -> the site's device BMD -> T-score -> WHO category.

The head starts as the inverse Hui 1997 equation of the site's DXA manufacturer (exact for the
population the equations were fitted on) and learns a linear residual that starts at zero: Hui's
equations carry a 4-7 % standard error and per-device offsets remain after standardisation (Fan 2010),
which is what a site's own DXA labels can correct. The reported category always comes from the T-score
of the calibrated device BMD, so category and T-score never disagree.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from osteo_model import bmd as bmdlib
from osteo_model.constants import HUI_1997, HUI_SBMD_CONSTANT
from osteo_model.errors import ConfigError


def check_manufacturer(manufacturer: str) -> str:
    """Normalised HUI_1997 key, or ConfigError naming the unknown spelling."""
    key = bmdlib.normalise_manufacturer(manufacturer)
    if key is None or key not in HUI_1997:
        raise ConfigError(None, f"unknown DXA manufacturer {manufacturer!r}; known: {sorted(HUI_1997)}")
    return key


class CalibrationHead(nn.Module):
    """sBMD (g/cm^2) -> device BMD (g/cm^2): inverse Hui 1997 plus a learned residual (zero at start)."""

    def __init__(self, manufacturer: str, learned: bool = True) -> None:
        super().__init__()
        self.manufacturer = check_manufacturer(manufacturer)
        self.residual: nn.Linear | None = None
        if learned:
            self.residual = nn.Linear(1, 1)
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    def forward(self, sbmd: torch.Tensor) -> torch.Tensor:
        return bmdlib.from_sbmd(sbmd, self.manufacturer) + self.residual_shift(sbmd)

    def residual_shift(self, sbmd: torch.Tensor) -> torch.Tensor:
        """The learned residual at ``sbmd`` (g/cm^2 of device BMD; zero where none is learned)."""
        if self.residual is None:
            return torch.zeros_like(sbmd)
        return self.residual((sbmd - HUI_SBMD_CONSTANT).unsqueeze(-1)).squeeze(-1)


def t_and_category(device_bmd: np.ndarray, manufacturer: str, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each vertebra's T-score on its level's young-adult reference on the device (bmd.level_t_score: the
    labels' reference) and the WHO category it implies. ``rows``: the cache-table rows along ``device_bmd``
    (their level_idx, and sex where the table has it)."""
    sexes = rows["sex"].fillna("").astype(str) if "sex" in rows else [""] * len(rows)
    t = bmdlib.level_t_score(device_bmd, rows["level_idx"].to_numpy(), manufacturer, sexes)
    return t, np.asarray(bmdlib.category_from_t(t))
