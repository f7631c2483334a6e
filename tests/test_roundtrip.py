"""Synthetic site -> osteo-prepare -> site cache: the generator's output is what preparation expects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from osteo_model.bmd import to_sbmd
from osteo_model.cache import SiteCache
from osteo_model.config import compose, compose_site
from osteo_model.prepare import prepare_site
from osteofl.simulation.synth import generate


def test_synthetic_site_prepares_with_labels_paired_and_hu_tracking_truth(tmp_path):
    overrides = [f"paths.root={tmp_path}", "synth.sites=[site_b]", "synth.external_site=", "synth.labeled_per_site=8",
                 "synth.unlabeled_per_site=3", "synth.phantom.truncated_fraction=0.2", "synth.n_jobs=2"]
    generate(compose(overrides))
    cfg = compose_site([*overrides, "site.name=site_b", "radiomics.n_jobs=2"])
    assert cfg.site.dxa_manufacturer == "ge_lunar"  # from the site.yaml the generator writes
    summary = prepare_site(cfg, progress=False)
    truth = pd.read_csv(Path(cfg.paths.ground_truth) / "site_b.csv")
    assert summary.quarantined == 0
    assert summary.vertebrae == int((~truth.truncated).sum())  # every whole L1-L4 level, no truncated one

    cache = SiteCache.open(cfg.site.cache_dir)
    table = cache.table.merge(truth, on=["study_id", "level"], suffixes=("", "_truth"), validate="one_to_one")
    expected_labeled = truth[truth.paired & ~truth.dxa_excluded & ~truth.truncated]
    labeled = table[table.labeled.astype(bool)]
    assert set(zip(labeled.study_id, labeled.level)) == set(zip(expected_labeled.study_id, expected_labeled.level))
    assert (labeled.dxa_manufacturer == "ge_lunar").all()
    np.testing.assert_allclose(labeled.bmd, labeled.dxa_bmd, atol=1e-3)  # the DXA value written is the one read
    np.testing.assert_allclose(labeled.sbmd, to_sbmd(labeled.dxa_bmd.to_numpy(), "ge_lunar"), atol=1e-3)  # Hui 1997
    # what DXA reads (truth x degenerative/aortic gain, plus device and per-patient error) survives standardisation
    assert np.corrcoef(labeled.sbmd, labeled.true_sbmd * labeled.dxa_gain)[0, 1] > 0.8
    # trabecular HU tracks bone density, but only as loosely as in clinical CT (contrast phase, marrow fat,
    # scanner calibration: the default scenario targets r 0.5-0.75 against DXA; ~40 vertebrae here)
    assert np.corrcoef(table.hu_mean, table.true_sbmd)[0, 1] > 0.3
    assert np.isfinite(cache.features).all()
