"""The model bundle: the one module that knows its layout. It writes bundles atomically and loads them verified.

Layout of a bundle directory (format 1)::

    manifest.json          version id, creation time, data/schema hashes, library versions, metrics, file hashes
    features.json          feature schema, order and preprocessing stats (FeatureSchema.to_dict)
    threshold.json         decision threshold and how it was chosen
    score_histogram.json   normal-score distribution at training time (drift reference)
    field_histograms.json  per-field training distributions (per-field drift reference; optional)
    windows.json           per-entity window features the model was trained with (WindowSpec; optional)
    saved_model/           TensorFlow SavedModel with the `serving_default` scoring signature
    report/                report.html and PNG plots (informational)

Every file except the manifest is listed in the manifest with its SHA-256; loading refuses a bundle
with an unlisted, missing or changed file, a symbolic link or special file anywhere in its tree, a schema
hash or format version that does not match, or a value out of range (feature statistics, threshold,
histogram, window spec), or a schema field named like a window feature (`win:...`) that no `windows.json`
defines. `write_bundle` replaces only a bundle it wrote itself.

A model repository (versions side by side, one of them current) is `training.repository`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.errors import BundleError
from training.features import FeatureSchema
from training.threshold import ScoreHistogram, Threshold
from training.windows import WindowSpec, is_window_feature

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.json"
THRESHOLD = "threshold.json"
HISTOGRAM = "score_histogram.json"
FIELD_HISTOGRAMS = "field_histograms.json"
WINDOWS = "windows.json"
SAVED_MODEL = "saved_model"
REPORT = "report"
#: Files every bundle has; the manifest must list (and so hash) each of them, and every other file it holds.
REQUIRED_FILES = (FEATURES, THRESHOLD, HISTOGRAM, f"{SAVED_MODEL}/saved_model.pb")


@dataclass(frozen=True)
class Manifest:
    """What a bundle is: identity, provenance and integrity."""

    model_version: str
    created_at: str
    data_sha256: str
    schema_sha256: str
    files: dict[str, str]
    libraries: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "model_version": self.model_version,
            "created_at": self.created_at, "data_sha256": self.data_sha256, "schema_sha256": self.schema_sha256,
            "libraries": self.libraries, "training": self.training, "metrics": self.metrics,
            "columns": self.columns, "files": self.files,
        }


@dataclass(frozen=True)
class BundleContents:
    """Everything training hands over to be written."""

    schema: FeatureSchema
    threshold: Threshold
    histogram: ScoreHistogram
    data_sha256: str
    write_saved_model: Callable[[Path], object]
    write_report: Callable[[Path], None] | None = None
    field_histograms: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    windows: WindowSpec | None = None


@dataclass
class Bundle:
    """A loaded, verified bundle. `scorer` loads the SavedModel on first use."""

    path: Path
    manifest: Manifest
    schema: FeatureSchema
    threshold: Threshold
    histogram: ScoreHistogram
    field_histograms: dict[str, ScoreHistogram] = field(default_factory=dict)
    #: The window features the schema's `win:` fields are computed by; None for a bundle trained without.
    windows: WindowSpec | None = None
    _scorer: Any = None

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from training.scoring import Scorer

            self._scorer = Scorer(self.path / SAVED_MODEL, self.schema, windows=self.windows)
        return self._scorer

    @property
    def passthrough_columns(self) -> list[str]:
        """Columns the training file had besides features (label, dropped, window keys and summarised fields
        the model does not take itself): allowed in files to score."""
        ignored = [str(c) for c in self.manifest.columns.get("ignored", [])]
        if self.windows is None:
            return ignored
        read = [*self.windows.key_fields, *self.windows.numeric, *self.windows.categorical]
        return list(dict.fromkeys([*ignored, *(name for name in read if name not in self.schema.names)]))


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _bundle_files(root: Path) -> list[str]:
    """Relative paths of every file under `root`, which may hold only folders and regular files.

    A symbolic link (to a file or a folder, inside the bundle or not) or a special file (a FIFO, a device)
    anywhere in the tree is refused: everything a bundle is read from lies inside it, and is what was hashed.
    """
    def fail(exc: OSError) -> None:
        raise BundleError(f"{exc.filename}: cannot be read ({exc.strerror}); copy the bundle again") from exc

    files = []
    for folder, dirs, names in os.walk(root, onerror=fail):
        for name in sorted([*dirs, *names]):
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{path} is a symbolic link; a bundle holds only its own files and folders. "
                                  f"Copy the bundle again (cp -rL dereferences links) or retrain")
            if name in names and not stat.S_ISREG(mode):
                raise BundleError(f"{path} is not a regular file; a bundle holds only files and folders. "
                                  f"Remove it, or copy the bundle again")
            if name in names:
                files.append(path.relative_to(root).as_posix())
    return sorted(files)


def _file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file of the bundle at `root` except its manifest (see `_bundle_files`)."""
    return {name: _sha256(root / name) for name in _bundle_files(root) if name != MANIFEST}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _libraries() -> dict[str, str]:
    import numpy
    import tensorflow

    from training import __version__

    return {"python": platform.python_version(), "tensorflow": tensorflow.__version__,
            "numpy": numpy.__version__, "streaming-anomaly": __version__}


