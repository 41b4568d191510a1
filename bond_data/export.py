"""`bond export`: a built dataset as a self-contained folder for the Hugging Face ecosystem.

    parquet  part-0.parquet + README.md            datasets.load_dataset(DIR) (the card's `configs`)
    arrow    save_to_disk's files + README.md      datasets.load_from_disk(DIR)

The card is written anew for the folder's format (data files, load snippet) with the dataset's
provenance read from the store, and the license of the build unless `license` overrides it. The
folder is written under a temporary name beside DIR and renamed into place, so DIR holds a whole
export or nothing; an existing non-empty DIR is refused, never replaced.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bond_data import build, card
from bond_data.files import atomic_path
from bond_data.store import Store, StoreError

FORMATS = ("parquet", "arrow")


def export_dataset(store: Store, dataset_id: str, to: str | Path, fmt: str = "parquet",
                   license: str | None = None) -> dict:
    """Write dataset `dataset_id` of the store to the folder `to`; what was written."""
    if fmt not in FORMATS:
        raise StoreError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    rows = store.query("SELECT * FROM datasets WHERE dataset_id = ?", [dataset_id]).to_pylist()
    if not rows:
        known = store.query("SELECT dataset_id FROM datasets ORDER BY round, dataset_id").column(0).to_pylist()
        raise StoreError(f"store {store.root} has no dataset {dataset_id!r}; it has {known or 'none'} "
                         "(`bond status` lists them)")
    record = build.catalog_record(rows[0])
    dest = Path(to).resolve()
    _check_destination(store, dest)
    source = store.root / record["path"]
    license = license or record["card"].get("license", "other")
    with atomic_path(dest, keep_existing=_refuse_if_filled) as tmp:
        tmp.mkdir()
        if fmt == "parquet":
            shutil.copyfile(source, tmp / "part-0.parquet")
            num_bytes = source.stat().st_size
        else:
            num_bytes = _save_to_disk(source, tmp, license)
        summary = store.dataset_summary(source)
        meta = build.card_meta(store, dataset_id, record["round"], record["rm_id"], record["n"], record["weighting"],
                               record["target"], summary)
        card.write_card(tmp, fmt, pq.read_schema(source), summary["candidates"], num_bytes, meta, license)
    return {"dataset_id": dataset_id, "to": str(dest), "format": fmt, "rows": summary["candidates"],
            "license": license}


def _check_destination(store: Store, dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError(f"{dest} exists and is not an empty folder; export to a new folder")
    if dest == store.root or store.root in dest.parents:
        raise StoreError(f"{dest} is inside the store {store.root}; export to a folder outside it")


def _refuse_if_filled(dest: Path) -> bool:
    """Called just before the rename: a folder filled meanwhile is never replaced."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError(f"{dest} was filled while exporting; nothing was replaced")
    return False


def _save_to_disk(source: Path, folder: Path, license: str) -> int:
    """`Dataset.save_to_disk` of the Parquet file (its Arrow cache in a scratch folder beside the
    export, removed after); the bytes of Arrow data written."""
    import datasets

    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".bond-export-cache-") as cache:
        ds = datasets.Dataset.from_parquet(str(source), cache_dir=cache)
        ds.info.license = license
        ds.save_to_disk(str(folder))
        del ds
    return sum(p.stat().st_size for p in folder.glob("data-*.arrow"))
