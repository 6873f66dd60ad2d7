"""Model repositories on the Hugging Face Hub: one snapshot folder per (repository, revision), through
huggingface_hub, from the local cache or downloaded.

Why it exists: published recipes name their models as Hub ids (`org/name`, `org/name@revision`).
`snapshot` turns one into a local snapshot folder and the commit it holds, so that the rest of the
engine reads folders only and a result can be traced to exact weights. It honours the user's set-up:
the cache under `HF_HUB_CACHE` / `HF_HOME` (read when called), `HF_HUB_OFFLINE` (then the cache alone
answers, and a repository or revision it lacks is an error naming the YAML field), and the token
huggingface_hub finds (`HF_TOKEN`, `hf auth login`). Online, the repository's file list is read first
and only what a merge needs is fetched: safetensors weights (the index's shards, else
model.safetensors, else every *.safetensors), configs, tokenizer and generation files, a LoRA
adapter's config and weights. Pickled weights (*.bin, *.pt) are never downloaded: a repository that
has only those is refused before anything is fetched.

mergekit 0.1.5 lists the repository's files on the Hub even when the cache holds the model, so it
fails offline; this reads the cache first when offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import CheckpointError

SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
    "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class Origin:
    """Where a folder came from on the Hub: the repository, the revision asked for, the commit it is."""

    repo: str
    revision: str | None
    commit: str

    def describe(self) -> str:
        return f"{self.repo}{'@' + self.revision if self.revision else ''} (commit {self.commit})"


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it, at the time of the call."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def origin_of(folder: str | os.PathLike) -> Origin | None:
    """The repository and commit of a folder that is a snapshot in a Hugging Face cache
    (`.../models--org--name/snapshots/<commit>`), else None."""
    path = Path(folder)
    repo_dir = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo_dir.startswith("models--") or len(path.name) != 40:
        return None
    return Origin(repo_dir.removeprefix("models--").replace("--", "/"), None, path.name)


def snapshot(repo: str, revision: str | None, *, where: str, weights: bool = True, adapter: bool = False,
             log: Callable[[str], None] | None = None) -> tuple[Path, Origin]:
    """The local snapshot folder of `repo` at `revision` (None: main) and its origin. `weights`: the
    model weights are needed (else configs and tokenizer only); `adapter`: it is a LoRA adapter."""
    from huggingface_hub import snapshot_download

    if offline():
        try:
            folder = snapshot_download(repo, revision=revision, cache_dir=str(cache_dir()), local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError, and validation errors of odd names
            raise _not_cached(repo, revision, where, exc) from None
        origin = Origin(repo, revision or "main", Path(folder).name)
        if log is not None:
            log(f"{origin.describe()}: from the cache ({folder})")
        return Path(folder), origin
    return _download(repo, revision, where=where, weights=weights, adapter=adapter, log=log)


def _download(repo: str, revision: str | None, *, where: str, weights: bool, adapter: bool,
              log: Callable[[str], None] | None) -> tuple[Path, Origin]:
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        files = choose_files({s.rfilename: s.size or 0 for s in info.siblings or []}, weights=weights,
                             adapter=adapter, repo=repo, where=where)
        origin = Origin(repo, revision or "main", info.sha)
        if log is not None:
            size = sum(files.values()) / 1e9
            log(f"{origin.describe()}: fetching {len(files)} file(s), {size:.2f} GB (cached files are reused)")
        folder = snapshot_download(repo, revision=info.sha, cache_dir=str(cache_dir()), allow_patterns=list(files))
    except CheckpointError:
        raise
    except Exception as exc:  # huggingface_hub's HTTP and repository errors
        raise _online_error(repo, revision, where, exc) from None
    return Path(folder), origin


def choose_files(files: dict[str, int], *, weights: bool, adapter: bool, repo: str, where: str) -> dict[str, int]:
    """The files of a repository listing ({name: bytes}) that a merge needs; pickles never."""
    top = {name: size for name, size in files.items() if "/" not in name}
    wanted = [n for n in top if n in SIDE_FILES]
    if adapter:
        if "adapter_model.safetensors" not in top:
            pickled = [n for n in top if n.startswith("adapter_model") and n.endswith(PICKLES)]
            raise CheckpointError(
                f"the adapter {repo} has no adapter_model.safetensors" + (f", only {pickled[0]} (a pickle)" if pickled
                                                                         else ""), where=where,
                fix="evomerge reads safetensors only: convert the adapter (load it with peft, save_pretrained "
                    "with safe_serialization=True) and give its folder")
        wanted += [n for n in ADAPTER_FILES if n in top]
    elif weights:
        wanted += _weight_files(top, repo, where)
    return {n: top[n] for n in dict.fromkeys(wanted)}


def _weight_files(top: dict[str, int], repo: str, where: str) -> list[str]:
    safes = sorted(n for n in top if n.endswith(".safetensors"))
    if "model.safetensors.index.json" in top:  # its shards; a consolidated copy beside them is not needed
        return ["model.safetensors.index.json", *([n for n in safes if n.startswith("model-")] or safes)]
    if "model.safetensors" in top:
        return ["model.safetensors"]
    if safes:
        return safes
    pickled = sorted(n for n in top if n.endswith(PICKLES))
    raise CheckpointError(
        f"{repo} has no safetensors weights" + (f", only pickles ({pickled[0]})" if pickled else ""), where=where,
        fix="evomerge never downloads or reads pickled weights: use a revision with safetensors (many repos have "
            "a refs/pr/N conversion), or convert it once with transformers (save_pretrained) and give the folder")


def _not_cached(repo: str, revision: str | None, where: str, exc: Exception) -> CheckpointError:
    cache = cache_dir()
    folder = cache / ("models--" + repo.replace("/", "--"))
    if not folder.is_dir():
        return CheckpointError(
            f"{repo!r} is neither a local folder nor in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set",
            where=where, fix=f"download it where the network is allowed (`hf download {repo}`), point HF_HOME or "
                             "HF_HUB_CACHE at the cache that holds it, or give a local folder")
    refs = sorted(p.name for p in (folder / "refs").glob("*")) if (folder / "refs").is_dir() else []
    commits = sorted(p.name for p in (folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
    have = ", ".join([f"refs {', '.join(refs)}"] * bool(refs) + [f"commits {', '.join(c[:12] for c in commits)}"]
                     * bool(commits)) or "nothing"
    return CheckpointError(
        f"revision {revision or 'main'!r} of {repo} is not in the Hugging Face cache ({have} are), and HF_HUB_OFFLINE "
        "is set", where=where,
        fix=f"use a cached revision (a branch or tag under refs/, or a full 40-character commit hash), or download "
            f"it where the network is allowed (`hf download {repo} --revision {revision or 'main'}`)")


def _online_error(repo: str, revision: str | None, where: str, exc: Exception) -> CheckpointError:
    name = type(exc).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return CheckpointError(f"the Hub has no repository {repo!r} that this token may read ({name})", where=where,
                               fix="check the name; for a gated or private repository accept its terms and log in "
                                   "(`hf auth login` or HF_TOKEN)")
    if name == "RevisionNotFoundError":
        return CheckpointError(f"{repo} has no revision {revision!r}", where=where,
                               fix="use a branch, tag or commit hash of the repository")
    return CheckpointError(f"cannot reach {repo} on the Hub ({name}: {str(exc).splitlines()[0] if str(exc) else ''})",
                           where=where, fix="check the network, or set HF_HUB_OFFLINE=1 to use the local cache only")


__all__ = ["Origin", "cache_dir", "choose_files", "offline", "origin_of", "snapshot"]