def write_bundle(out_dir: Path, contents: BundleContents) -> Manifest:
    """Write a bundle atomically.

    1. Write every file into a temporary sibling directory.
    2. Hash the files and write the manifest last.
    3. Rename the temporary directory onto `out_dir` (an existing bundle there is replaced; the old one
       is removed only after the rename). A failure before step 3 leaves `out_dir` untouched.
    """
    out_dir = out_dir.resolve()
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / FEATURES, contents.schema.to_dict())
        _write_json(tmp / THRESHOLD, contents.threshold.to_dict())
        _write_json(tmp / HISTOGRAM, contents.histogram.to_dict())
        if contents.field_histograms is not None:
            _write_json(tmp / FIELD_HISTOGRAMS, contents.field_histograms)
        if contents.windows is not None:
            _write_json(tmp / WINDOWS, contents.windows.to_dict())
        contents.write_saved_model(tmp / SAVED_MODEL)
        if contents.write_report is not None:
            (tmp / REPORT).mkdir()
            contents.write_report(tmp / REPORT)
        created = datetime.now(UTC)
        schema_sha = contents.schema.schema_hash()
        files = _file_hashes(tmp)
        identity = hashlib.sha256(json.dumps([contents.data_sha256, files], sort_keys=True).encode()).hexdigest()
        manifest = Manifest(
            model_version=f"{created:%Y%m%dT%H%M%SZ}-{identity[:8]}", created_at=created.isoformat(),
            data_sha256=contents.data_sha256, schema_sha256=schema_sha, files=files, libraries=_libraries(),
            training=contents.training, metrics=contents.metrics, columns=contents.columns)
        _write_json(tmp / MANIFEST, manifest.to_dict())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(out_dir: Path) -> None:
    """Refuse to write over anything but an empty directory or a bundle this product wrote.

    A bundle we wrote has a readable manifest and holds nothing but the files that manifest lists; a
    folder with anything else in it (a project, a bundle someone added notes to) is never replaced.
    """
    if not out_dir.exists():
        check_creatable(out_dir, "--out")
        return
    if not out_dir.is_dir():
        raise BundleError(f"{out_dir} is a file; --out must name a new directory or an existing model bundle")
    if not any(out_dir.iterdir()):
        return
    try:
        files = _bundle_files(out_dir)
        manifest = load_manifest(out_dir)
    except BundleError as exc:
        raise BundleError(f"{out_dir} exists and is not a model bundle ({exc}); choose a new or empty "
                          f"directory for --out") from None
    foreign = sorted(set(files) - set(manifest.files) - {MANIFEST})
    if foreign:
        raise BundleError(f"{out_dir} holds files the bundle did not write ({', '.join(foreign[:3])}); it is not "
                          f"replaced. Choose another --out, or move those files away")


