"""Storage locations: a local folder used in place, or a URI through fsspec (file:// stands in for s3:// here)."""

from __future__ import annotations

import json

import pytest

from steps import storage


def write_folder(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_folder_published_to_a_uri_comes_back_whole_in_another_scratch(tmp_path):
    location = f"file://{tmp_path / 'store'}/run/checkpoints/step_000002"
    with storage.scratch() as writer:
        local = write_folder(storage.workspace(location, writer), {"model.safetensors": "w" * 1000, "sub/a.json": "{}"})
        storage.publish(local, location)
    assert not writer.exists()  # the writing step's scratch is gone
    assert storage.is_published(location)
    with storage.scratch() as reader:
        copy = storage.local_copy(location, reader)
        assert (copy / "model.safetensors").read_text() == "w" * 1000 and (copy / "sub" / "a.json").read_text() == "{}"
        assert copy.name == "step_000002" and reader in copy.parents
        one_file = storage.local_copy(storage.join(location, "model.safetensors"), reader)
        assert one_file.read_text() == "w" * 1000
    assert storage.subfolders(f"file://{tmp_path / 'store'}/run/checkpoints") == ["step_000002"]
    assert storage.subfolders(f"file://{tmp_path / 'store'}/nowhere") == []


def test_an_unfinished_or_damaged_upload_is_never_trusted(tmp_path):
    location = f"file://{tmp_path / 'store'}/data"
    folder = tmp_path / "store" / "data"
    write_folder(folder, {"train.parquet": "rows"})  # files there, but no marker: the upload did not finish
    assert not storage.is_published(location)
    with storage.scratch() as scratch, pytest.raises(FileNotFoundError, match="not in a complete published folder"):
        storage.local_copy(location, scratch)
    (folder / storage.MARKER).write_text(json.dumps({"files": {"train.parquet": 999}}))  # sizes disagree
    with storage.scratch() as scratch, pytest.raises(OSError, match="train.parquet has 4 bytes.*says 999"):
        storage.local_copy(location, scratch)


def test_republishing_replaces_the_folder_and_its_marker(tmp_path):
    location = f"file://{tmp_path / 'store'}/eval"
    with storage.scratch() as scratch:
        storage.publish(write_folder(scratch / "one", {"a.txt": "first"}), location)
        storage.publish(write_folder(scratch / "two", {"a.txt": "second!"}), location)
        assert storage.local_copy(location, scratch).joinpath("a.txt").read_text() == "second!"


def test_local_locations_are_used_in_place(tmp_path):
    location = str(tmp_path / "outputs" / "run")
    with storage.scratch() as scratch:
        assert storage.workspace(location, scratch) == tmp_path / "outputs" / "run"
        assert storage.local_copy(location, scratch) == tmp_path / "outputs" / "run"
        storage.publish(tmp_path / "outputs" / "run", location)  # nothing to upload
        with pytest.raises(ValueError, match="written in place"):
            storage.publish(tmp_path / "elsewhere", location)
    assert storage.join(location, "eval", "after.json") == str(tmp_path / "outputs" / "run" / "eval" / "after.json")
    assert storage.join("s3://bucket/pcsd/", "17", "data") == "s3://bucket/pcsd/17/data"


@pytest.mark.parametrize("location", [str("relative/folder"), "file:///tmp/x"])
def test_small_files_round_trip_whole(tmp_path, location, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if location.startswith("file://"):
        location = f"file://{tmp_path}/x"
    target = storage.join(location, "eval", "after.json")
    storage.write_text(target, '{"a": 1}')
    assert storage.read_text(target) == '{"a": 1}'
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_uri_whose_filesystem_is_missing_is_refused_with_the_package_to_install():
    with pytest.raises(ValueError, match=r"train.output_dir \('nosuchfs://b/x'\).*fsspec cannot open nosuchfs://"):
        storage.check_location("nosuchfs://b/x")
    storage.check_location("file:///tmp/x")
    storage.check_location("outputs")


def test_the_plan_refuses_an_s3_output_dir_without_s3fs_before_any_work(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here")
    from steps.plan import plan_run

    with pytest.raises(ValueError, match=r"train.output_dir \('s3://bucket/pcsd'\).*s3fs for s3://"):
        plan_run({"train": {"output_dir": "s3://bucket/pcsd"}}, flow_run_id="1", env={})
    plan = plan_run({"train": {"output_dir": f"file://{tmp_path}/store"}}, flow_run_id="7", env={})
    assert plan.output_root == f"file://{tmp_path}/store/7"
    assert plan.branches[0].config.train.output_dir == f"file://{tmp_path}/store/7/base"
