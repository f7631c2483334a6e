"""The consolidated cache: round trip, memory mapping, and refusal of broken caches."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from osteo_model.cache import INDEX_COLUMNS, SiteCache, write_site_cache
from osteo_model.errors import InputError


def _table(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row = {c: np.nan for c in INDEX_COLUMNS}
        row.update(study_id=f"s{i // 4}", patient_id=f"p{i // 4}", level=f"L{i % 4 + 1}", level_idx=i % 4,
                   labeled=i % 2 == 0, sex="female" if i % 3 else "", hu_mean=100.0 + i, category=-1)
        rows.append(row)
    return pd.DataFrame(rows)


def _write(path, n=8, f=5):
    rng = np.random.default_rng(0)
    crops = rng.integers(-1000, 1500, size=(n, 8, 8, 8)).astype(np.int16)
    masks = (crops > 0).astype(np.uint8)
    feats = rng.normal(size=(n, f)).astype(np.float32)
    write_site_cache(path, _table(n), crops, masks, feats, [f"f{i}" for i in range(f)], {"site": "h1"})
    return crops, feats


def test_roundtrip_is_memory_mapped(tmp_path) -> None:
    crops, feats = _write(tmp_path / "c")
    cache = SiteCache.open(tmp_path / "c")
    assert len(cache) == 8 and cache.site == "h1"
    assert isinstance(cache.crops, np.memmap)
    np.testing.assert_array_equal(cache.crops, crops)
    np.testing.assert_allclose(cache.features, feats)
    assert cache.manifest["n_labeled"] == 4
    assert cache.table["study_id"].tolist()[:4] == ["s0"] * 4
    assert cache.table["sex"].tolist()[0] == ""
    assert not list(tmp_path.glob(".c.tmp-*")), "temporary folder left behind"


def test_a_killed_consolidations_temporary_folder_is_removed_by_the_next(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".c.tmp-{child.pid}"
    stale.mkdir()
    (stale / "crops.npy").write_bytes(b"half")
    _write(tmp_path / "c")
    assert not stale.exists()


def test_missing_cache_names_the_folder(tmp_path) -> None:
    with pytest.raises(InputError, match="osteo-prepare"):
        SiteCache.open(tmp_path / "nothing")


def test_inconsistent_cache_is_refused(tmp_path) -> None:
    _write(tmp_path / "c")
    np.save(tmp_path / "c" / "features.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(InputError, match="features.npy"):
        SiteCache.open(tmp_path / "c")


def test_old_format_is_refused(tmp_path) -> None:
    _write(tmp_path / "c")
    manifest = tmp_path / "c" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 0}))
    with pytest.raises(InputError, match="re-run osteo-prepare"):
        SiteCache.open(tmp_path / "c")


def test_writer_rejects_mismatched_arrays(tmp_path) -> None:
    with pytest.raises(ValueError):
        write_site_cache(tmp_path / "c", _table(4), np.zeros((3, 2, 2, 2)), np.zeros((4, 2, 2, 2)),
                         np.zeros((4, 1)), ["f"], {})
