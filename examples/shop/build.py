"""Build the shop into a reproducible artifact: dist/shop-<version>.tar.gz.

The tarball holds the `shop` package, its tests, run_tests.py and a
BUILD_INFO.json (name, version, a content hash over every packed file). File
order, timestamps and owners are fixed, so the same sources always give the
same bytes and the same sha256. dist/build.json records the artifact's path
and sha256 for the deploy step. Prints that record as JSON; an error exits
non-zero with a traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKED = ("shop", "tests")
EXTRA_FILES = ("run_tests.py",)


def read_version() -> str:
    """The version from shop/__init__.py, read as text so nothing is imported."""
    text = (ROOT / "shop" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if found is None:
        raise SystemExit("build failed: no __version__ in shop/__init__.py")
    return found.group(1)


def source_files() -> list[Path]:
    files = [p for d in PACKED for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / name for name in EXTRA_FILES]
    return sorted(files, key=lambda p: p.relative_to(ROOT).as_posix())


def content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the archive depends on the file contents and nothing else.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build() -> dict[str, str]:
    version = read_version()
    files = source_files()
    info = {"name": "shop", "version": version, "content_sha256": content_hash(files)}
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    artifact = dist / f"shop-{version}.tar.gz"
    with (
        artifact.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for path in files:
            add_bytes(tar, path.relative_to(ROOT).as_posix(), path.read_bytes())
        add_bytes(tar, "BUILD_INFO.json", json.dumps(info, indent=2).encode() + b"\n")
    record = {
        "artifact": artifact.relative_to(ROOT).as_posix(),
        "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
        "version": version,
        "content_sha256": info["content_sha256"],
    }
    (dist / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    print(json.dumps(build()))
