"""A Hugging Face hub cache built by hand, in the cache's own layout, for offline tests of Hub references.

huggingface_hub keeps a repository `org/name` under `$HF_HUB_CACHE/models--org--name/`: the file
contents in `blobs/<sha256>`, one folder per commit in `snapshots/<commit>/` whose files are relative
symlinks to those blobs, and `refs/<branch or tag>` holding the commit a name points to. `publish`
copies a local model folder into such a cache as one commit of a repository, exactly as a download
would leave it, so that `HF_HUB_OFFLINE=1` resolution (`snapshot_download(..., local_files_only=True)`)
finds it. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def publish(cache: str | os.PathLike, repo: str, folder: str | os.PathLike, *, refs: tuple[str, ...] = ("main",),
            commit: str | None = None, files: tuple[str, ...] | None = None) -> str:
    """Put the files of `folder` (all, or `files`) into `cache` as commit `commit` (default: a hash of
    the repository and the files) of `repo`, with each of `refs` pointing at it. Returns the commit."""
    cache, folder = Path(cache), Path(folder)
    names = sorted(files if files is not None else (p.name for p in folder.iterdir() if p.is_file()))
    digest = hashlib.sha1(repo.encode())
    for name in names:
        digest.update(name.encode() + (folder / name).read_bytes())
    commit = commit or digest.hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for name in names:
        data = (folder / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit
