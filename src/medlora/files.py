"""Files that are whole or absent: atomic writes and the SHA-256 hashes the audit trail records.

A result file (cleaned data, generations, a screen report) or folder (an adapter, a checkpoint,
a cached model) is written beside its target and renamed onto it, so a crash or a full disk
leaves the old file or none, never half of a new one that looks like a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from medlora.config import MedloraError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_parts(parts: Iterable[bytes]) -> str:
    """The SHA-256 of the parts joined, without joining them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_parts(iter(lambda: f.read(1 << 20), b""))


def folder_hashes(folder: Path) -> dict[str, str]:
    """{file name: SHA-256} of the files directly in `folder`."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def write_files(writes: dict[Path, bytes | str]) -> None:
    """Stage every file first, then move them all into place: one unwritable target leaves nothing written."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in writes.items():
            staged.append((_stage(Path(path), data.encode("utf-8") if isinstance(data, str) else data), Path(path)))
        for temp, path in staged:
            os.replace(temp, path)
    finally:
        for temp, _ in staged:
            if os.path.exists(temp):
                os.unlink(temp)


def write_file(path: Path, data: bytes | str) -> None:
    write_files({path: data})


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, all lines or none; the folder is made if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_file(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def save_folder(target: Path, save: Callable[[Path], None], cache_entry: str | None = None) -> Path:
    """Let `save` fill a temporary sibling folder, then rename it to `target`.

    `cache_entry`: the file that marks `target` complete when it is a cache entry. Parallel jobs
    (a sweep's, the test workers) may fill the same entry at once; the first one's is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        save(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # renaming onto a folder that is not empty fails: another job got there first
        if isinstance(err, OSError) and cache_entry and (target / cache_entry).is_file():
            return target
        raise
    return target


def _stage(path: Path, data: bytes) -> str:
    """Write `data` to a temporary file in `path`'s folder (same filesystem, so os.replace is atomic)."""
    if path.is_dir():
        raise MedloraError(f"cannot write {path}: it is a folder. Give a file path.")
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise MedloraError(f"cannot write {path}: {err.strerror}. Choose an existing folder you can write to.") from err
    try:
        os.chmod(temp, _file_mode(path))  # mkstemp makes 0600 files; keep the mode a plain write would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them the file
    except OSError as err:
        os.unlink(temp)
        raise MedloraError(f"cannot write {path}: {err.strerror}. Free some space or choose another folder.") from err
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
