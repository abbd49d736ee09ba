"""Reproducible data (issue 12): the software versions a dataset and a bundle record, and the warning when a
local dataset has the id of a bundle's training data but another content hash."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest

from dydiff_env import cli, data
from dydiff_env.bundle import DatasetMismatchWarning, check_dataset_matches, load_bundle
from dydiff_env.bundle_schema import BundleError, validate_config
from dydiff_env.env import shipped_bundle_path

from conftest import TINY_DATASET_ID, TINY_ENV_ID, random_policy

PACKAGES = {"mujoco", "gymnasium", "torch", "numpy", "minari", "python", "dydiff-env"}


def config_of(bundle_dir) -> dict:
    return json.loads((bundle_dir / "config.json").read_text())


def other_version_of(dataset: data.OfflineData, **versions: str) -> data.OfflineData:
    """The same dataset id with another content hash (and, optionally, other recorded versions)."""
    return dataclasses.replace(dataset, content_hash="0123456789abcdef",
                               software_versions={**dataset.software_versions, **versions})


def test_software_versions_names_every_package_and_a_missing_one(monkeypatch):
    versions = data.software_versions()
    assert set(versions) == PACKAGES and all(isinstance(v, str) and v for v in versions.values())
    monkeypatch.setattr(data, "VERSIONED_PACKAGES", ("numpy", "dydiff-env", "no-such-package-dydiff"))
    assert data.software_versions()["no-such-package-dydiff"] == "not installed"


def test_a_written_dataset_records_the_versions_beside_its_other_metadata(tiny_dataset):
    import minari

    assert tiny_dataset.software_versions == data.software_versions()  # conftest writes it with write_minari_dataset
    buffers = data.collect_episodes(TINY_ENV_ID, random_policy(3), 20, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval_env.*", category=UserWarning)  # minari's note
        data.write_minari_dataset("test/hopper/versions-v0", TINY_ENV_ID, buffers, overwrite=True,
                                  metadata={"dydiff_env_generate": {"seed": 3}})
    metadata = minari.load_dataset("test/hopper/versions-v0").storage.metadata
    assert metadata[data.VERSIONS_METADATA_KEY] == data.software_versions()
    assert metadata["dydiff_env_generate"] == {"seed": 3}  # `metadata=` still reaches metadata.json


def test_a_trained_bundle_records_the_versions(tiny_bundle):
    assert config_of(tiny_bundle)["software_versions"] == data.software_versions()


def test_the_schema_accepts_a_bundle_with_and_without_versions(tiny_bundle):
    meta = config_of(tiny_bundle)
    validate_config(meta, "config.json")
    meta.pop("software_versions")
    validate_config(meta, "config.json")
    for bad in ({"numpy": 2}, ["numpy", "2.0"], {f"p{i}": "1" for i in range(101)}):
        with pytest.raises(BundleError, match="software_versions"):
            validate_config({**meta, "software_versions": bad}, "config.json")


def test_a_bundle_without_versions_loads_silently(tmp_path):
    # bundles written before versions were recorded (the shipped hopper bundle until its student was added)
    path = tmp_path / "hopper"
    shutil.copytree(shipped_bundle_path("hopper"), path)
    meta = config_of(path)
    meta.pop("software_versions")
    (path / "config.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_bundle(path)
        load_bundle(shipped_bundle_path("hopper"))


def test_a_changed_dataset_hash_warns_once_with_both_hashes_and_the_fix(tiny_dataset, tiny_bundle_copy):
    bundle = load_bundle(tiny_bundle_copy)
    local = other_version_of(tiny_dataset, numpy="0.0.1")
    with pytest.warns(DatasetMismatchWarning) as record:
        assert check_dataset_matches(bundle, local) is False
    message = str(record[0].message)
    for part in (TINY_DATASET_ID, "0123456789abcdef", tiny_dataset.content_hash, "dydiff-env train all",
                 f"numpy 0.0.1 in the dataset vs {data.software_versions()['numpy']} in the bundle"):
        assert part in message
    assert len(record) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert check_dataset_matches(bundle, local) is False  # still a mismatch, but said once
    assert again == []


def test_the_warning_lists_the_bundle_versions_for_a_dataset_without_any(tiny_dataset, tiny_bundle_copy):
    local = dataclasses.replace(other_version_of(tiny_dataset), software_versions={})
    with pytest.warns(DatasetMismatchWarning, match="versions recorded in the bundle: mujoco "):
        check_dataset_matches(load_bundle(tiny_bundle_copy), local)


def test_a_matching_hash_or_another_dataset_id_is_silent(tiny_dataset, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    unrelated = dataclasses.replace(other_version_of(tiny_dataset), dataset_id="test/hopper/generated-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_dataset_matches(bundle, tiny_dataset) is True
        assert check_dataset_matches(bundle, unrelated) is True


def test_info_prints_the_versions(tiny_bundle, capsys):
    assert cli.main(["info", str(tiny_bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["software_versions"] == data.software_versions()
