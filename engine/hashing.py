"""sha256 of model and LoRA files, remembered by (path, size, mtime) so big files are hashed once."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileHasher:
    """Hashes files, caching results in a JSON file; a changed size or mtime means hash again."""

    def __init__(self, cache_file: Path | None) -> None:
        self._cache_file = cache_file
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, str | int | float]] = {}
        if cache_file is not None and cache_file.is_file():
            try:
                self._cache = json.loads(cache_file.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable hash cache %s: %s", cache_file, exc)

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        key = str(path)
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit["size"] == stat.st_size and hit["mtime"] == stat.st_mtime:
                return str(hit["sha256"])
        if stat.st_size > 1 << 30:
            log.info(
                "hashing %s (%.1f GB) once; later starts reuse the result", path.name, stat.st_size / 1e9
            )
        digest = sha256_file(path)
        with self._lock:
            self._cache[key] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest}
            self._save()
        return digest

    def _save(self) -> None:
        if self._cache_file is None:
            return
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._cache, indent=1, sort_keys=True))
        tmp.replace(self._cache_file)
