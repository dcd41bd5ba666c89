"""Files people hand us and folders we write: FIFOs never opened, symlinks followed, the OS's refusals as one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vlrouter.core.atomic import atomic_write_bytes
from vlrouter.core.errors import InputError, StorageError
from vlrouter.core.paths import check_regular_file, ensure_dir, looks_like_local_path, storage_error


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):  # returns at once: open() would block forever
        check_regular_file(fifo, what="image")
    assert check_regular_file(tmp_path / "missing") == tmp_path / "missing"  # the caller words "not found"


def test_a_regular_file_comes_back_as_the_path_given_symlinks_not_resolved(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "data.jsonl")
    assert check_regular_file(str(tmp_path / "data.jsonl")) == tmp_path / "data.jsonl"
    assert check_regular_file(tmp_path / "link.jsonl", what="dataset") == tmp_path / "link.jsonl"

def test_a_device_or_a_folder_is_named_for_what_it_is(tmp_path):
    with pytest.raises(InputError, match=r"dataset /dev/null is a device, not a regular file"):
        check_regular_file("/dev/null", what="dataset")
    with pytest.raises(InputError, match=r"is a folder, not a regular file"):
        check_regular_file(tmp_path, what="dataset")


def test_a_symlinked_file_is_saved_through_the_link(tmp_path):
    real = tmp_path / "shared" / "registry.yaml"
    real.parent.mkdir()
    real.write_text("old\n")
    os.chmod(real, 0o640)
    link = tmp_path / "registry.yaml"
    link.symlink_to(real)
    atomic_write_bytes(link, b"new\n")
    assert link.is_symlink() and os.readlink(link) == str(real)  # still a link
    assert real.read_text() == "new\n"  # the file it points to changed
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path / "shared")) == ["registry.yaml"]  # no temp file left


def test_a_full_disk_is_one_located_line_and_the_old_bytes_stay(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StorageError) as e:
        atomic_write_bytes(target, b"new")
    msg = str(e.value)
    assert msg.startswith(str(target)) and "no space left on the device" in msg and "(fix: free disk space" in msg
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_safetensors_style_os_errors_are_storage_errors_too(tmp_path):
    from vlrouter.core.paths import as_os_error

    wrapped = as_os_error(RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })'))
    assert wrapped is not None and wrapped.errno == errno.ENOSPC
    assert "no space left" in str(storage_error(wrapped, tmp_path / "x"))


def test_ensure_dir_names_the_setting_when_a_file_stands_in_the_way(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(StorageError) as e:
        ensure_dir(tmp_path / "cache" / "abc", field="train.cache_dir", where=tmp_path / "registry.yaml")
    msg = str(e.value)
    assert "train.cache_dir" in msg and "is a file" in msg and "(fix: point train.cache_dir at a folder" in msg


@pytest.mark.parametrize("value,local", [("Qwen/Qwen3-VL-8B-Instruct", False), ("gpt2", False),
                                         ("./models/x", True), ("/opt/m", True), ("~/m", True), ("a/b/c", True),
                                         ("models/", True), ("..", True)])
def test_values_that_can_only_be_paths_are_never_hub_ids(value, local):
    assert looks_like_local_path(value) is local


def test_writing_under_a_file_says_a_file_stands_where_a_folder_is_needed(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(NotADirectoryError) as e:
        (tmp_path / "runs" / "router.json").write_text("{}")  # what the OS says when a write goes under a file
    msg = str(storage_error(e.value))
    assert msg.startswith(f"{tmp_path / 'runs' / 'router.json'}: cannot write: a file stands where a folder is needed")
    assert msg.endswith("(fix: move that file away, or point the setting at a folder)")
