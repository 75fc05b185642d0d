"""One place that turns a URI into a filesystem, plus the few file operations the jobs need.

Local paths and `file://` URIs map to pyarrow's LocalFileSystem; `s3://bucket/key` maps to s3fs
wrapped as a pyarrow filesystem, so Ray Data, pyarrow.parquet and our own reads all take the same
path to a bucket. The S3 endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, a
moto server, a private gateway) and credentials from the usual AWS environment or config chain;
neither is ever logged or put in an error message.

Writes are atomic: a local file is written under a hidden temporary name in the same directory
and renamed; an S3 object becomes visible only when its (single or multipart) upload completes.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3",)
TMP_MARKER = ".tmp-"

# ----------------------------------------------------------------------------- secrets

# a name (config key, query-string key) whose value is a secret
SECRET_NAME = re.compile(r"(passw|secret|token|credential|signature|api[_-]?key|access[_-]?key|private[_-]?key|auth)",
                         re.I)
_SECRET_QUERY_NAMES = {"sig", "key", "code", "pw", "pwd"}  # short names that are secrets in query strings
# scheme://user:password@ anywhere in a text (a URI alone, JSON, a list, a traceback line); an AWS secret key
# may hold "/", so the password runs to the "@" (over-redacting a path with ":" and "@" is the safe error)
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@\"'\[\]]*):(?P<secret>[^\s@\"']*)@")
# ?name=value / &name=value / ;name=value
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&#\s\"'?;]+)=)(?P<value>[^&#\s\"';]*)")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with every credential it may carry replaced by ***: the password of `scheme://user:password@host`
    and the values of secret-named query-string parameters (`?token=`, `&X-Amz-Signature=`, `&sig=` ...).

    The one redaction of drivedit: MLflow params and tags, the text files the jobs write, the summaries they
    print and the errors they raise pass through it, so a credential in a URI never lands on disk or in a log."""
    text = str(text)
    text = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@" if m["secret"] else m[0], text)

    def query(m: re.Match) -> str:
        name = m["name"]
        secret = SECRET_NAME.search(name) or name.lower() in _SECRET_QUERY_NAMES
        return f"{m['head']}{REDACTED}" if secret and m["value"] else m[0]

    return _QUERY_PARAM.sub(query, text)



def _scheme(uri: str) -> str:
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep else ""


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://), False for local paths and file:// URIs."""
    return _scheme(uri) in REMOTE_SCHEMES


def _local_path(uri: str) -> str:
    uri = str(uri)
    if _scheme(uri) == "file":
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().absolute())


NON_PATH_PREFIXES = ("models:/", "builtin:")  # registry versions and shipped models: names, not paths


def absolute(ref: str, only_if_exists: bool = False) -> str:
    """A relative local path made absolute against this process's working directory; URIs (s3://,
    file://, models:/, builtin:) unchanged. With `only_if_exists`, a name that is no local path (a hub
    id such as stabilityai/sd-vae-ft-ema) is left alone too.

    Jobs call this on the driver before shipping a config to Ray workers, whose working directory is
    not the driver's (Ray Train runs each worker in its run directory; Serve replicas run elsewhere).
    """
    ref = str(ref)
    if "://" in ref or ref.startswith(NON_PATH_PREFIXES) or (only_if_exists and not Path(ref).exists()):
        return ref
    return _local_path(ref)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (the S3-specific variable wins), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_S3_CACHE: dict[tuple, object] = {}


def _s3fs():
    """One s3fs client per process and S3 environment (endpoint, region, credentials source)."""
    import s3fs

    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # the key id (not the secret) tells credential sets apart; it never leaves this dict
    key = (endpoint, region, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if key not in _S3_CACHE:
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if region:
            client_kwargs["region_name"] = region
        # No listings cache: a rerun must see the shards another process just wrote.
        _S3_CACHE[key] = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False,
                                           skip_instance_cache=True)
    return _S3_CACHE[key]


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, file:// or s3:// URI."""
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), _local_path(uri)
    if scheme == "s3":
        path = str(uri)[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"{uri!r} names no bucket; write s3://BUCKET/prefix")
        if _USERINFO.match(str(uri)) or "@" in path.split("/", 1)[0]:
            # s3://KEY:SECRET@bucket: botocore would echo it back in a bucket-name error
            raise ValueError(f"{redact(uri)} carries credentials in the URI; remove them (s3://BUCKET/prefix) and give "
                             f"them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
        return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs())), path
    raise ValueError(f"unsupported URI scheme {scheme!r} in {redact(repr(uri))}; use a local path, file:// or s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', keeping its scheme."""
    out = str(uri)
    for part in parts:
        part = str(part)
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def _uri_for(base_uri: str, base_path: str, path: str) -> str:
    """Map a filesystem path found under `base_path` back to the URI form of `base_uri`."""
    rel = os.path.relpath(path, base_path) if not is_remote(base_uri) else path[len(base_path):].lstrip("/")
    return base_uri if rel in ("", ".") else join(base_uri, rel.replace(os.sep, "/"))


_VERBS = {"exists": "look up", "is_dir": "look up", "read_bytes": "read", "write_bytes_atomic": "write",
          "delete": "delete", "list_files": "list", "download_dir": "download"}
_CLIENT_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "fsspec")


