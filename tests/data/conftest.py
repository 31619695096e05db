"""Data-test fixtures: a private datasets cache and hub-layout folders of local files."""

from __future__ import annotations

import pytest


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A folder laid out like a hub dataset repo (data/train-00000-of-00001.parquet); `load_dataset`
    given its path runs the real datasets code (builder inference, download manager, parquet reader)
    with a cache under tmp_path. Only the hub download itself is not exercised (no network)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")

    def make(rows: list[dict] | None = None, table: "pa.Table | None" = None) -> str:
        root = tmp_path / "hub-dataset"
        (root / "data").mkdir(parents=True)
        pq.write_table(table if table is not None else pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
        return str(root)

    return make