def check_creatable(path: Path, option: str) -> None:
    """Refuse, before any work, a new `path` that cannot be made: its nearest existing ancestor must be a
    folder we may write in."""
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise BundleError(f"{option} {path}: {ancestor} is a file, not a directory; choose a path in a "
                                  f"directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise BundleError(f"{option} {path}: {ancestor} is not writable; choose a directory you can write")
            return


def _read_json(path: Path) -> dict[str, Any]:
    """The one reader of a bundle's JSON files: any way a file fails to parse is a `BundleError`."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing; the bundle is incomplete, retrain the model") from exc
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror}); copy the bundle again or retrain") from exc
    except RecursionError as exc:
        raise BundleError(f"{path} is not valid JSON (nested too deeply); the bundle is corrupt, retrain the "
                          f"model") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is corrupt, retrain the model") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object; the bundle is corrupt, retrain the model")
    return data


def load_manifest(path: Path) -> Manifest:
    where = path / MANIFEST
    data = _read_json(where)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version!r} is not supported by this version "
                          f"(expects {FORMAT_VERSION}); retrain with the matching anomaly-train")

    def text(key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise BundleError(f"{where}: {key!r} must be a non-empty string, got {value!r}; the bundle is corrupt, "
                              f"retrain the model")
        return value

    def mapping(key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise BundleError(f"{where}: {key!r} must be an object, got {json_name(value)}; the bundle is corrupt, "
                              f"retrain the model")
        return value

    files = mapping("files")
    if not files or not all(isinstance(v, str) and len(v) == 64 for v in files.values()):
        raise BundleError(f"{where}: 'files' must map every bundle file to its SHA-256; the bundle is corrupt, "
                          f"retrain the model")
    return Manifest(model_version=text("model_version"), created_at=text("created_at"),
                    data_sha256=text("data_sha256"), schema_sha256=text("schema_sha256"), files=dict(files),
                    libraries=mapping("libraries"), training=mapping("training"), metrics=mapping("metrics"),
                    columns=mapping("columns"))


def json_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def load_bundle(path: Path, expected_schema_sha256: str | None = None) -> Bundle:
    """Load and verify a bundle: format version, every file's hash, and the schema hash."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no model bundle here; train one with anomaly-train --out {path}")
    actual = _file_hashes(path)  # first: refuses links and special files before any file is read
    manifest = load_manifest(path)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{path / MANIFEST}: does not list {name}; every bundle file must be listed and "
                              f"hashed. The bundle is corrupt, retrain the model")
    unlisted = sorted(set(actual) - set(manifest.files))
    if unlisted:
        raise BundleError(f"{path}: file {unlisted[0]} is not listed in the manifest ({len(unlisted)} such); a "
                          f"bundle holds only the files it lists. Remove it, or copy the bundle again")
    for name, digest in manifest.files.items():
        if name not in actual:
            raise BundleError(f"{path}: file {name} listed in the manifest is missing; the bundle is incomplete, "
                              f"copy it again or retrain")
        if actual[name] != digest:
            raise BundleError(f"{path}: file {name} does not match its hash in the manifest (modified or "
                              f"corrupt); copy the bundle again or retrain")
    features = _read_json(path / FEATURES)
    try:
        schema = FeatureSchema.from_dict(features)
    except BundleError as exc:
        raise BundleError(f"{path / FEATURES}: {exc}") from exc
    if schema.schema_hash() != manifest.schema_sha256:
        raise BundleError(f"{path}: features.json does not match the manifest's schema hash; retrain the model")
    if expected_schema_sha256 is not None and manifest.schema_sha256 != expected_schema_sha256:
        raise BundleError(f"{path}: schema hash {manifest.schema_sha256[:12]} differs from the expected "
                          f"{expected_schema_sha256[:12]}: events shaped for the old model would be mis-scored. "
                          f"Deploy a bundle trained on the same schema, or update the expected hash")
    try:
        threshold = Threshold.from_dict(_read_json(path / THRESHOLD))
        histogram = ScoreHistogram.from_dict(_read_json(path / HISTOGRAM))
        fields = _field_histograms(path, schema) if FIELD_HISTOGRAMS in manifest.files else {}
        windows = _windows(path, schema) if WINDOWS in manifest.files else None
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    if windows is None and (orphans := [n for n in schema.names if is_window_feature(n)]):
        raise BundleError(f"{path}: features.json has window feature {orphans[0]!r} but the bundle has no "
                          f"{WINDOWS} defining it; the bundle is incomplete, retrain the model")
    return Bundle(path=path, manifest=manifest, schema=schema, threshold=threshold, histogram=histogram,
                  field_histograms=fields, windows=windows)


def _windows(path: Path, schema: FeatureSchema) -> WindowSpec:
    """`windows.json`, checked against the schema: each window feature the model takes must be one it defines."""
    spec = WindowSpec.from_dict(_read_json(path / WINDOWS))
    defined = set(spec.names)
    if undefined := [n for n in schema.names if is_window_feature(n) and n not in defined]:
        raise BundleError(f"features.json has window feature {undefined[0]!r} that {WINDOWS} does not define; "
                          f"retrain the model")
    return spec


def _field_histograms(path: Path, schema: FeatureSchema) -> dict[str, ScoreHistogram]:
    data = _read_json(path / FIELD_HISTOGRAMS)
    try:
        entries = {str(item["name"]): item for item in data["fields"]}
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{FIELD_HISTOGRAMS} is malformed ({exc!r}); retrain the model") from exc
    out = {}
    for name in schema.names:
        if name not in entries:
            raise BundleError(f"{FIELD_HISTOGRAMS} lacks field {name!r}; retrain the model")
        try:
            out[name] = ScoreHistogram.from_dict(entries[name])
        except BundleError as exc:
            raise BundleError(f"{FIELD_HISTOGRAMS}, field {name!r}: {exc}") from exc
    return out