def _object_store_errors(op):
    """Errors of the S3 client libraries (unreachable endpoint, malformed bucket name, refused credentials) become
    OSError naming the URI (redacted) and what to check, so callers and preflights need to know only OSError."""

    @functools.wraps(op)
    def wrapped(uri, *args, **kwargs):
        try:
            return op(uri, *args, **kwargs)
        except (OSError, ValueError):
            raise
        except Exception as e:
            if not type(e).__module__.startswith(_CLIENT_LIBRARIES):
                raise
            detail = " ".join(redact(str(e)).split())
            raise OSError(f"cannot {_VERBS.get(op.__name__, op.__name__)} {redact(uri)} ({type(e).__name__}: {detail}); "
                          f"check the bucket name, the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and the "
                          f"credentials") from None

    return wrapped


@_object_store_errors
def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_object_store_errors
def is_dir(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_object_store_errors
def read_bytes(uri: str) -> bytes:
    """The whole object; FileNotFoundError (naming the URI) when there is none."""
    if is_remote(uri):
        # one GET; going through pyarrow's stream would add a HEAD per object
        path = filesystem_for(uri)[1]
        try:
            return _s3fs().cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {uri}") from None
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file: {uri}")
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(f"{uri} is a directory, not a file")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@_object_store_errors
def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers see either the old object or the complete new one, never a part."""
    fs, path = filesystem_for(uri)
    if is_remote(uri):
        # an S3 object appears only when its upload completes: the PUT itself is the commit
        _s3fs().pipe_file(path, bytes(data))
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{TMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(uri: str, text: str) -> None:
    """A text file (JSON, YAML, a marker) written atomically, credentials redacted: no job needs a password
    back from its own files (credentials come from the environment), so none is ever written."""
    write_bytes_atomic(uri, redact(text).encode("utf-8"))


@contextmanager
def atomic_local_file(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside local file `path` for a writer that wants a path (torch.save,
    safetensors, savefig); when the block ends without error it is renamed onto `path`, otherwise
    removed, so readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_local_dir(path: str | Path) -> Iterator[Path]:
    """A hidden temporary directory beside local directory `path` to fill; when the block ends without
    error it takes `path`'s place whole (an existing directory is swapped out, never half-overwritten),
    otherwise it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TMP_MARKER}"))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to `uri`: a local target is swapped in whole; on S3 each object lands
    when its upload completes, in sorted order (so a manifest named to sort last lands last)."""
    if is_remote(uri):
        upload_dir(str(local_dir), uri)
        return
    with atomic_local_dir(filesystem_for(uri)[1]) as tmp:
        shutil.copytree(local_dir, tmp, dirs_exist_ok=True)


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of one local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a local file (its bytes, as `sha256_file`), or of a directory's files: each file's
    relative name then its bytes, in sorted order. Bundles record their base model's digest this way."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@_object_store_errors
def delete(uri: str) -> None:
    """Remove one file; a missing file is not an error."""
    fs, path = filesystem_for(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def makedirs(uri: str) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    if not is_remote(uri):
        os.makedirs(_local_path(uri), exist_ok=True)


@_object_store_errors
def list_files(uri: str, suffixes: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Every file under `uri` (recursively), as URIs in the same form, sorted. Hidden temporary files
    of unfinished atomic writes are left out. `suffixes` filters by name ending (case-insensitive)."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File or TMP_MARKER in fi.base_name:
            continue
        if wanted and not fi.base_name.lower().endswith(wanted):
            continue
        out.append(uri if info.type == pafs.FileType.File else _uri_for(uri, path, fi.path))
    return sorted(out)


def upload_dir(local_dir: str, uri: str) -> list[str]:
    """Copy every file under a local directory to `uri` (keeping relative paths). Returns the URIs written."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory to upload: {local_dir}")
    written = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            dest = join(uri, p.relative_to(root).as_posix())
            write_bytes_atomic(dest, p.read_bytes())
            written.append(dest)
    return written


@_object_store_errors
def download_dir(uri: str, local_dir: str) -> list[str]:
    """Copy every file under `uri` into a local directory (keeping relative paths). Returns local paths."""
    fs, base = filesystem_for(uri)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing to download at {uri}")
    written = []
    for src in list_files(uri):
        _, path = filesystem_for(src)
        rel = os.path.relpath(path, base) if not is_remote(uri) else path[len(base):].lstrip("/")
        dest = Path(local_dir) / rel
        write_bytes_atomic(str(dest), read_bytes(src))
        written.append(str(dest))
    return written
