"""``xdrec data fetch <name>``: download a documented public release into a local folder, every
file checked against its recorded sha256 before it is kept.

The Amazon cross-domain pairs are the ones published with the ABXI paper's code (repository
DiMarzioBian/ABXI, commit 72e52c9f, folder ``data/``; Amazon review data, 2014 release, for
research use). A file is written to ``<name>.part`` and renamed only once its hash matches; a
mismatch or a failed download is one error naming the URL, and nothing half-written is left.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from train.files import sha256_file

ABXI = "https://raw.githubusercontent.com/DiMarzioBian/ABXI/72e52c9f/data"

# name -> (folder in the release, {file: sha256})
RELEASES: dict[str, tuple[str, dict[str, str]]] = {
    "amazon-food-kitchen": ("afk", {
        "afk_50_preprocessed.txt": "5f9856f574879920a70c93461add1ebc1c997b1ce6d626ba8d475315f53a4a15",
        "map_item_50.txt": "64a939f71c0c48ba181d6d24e384af1160812bdf244f20c58ef101f5fc54b3c3",
        "map_user_50.txt": "e20b90e5b7b298e38243a64eb54830d537ea5a7a3ab5ae74d6d0179142a6d684"}),
    "amazon-beauty-electronics": ("abe", {
        "abe_50_preprocessed.txt": "e13235003725700fdc709eb78a8865bd7e4ab75dc28ae569f7a4cebcdab1e33b",
        "map_item_50.txt": "4e144f3fea1a5e8037cd56167a084ce4d73c6ccc123187055470b3da9818de74",
        "map_user_50.txt": "efcec3a6a523c25753390afee0cb2ad74f68de5dfaf27574e4108e97b8452d24"}),
}


class FetchError(RuntimeError):
    """A download failed or did not match its recorded hash; the message names the URL."""


def _download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: download failed ({e})") from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 {digest.hexdigest()}, the release's is {sha256}; nothing kept")
    os.replace(part, dest)


def fetch(name: str, to: str | Path, *, base_url: str = ABXI, timeout: float = 60.0, log=print) -> Path:
    """Every file of release ``name`` into ``to`` (files already there with the right hash are
    kept); returns the folder, ready for ``data.path``."""
    if name not in RELEASES:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(RELEASES)}")
    folder, files = RELEASES[name]
    out = Path(to)
    out.mkdir(parents=True, exist_ok=True)
    for file, sha in files.items():
        dest = out / file
        if dest.is_file() and sha256_file(dest) == sha:
            log(f"{dest}: present, sha256 matches")
            continue
        url = f"{base_url.rstrip('/')}/{folder}/{file}"
        log(f"{url} -> {dest}")
        _download(url, dest, sha, timeout)
    return out
