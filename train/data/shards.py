"""WebDataset shards as xdrec writes them: one tar entry ``u<user>.json`` per sample, fixed mtime,
uid and mode (same samples, same bytes), a new shard every ``data.shard_samples`` samples or
``data.shard_bytes`` bytes. Both prepare engines write through :class:`ShardWriter`."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

SPLITS = ("train", "valid", "test")


def sample_bytes(sample: dict) -> bytes:
    """A sample as it is stored in a shard."""
    return json.dumps(sample, separators=(",", ":")).encode()


class ShardWriter:
    """Rolling WebDataset tar writer of one (domain, split): a new shard every ``max_samples``
    samples or once ``max_bytes`` (> 0) are written. Fixed mtime and uid: same input, same bytes."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split, self.max_samples, self.max_bytes = folder, split, max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar = None
        self._n = self._bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self) -> Path:
        return self.folder / f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._tar = tarfile.open(self._path(), "w", format=tarfile.USTAR_FORMAT)
        self._n = self._bytes = 0

    def _close(self) -> None:
        self._tar.close()
        path = self._path()
        self.shards.append({"path": path, "samples": self._n, "bytes": path.stat().st_size})
        self._tar = None

    def write(self, sample: dict) -> None:
        self.write_bytes(sample["user"], sample_bytes(sample))

    def write_bytes(self, user: int, data: bytes) -> None:
        """One sample already serialised by :func:`sample_bytes`."""
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(f"u{user:08d}.json")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))
        self._n += 1
        self._bytes += 512 + -(-len(data) // 512) * 512
        if self._n >= self.max_samples or (self.max_bytes and self._bytes >= self.max_bytes):
            self._close()

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        if not self.shards:  # an empty split still has one (empty) shard, so every listing is uniform
            self._open()
            self._close()
        return self.shards
