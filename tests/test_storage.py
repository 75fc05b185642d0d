"""The storage layer: local paths, file:// URIs and s3:// (moto server on loopback) through one API."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from drivedit import storage


def test_local_atomic_write_read_list(tmp_path):
    root = str(tmp_path / "out")
    storage.write_bytes_atomic(storage.join(root, "a", "x.bin"), b"\x00\x01")
    storage.write_text_atomic(storage.join(root, "b.json"), '{"k": 1}')
    storage.write_text_atomic(storage.join(root, "b.json"), '{"k": 2}')  # replace in place
    assert storage.read_bytes(storage.join(root, "a/x.bin")) == b"\x00\x01"
    assert storage.read_text(storage.join(root, "b.json")) == '{"k": 2}'
    # no temporary file is left behind, and listing skips any that a crashed writer left
    (tmp_path / "out" / ".c.json.tmp-deadbeef").write_text("partial")
    assert sorted(os.listdir(root)) == [".c.json.tmp-deadbeef", "a", "b.json"]
    assert storage.list_files(root) == [storage.join(root, "a/x.bin"), storage.join(root, "b.json")]
    assert storage.list_files(root, suffixes=[".JSON"]) == [storage.join(root, "b.json")]
    assert storage.exists(root) and storage.is_dir(root) and not storage.exists(storage.join(root, "nope"))
    assert not storage.is_remote(root)
    fs, path = storage.filesystem_for("file://" + root)
    assert isinstance(fs, pafs.LocalFileSystem) and path == root
    assert storage.list_files("file://" + root, suffixes=[".bin"]) == ["file://" + root + "/a/x.bin"]


def test_local_failed_write_leaves_old_file(tmp_path, monkeypatch):
    target = str(tmp_path / "f.txt")
    storage.write_text_atomic(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text_atomic(target, "new")
    assert open(target).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_local_file_and_dir_replace_whole_or_not_at_all(tmp_path):
    f = tmp_path / "sub" / "w.bin"
    with storage.atomic_local_file(f) as tmp:
        assert tmp.parent == f.parent and storage.TMP_MARKER in tmp.name
        tmp.write_bytes(b"one")
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.atomic_local_file(f) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert f.read_bytes() == b"one" and os.listdir(f.parent) == ["w.bin"]

    d = tmp_path / "bundle"
    with storage.atomic_local_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    with storage.atomic_local_dir(d) as tmp:  # a second write swaps the whole directory
        (tmp / "a.txt").write_text("2")
    assert sorted(os.listdir(d)) == ["a.txt"] and (d / "a.txt").read_text() == "2"
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.atomic_local_dir(d) as tmp:
            (tmp / "a.txt").write_text("3")
            raise RuntimeError("writer failed")
    assert (d / "a.txt").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["bundle", "sub"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.json").write_text("x")
    storage.publish_dir(src, str(d))
    assert os.listdir(d) == ["x.json"]


def test_sha256_of_files_and_directories(tmp_path):
    import hashlib

    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "b").write_bytes(b"bb")
    (tmp_path / "d" / "a").write_bytes(b"a")
    assert storage.sha256_file(tmp_path / "d" / "a") == hashlib.sha256(b"a").hexdigest()
    assert storage.sha256_path(tmp_path / "d" / "a") == hashlib.sha256(b"a").hexdigest()
    # a directory: each file's relative name then its bytes, sorted by path
    assert storage.sha256_path(tmp_path / "d") == hashlib.sha256(b"a" + b"a" + b"s/b" + b"bb").hexdigest()


def test_errors_name_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.bin"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(IsADirectoryError):
        storage.read_bytes(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        storage.filesystem_for("gs://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.filesystem_for("s3://")
    assert storage.join("s3://b/p/", "/x", "", "y.json") == "s3://b/p/x/y.json"


def test_s3_roundtrip_through_endpoint(s3_bucket, tmp_path, s3_server):
    base = f"s3://{s3_bucket}/data"
    fs, path = storage.filesystem_for(base)
    assert isinstance(fs, pafs.PyFileSystem) and path == f"{s3_bucket}/data"
    assert storage.is_remote(base) and storage.s3_endpoint() == s3_server
    storage.write_bytes_atomic(storage.join(base, "x/1.bin"), b"one")
    storage.write_text_atomic(storage.join(base, "2.txt"), "two")
    assert storage.exists(storage.join(base, "2.txt")) and not storage.exists(storage.join(base, "3.txt"))
    assert storage.read_bytes(storage.join(base, "x/1.bin")) == b"one"
    assert storage.list_files(base) == [f"{base}/2.txt", f"{base}/x/1.bin"]
    assert storage.list_files(base, suffixes=[".bin"]) == [f"{base}/x/1.bin"]
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/data/none"):
        storage.read_bytes(storage.join(base, "none"))
    # a directory goes up and comes back byte for byte
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    (src / "c.json").write_text("{}")
    written = storage.upload_dir(str(src), storage.join(base, "dir"))
    assert written == [f"{base}/dir/c.json", f"{base}/dir/sub/w.bin"]
    got = storage.download_dir(storage.join(base, "dir"), str(tmp_path / "back"))
    assert sorted(os.path.relpath(p, tmp_path / "back") for p in got) == ["c.json", os.path.join("sub", "w.bin")]
    assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == bytes(range(256)) * 10
    storage.delete(storage.join(base, "2.txt"))
    assert not storage.exists(storage.join(base, "2.txt"))


def test_s3_credentials_never_in_errors(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    storage._S3_CACHE.clear()
    with pytest.raises(Exception) as err:
        storage.read_bytes("s3://no-such-bucket-xyz/key")
    assert "sekrit-value-123" not in str(err.value)
    storage._S3_CACHE.clear()


def test_absolute_refs_for_workers_in_other_directories(tmp_path, monkeypatch):
    from drivedit.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/shards") == str(tmp_path / "runs" / "shards")
    for ref in ("s3://bucket/shards", "file:///data/x", "models:/drivedit-demo/1", "builtin:tiny-dit"):
        assert storage.absolute(ref) == ref
    # a hub id is not a path unless such a folder exists here
    assert storage.absolute("stabilityai/sd-vae-ft-ema", only_if_exists=True) == "stabilityai/sd-vae-ft-ema"
    (tmp_path / "stabilityai" / "sd-vae-ft-ema").mkdir(parents=True)
    assert storage.absolute("stabilityai/sd-vae-ft-ema", only_if_exists=True) == str(tmp_path / "stabilityai" / "sd-vae-ft-ema")
    assert absolute_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    for uri in ("sqlite:////abs/mlflow.db", "http://mlflow:5000", None):
        assert absolute_tracking_uri(uri) == uri


@pytest.mark.parametrize("text, secrets", [
    ("http://alice:hunter2@mlflow:5000", ["hunter2"]),
    ('["s3://bucket/a?X-Amz-Signature=sig123&X-Amz-Date=1", "http://bob:pw/456@h/x"]', ["sig123", "pw/456"]),
    ("https://h/a?sig=sas789&sv=2020&token=tok000;api_key=k111", ["sas789", "tok000", "k111"]),
    ("postgresql://u:p%40ss@db/x in a traceback line", ["p%40ss"]),
])
def test_redact_masks_every_credential_and_keeps_the_rest(text, secrets):
    out = storage.redact(text)
    assert not any(s in out for s in secrets), out
    assert out.count("***") == len(secrets)
    # what is not a credential stays: hosts, users, other query keys, paths
    for kept in ("mlflow:5000", "alice", "X-Amz-Date=1", "sv=2020", "db/x"):
        if kept in text:
            assert kept in out


def test_no_credential_is_written_or_raised(tmp_path):
    storage.write_text_atomic(str(tmp_path / "a.json"), '{"tracking_uri": "http://alice:hunter2@mlflow:5000"}')
    assert (tmp_path / "a.json").read_text() == '{"tracking_uri": "http://alice:***@mlflow:5000"}'
    # credentials in an S3 URI are refused (they belong in the environment), and not echoed back
    with pytest.raises(ValueError) as err:
        storage.read_bytes("s3://AKIAEXAMPLE:wJalr/XUtnFEMI+K7MDENG@bucket/key")
    assert "wJalr" not in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert "s3://AKIAEXAMPLE:***@bucket/key" in str(err.value)
