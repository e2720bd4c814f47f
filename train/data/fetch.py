"""``xdrec data fetch <name>``: download a documented public release into a local folder, every
file checked against its recorded sha256 before it is kept.

The Amazon cross-domain pairs are the ones published with the ABXI paper's code (repository
DiMarzioBian/ABXI, commit 72e52c9f, folder ``data/``; Amazon review data, 2014 release, for
research use). A file is written to ``<name>.part`` and renamed only once its hash matches; a
mismatch, an answer longer than the recorded size or a failed download is one error naming the
URL, and nothing half-written is left (a Ctrl-C too). Mirrors: http(s):// or file:// only.
"""
from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path

from train.files import sha256_file
from train.redact import redact

ABXI = "https://raw.githubusercontent.com/DiMarzioBian/ABXI/72e52c9f/data"

# name -> (folder in the release, {file: (sha256, bytes)})
RELEASES: dict[str, tuple[str, dict[str, tuple[str, int]]]] = {
    "amazon-food-kitchen": ("afk", {
        "afk_50_preprocessed.txt": ("5f9856f574879920a70c93461add1ebc1c997b1ce6d626ba8d475315f53a4a15", 2913978),
        "map_item_50.txt": ("64a939f71c0c48ba181d6d24e384af1160812bdf244f20c58ef101f5fc54b3c3", 719364),
        "map_user_50.txt": ("e20b90e5b7b298e38243a64eb54830d537ea5a7a3ab5ae74d6d0179142a6d684", 168481)}),
    "amazon-beauty-electronics": ("abe", {
        "abe_50_preprocessed.txt": ("e13235003725700fdc709eb78a8865bd7e4ab75dc28ae569f7a4cebcdab1e33b", 1913628),
        "map_item_50.txt": ("4e144f3fea1a5e8037cd56167a084ce4d73c6ccc123187055470b3da9818de74", 627636),
        "map_user_50.txt": ("efcec3a6a523c25753390afee0cb2ad74f68de5dfaf27574e4108e97b8452d24", 105126)}),
}
SCHEMES = ("https", "http", "file")  # a mirror is a web server or a local folder (file:///...)


class FetchError(RuntimeError):
    """A download failed or did not match its recorded hash; the message names the URL."""


def _download(url: str, dest: Path, sha256: str, size: int, timeout: float) -> None:
    """``url`` into ``dest`` through ``<dest>.part``: at most ``size`` bytes are read (a longer
    answer is refused, not stored), kept only when its sha256 matches; the ``.part`` file goes
    on any failure, Ctrl-C included."""
    part = dest.with_name(dest.name + ".part")
    digest, got = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            while chunk := r.read(min(1 << 20, size + 1 - got)):
                got += len(chunk)
                if got > size:
                    raise FetchError(f"{redact(url)}: longer than the release's {size:,} bytes; nothing kept")
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise FetchError(f"{redact(url)}: sha256 {digest.hexdigest()}, the release's is {sha256}; nothing kept")
        os.replace(part, dest)
    except (OSError, ValueError) as e:
        raise FetchError(f"{redact(url)}: download failed ({redact(str(e))})") from None
    finally:
        part.unlink(missing_ok=True)


def fetch(name: str, to: str | Path, *, base_url: str = ABXI, timeout: float = 60.0, log=print) -> Path:
    """Every file of release ``name`` into ``to`` (files already there with the right hash are
    kept); returns the folder, ready for ``data.path``."""
    if name not in RELEASES:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(RELEASES)}")
    scheme = urllib.parse.urlsplit(base_url).scheme
    if scheme not in SCHEMES:
        raise FetchError(f"--base-url {redact(base_url)!r}: not a URL of {', '.join(s + '://' for s in SCHEMES)}")
    folder, files = RELEASES[name]
    out = Path(to)
    if out.exists() and not out.is_dir():
        raise FetchError(f"--to {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for file, (sha, size) in files.items():
        dest = out / file
        if dest.is_file() and sha256_file(dest) == sha:
            log(f"{dest}: present, sha256 matches")
            continue
        url = f"{base_url.rstrip('/')}/{folder}/{file}"
        log(f"{redact(url)} -> {dest}")
        _download(url, dest, sha, size, timeout)
    return out
