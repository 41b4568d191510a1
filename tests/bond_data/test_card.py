"""The dataset card's pure parts: the Hub's size buckets, and the license key's check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bond_data import card
from bond_data.config import BuildConfig, ConfigError

UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def bounds(label: str) -> tuple[float, float]:
    """[low, high) of a size bucket, read from its label ("1K<n<10K", "n<1K", "n>1T")."""
    def number(text: str) -> int:
        return int(text[:-1]) * UNITS[text[-1]]

    if label.startswith("n<"):
        return 0, number(label[2:])
    if label.startswith("n>"):
        return number(label[2:]), float("inf")
    low, high = label.split("<n<")
    return number(low), number(high)


def test_size_categories_are_the_datasets_librarys_own():
    import datasets

    known = json.loads((Path(datasets.__file__).parent / "utils" / "resources" / "size_categories.json").read_text())
    assert card.SIZE_CATEGORIES == [c for c in known if c != "unknown"]


@pytest.mark.parametrize("num_rows", [0, 1, 999, 1000, 1001, 9999, 10**4, 123_456, 10**6 - 1, 10**6, 10**9 + 7,
                                      10**12 - 1, 10**12, 10**15])
def test_size_category_is_the_bucket_holding_the_count(num_rows):
    holding = [c for c in card.SIZE_CATEGORIES if bounds(c)[0] <= num_rows < bounds(c)[1]]
    assert [card.size_category(num_rows)] == holding


@pytest.mark.parametrize("value", ["Apache 2.0", "", "-mit", "MIT", "a b", "x\ny"])
def test_a_bad_license_is_refused(value):
    with pytest.raises(ConfigError, match="license"):
        BuildConfig.validate_as({"license": value}, "build.yaml")


def test_licenses_the_hub_uses_pass():
    for value in ["other", "apache-2.0", "cc-by-nc-sa-4.0", "openrail++", "llama3.1"]:
        assert BuildConfig.validate_as({"license": value}, "build.yaml").license == value
