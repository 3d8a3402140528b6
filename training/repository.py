"""The model repository: the one module that knows its layout. Bundles side by side, one of them current.

Layout of a repository::

    REPO/versions/<model_version>/   bundles, each written atomically by `training.bundle.write_bundle`
    REPO/CURRENT                     the current version's name (replaced atomically)
    REPO/promotions.jsonl            every promotion, newest last (what a rollback reads)

A bundle's own layout, and how it is written and verified, belong to `training.bundle`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from training.bundle import (
    Bundle,
    BundleContents,
    Manifest,
    check_creatable,
    check_replaceable,
    load_bundle,
    write_bundle,
)
from training.errors import BundleError

VERSIONS = "versions"
CURRENT = "CURRENT"
PROMOTIONS = "promotions.jsonl"


@dataclass(frozen=True)
class Destination:
    """Where training writes: a bundle directory (replaced atomically) or a new version of a repository."""

    path: Path
    repository: bool = False

    def check(self) -> None:
        """Refuse early, before any training, a destination that write() would refuse."""
        if self.repository:
            if not self.path.exists():
                check_creatable(self.path, "--repo")
            elif not self.path.is_dir():
                raise BundleError(f"--repo {self.path} is a file; name a new directory or a model repository")
            elif any(self.path.iterdir()) and not is_repository(self.path):
                raise BundleError(f"{self.path} exists and is not a model repository (no {VERSIONS}/ folder); "
                                  f"choose a new or empty directory for --repo")
        else:
            check_replaceable(self.path.resolve())

    def write(self, contents: BundleContents) -> tuple[Path, Manifest]:
        if self.repository:
            return write_to_repository(self.path, contents)
        return self.path, write_bundle(self.path, contents)


def is_repository(path: Path) -> bool:
    """A repository has a versions/ folder (and, once something is promoted, a CURRENT file)."""
    return (Path(path) / VERSIONS).is_dir()


def write_to_repository(repo: Path, contents: BundleContents) -> tuple[Path, Manifest]:
    """Write a bundle as a new version of `repo` (created if absent); the version is the bundle's own id."""
    repo = Path(repo)
    Destination(repo, repository=True).check()
    versions = repo / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    incoming = versions / f".incoming-{uuid.uuid4().hex[:8]}"
    manifest = write_bundle(incoming, contents)
    final = versions / manifest.model_version
    try:
        if os.path.lexists(final):  # rename() would replace an empty folder or follow nothing; say so instead
            raise FileExistsError(errno.EEXIST, "exists already", str(final))
        os.rename(incoming, final)
    except OSError as exc:
        shutil.rmtree(incoming, ignore_errors=True)
        raise BundleError(f"{repo}: cannot add version {manifest.model_version} ({exc.strerror}: {final})") from exc
    return final, manifest


def current_version(repo: Path) -> str | None:
    """The promoted version's name, or None before the first promotion.

    `CURRENT` must be a regular file naming a version folder inside `REPO/versions/` (see `version_path`);
    anything else (a path out of the repository, a link) is refused, never followed.
    """
    where = Path(repo) / CURRENT
    try:
        if not stat.S_ISREG(where.lstat().st_mode):
            raise BundleError(f"{where} is not a regular file; promote a version with anomaly-promote --repo {repo} "
                              f"VERSION")
        text = where.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where} cannot be read ({exc}); promote a version with anomaly-promote --repo {repo} "
                          f"VERSION") from exc
    if not text:
        return None
    version_path(repo, text, source=CURRENT)
    return text


def version_path(repo: Path, version: str, source: str = "") -> Path:
    """`REPO/versions/<version>`, refused unless `version` is one folder name (not hidden, not a path) and that
    folder exists inside the repository (a symbolic link is refused: it can point anywhere).

    `source` names where the version came from (CURRENT) for the message."""
    repo = Path(repo)
    named = f"{source} names {version[:80]!r}" if source else f"{version!r}"
    if not version or "\0" in version or Path(version).name != version or version.startswith("."):
        raise BundleError(f"{repo}: {named}, which is not a version name (a folder under {repo / VERSIONS}); "
                          f"promote a version with anomaly-promote --repo {repo} VERSION")
    path = repo / VERSIONS / version
    try:
        mode = path.lstat().st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        raise BundleError(f"{repo}: {named}, which is a symbolic link; a version is a folder inside "
                          f"{repo / VERSIONS}, copy the bundle there instead")
    if not stat.S_ISDIR(mode):
        known = sorted(p.name for p in (repo / VERSIONS).iterdir() if not p.name.startswith(".")) \
            if is_repository(repo) else []
        missing = f"{named}, but there is no such version" if source else f"no version {named}"
        raise BundleError(f"{repo}: {missing}; versions are {', '.join(known[-5:]) or 'none'} (promote one with "
                          f"anomaly-promote)")
    return path


def resolve_model(path: Path) -> Path:
    """A bundle directory as given, or the current version of a repository."""
    path = Path(path)
    if not is_repository(path):
        return path
    version = current_version(path)
    if version is None:
        raise BundleError(f"{path}: the repository has no current version yet; promote one with "
                          f"anomaly-promote --repo {path} VERSION")
    return version_path(path, version)


def load_model(path: Path, expected_schema_sha256: str | None = None) -> Bundle:
    """`load_bundle` of a bundle directory, or of a repository's current version (what `--model` accepts)."""
    return load_bundle(resolve_model(path), expected_schema_sha256)


def promote(repo: Path, version: str, reason: str = "promote") -> Manifest:
    """Make `version` current, atomically, after verifying that it loads; record it for rollbacks."""
    repo = Path(repo)
    if not is_repository(repo):
        raise BundleError(f"{repo} is not a model repository; train into one with anomaly-train --repo {repo}")
    manifest = load_bundle(version_path(repo, version)).manifest
    record = json.dumps({"version": version, "at": datetime.now(UTC).isoformat(), "action": reason}) + "\n"
    try:
        # O_NOFOLLOW: a link planted as promotions.jsonl must not make us append to the file it names.
        fd = os.open(repo / PROMOTIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                     0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as exc:
        raise BundleError(f"{repo / PROMOTIONS}: cannot be written ({exc.strerror}; it must be a regular file); "
                          f"nothing was promoted") from exc
    with os.fdopen(fd, "a") as history:
        tmp = repo / f".{CURRENT}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(version + "\n")
        os.replace(tmp, repo / CURRENT)  # replaces a link at CURRENT, never what it points to
        history.write(record)
    return manifest


def rollback(repo: Path) -> Manifest:
    """Promote the version that was current before the current one."""
    repo = Path(repo)
    current = current_version(repo)
    history = _promotions(repo)
    previous = next((v for v in reversed(history) if v != current), None)
    if previous is None:
        raise BundleError(f"{repo}: no earlier promoted version to roll back to")
    return promote(repo, previous, reason="rollback")


def _promotions(repo: Path) -> list[str]:
    """The promoted versions in `REPO/promotions.jsonl`, oldest first; a line that is no record is refused."""
    where = repo / PROMOTIONS
    try:
        lines = where.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where} cannot be read ({exc}); promote a version by name instead") from exc
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
            raise BundleError(f"{where}, line {number}: not a promotion record (a JSON object with a \"version\"); "
                              f"fix or delete that line, or promote a version by name: anomaly-promote --repo "
                              f"{repo} VERSION")
        history.append(entry["version"])
    return history
