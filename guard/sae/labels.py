"""Feature labels: a ``{"12": "deception"}`` JSON mapping, or Neuronpedia's bulk explanation
exports.

Neuronpedia publishes every SAE's explanations as ``v1/<model>/<layer>-<set>/explanations/
batch-N.jsonl.gz``: one JSON record a line, ``{"modelId": "gemma-2-2b", "layer":
"20-gemmascope-res-16k", "index": "1234", "description": "...", ...}`` (``index`` is a string,
``layer`` the SAE's source id, not just its layer number). An SAE's ``neuronpedia_id``
(``model/<layer>-<set>``, e.g. ``gemma-2-2b/20-gemmascope-res-16k``) names the same pair: the
records are filtered to it, so that a folder or a file list mixing SAEs can never label one
SAE's features with another's explanations. A feature with several explanations (several
explainer models) keeps the first, files read in batch order (``batch-2`` before
``batch-10``) and lines in file order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from guard.errors import InvalidInput
from guard.sae.formats.artifact import parse_feature_labels
from guard.sae.formats.fields import read_json_object
from guard.sae.neuronpedia import parse_neuronpedia_id

#: A record longer than this is not an explanation (embeddings make lines of tens of kB).
MAX_RECORD_BYTES = 16 << 20
_EXPORT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".gz")
_NUMBER = re.compile(r"(\d+)")


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Labels read from one or more files, with what was read."""

    labels: dict[int, str]
    neuronpedia_id: str | None
    """The source the records were filtered to (None for a JSON mapping)."""
    files: int
    records: int
    """Records read from the files, every source included."""
    other_sources: Mapping[str, int]
    """Records of other SAEs, left out, by ``model/source``."""

    def summary(self) -> str:
        """One line for a CLI: how many labels from how many records."""
        if self.neuronpedia_id is None:
            return f"{len(self.labels)} feature labels from {self.files} file(s)"
        text = (f"{len(self.labels)} feature labels for {self.neuronpedia_id} from "
                f"{self.records} Neuronpedia records in {self.files} file(s)")
        left = sum(self.other_sources.values())
        if left:
            text += f" ({left} records of other SAEs left out)"
        return text


def is_neuronpedia_export(path: Path) -> bool:
    """A folder, or a ``.jsonl``/``.jsonl.gz`` file: read as Neuronpedia explanation records."""
    return path.is_dir() or path.name.endswith(_EXPORT_SUFFIXES)


def read_feature_labels(
    paths: Path | Sequence[Path], d_sae: int, *, neuronpedia_id: str | None = None
) -> LabelSet:
    """Labels from a JSON mapping file (``{"12": "deception"}``), or from Neuronpedia
    explanation exports (``.jsonl``/``.jsonl.gz`` files, or folders of them) filtered to
    ``neuronpedia_id``. Errors name the file (and line) and what was expected."""
    files = [paths] if isinstance(paths, Path) else list(paths)
    if not files:
        raise InvalidInput("--labels: expected at least one file")
    if len(files) == 1 and not is_neuronpedia_export(files[0]):
        mapping = parse_feature_labels(files[0], read_json_object(files[0]), d_sae)
        return LabelSet(mapping, None, 1, 0, {})
    mappings = [f for f in files if not is_neuronpedia_export(f)]
    if mappings:
        raise InvalidInput(
            f"{mappings[0]}: expected Neuronpedia exports (.jsonl, .jsonl.gz or folders of them) "
            "when several label files are given; a JSON mapping comes alone"
        )
    return read_neuronpedia(files, d_sae, neuronpedia_id=neuronpedia_id)


def read_neuronpedia(
    paths: Sequence[Path], d_sae: int | None, *, neuronpedia_id: str | None = None
) -> LabelSet:
    """Labels from Neuronpedia explanation records in ``paths`` (files or folders), kept for
    the source ``neuronpedia_id`` names. Without an id, the records must all name one source
    (it is then the one reported); with several the caller must choose."""
    wanted = parse_neuronpedia_id(neuronpedia_id) if neuronpedia_id is not None else None
    files = _export_files(paths)
    by_source: dict[tuple[str, str], dict[int, str]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    records = 0
    for file in files:
        for line_no, record in _records(file):
            records += 1
            where = f"{file}:{line_no}"
            source = (_text(record, "modelId", where), _text(record, "layer", where))
            counts[source] += 1
            if wanted is not None and source != wanted:
                continue
            feature = _feature(record, where, d_sae if wanted is not None else None)
            description = record.get("description")
            if not isinstance(description, str):
                raise InvalidInput(f"{where}: field 'description': expected a string, found "
                                   f"{description!r:.80}")
            if description.strip():
                by_source.setdefault(source, {}).setdefault(feature, description.strip())
    if wanted is None:
        if len(counts) > 1:
            found = ", ".join(f"{m}/{s} ({n})" for (m, s), n in sorted(counts.items()))
            raise InvalidInput(
                f"the label files hold explanations of {len(counts)} SAEs ({found}): name the "
                "one to use with --neuronpedia-id (or give the SAE a neuronpedia_id)"
            )
        if not counts:
            raise InvalidInput(f"{files[0]}: no Neuronpedia explanation records in "
                               f"{len(files)} file(s)")
        wanted = next(iter(counts))
        labels = by_source.get(wanted, {})
        if d_sae is not None:
            _check_range(labels, d_sae, f"{'/'.join(wanted)} in {len(files)} file(s)")
    else:
        labels = by_source.get(wanted, {})
        if not counts[wanted]:
            found = ", ".join(f"{m}/{s} ({n})" for (m, s), n in sorted(counts.items()))
            raise InvalidInput(
                f"{files[0]}{' ...' if len(files) > 1 else ''}: expected explanations of "
                f"{'/'.join(wanted)}, found none (the files hold {found or 'no records'})"
            )
    other = {f"{m}/{s}": n for (m, s), n in sorted(counts.items()) if (m, s) != wanted}
    return LabelSet(dict(sorted(labels.items())), "/".join(wanted), len(files), records, other)


def _export_files(paths: Sequence[Path]) -> list[Path]:
    """The files to read: each file given, and each folder's ``*.jsonl``/``*.jsonl.gz`` files
    (or those of its ``explanations/`` folder, as the export lays them out), in batch order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = _export_files_in(path)
            if not found and (path / "explanations").is_dir():
                found = _export_files_in(path / "explanations")
            if not found:
                raise InvalidInput(f"{path}: expected Neuronpedia explanation files "
                                   "(batch-N.jsonl.gz or .jsonl) in this folder, found none")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInput(f"{path}: no such labels file or folder")
    return files


def _export_files_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))), key=_batch_order)


def _batch_order(path: Path) -> tuple[Any, ...]:
    """``batch-2`` before ``batch-10``: numbers compare as numbers."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in _NUMBER.split(path.name) if part)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of each non-blank line of a ``.jsonl`` file, gzipped or not
    (recognised by its first bytes, not its name)."""
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else path.open("rb") as stream:
            line_no = 0
            while True:
                line = stream.readline(MAX_RECORD_BYTES + 1)
                if not line:
                    return
                line_no += 1
                if len(line) > MAX_RECORD_BYTES:
                    raise InvalidInput(f"{path}:{line_no}: a record longer than "
                                       f"{MAX_RECORD_BYTES} bytes: not an explanation export")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    raise InvalidInput(f"{path}:{line_no}: expected one JSON object a line "
                                       f"(Neuronpedia's export), found invalid JSON: {e}") from e
                if not isinstance(record, dict):
                    raise InvalidInput(f"{path}:{line_no}: expected a JSON object, found "
                                       f"{type(record).__name__}")
                yield line_no, record
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise InvalidInput(f"{path}: cannot read the labels file: "
                           f"{getattr(e, 'strerror', None) or e}") from e


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}: field {key!r}: expected a string (Neuronpedia records "
                           f"have modelId, layer, index and description), found {value!r:.80}")
    return value


def _feature(record: Mapping[str, Any], where: str, d_sae: int | None) -> int:
    value = record.get("index")
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError
        feature = int(value)
    except ValueError:
        raise InvalidInput(f"{where}: field 'index': expected a feature id, found "
                           f"{value!r:.80}") from None
    if feature < 0 or (d_sae is not None and feature >= d_sae):
        raise InvalidInput(f"{where}: field 'index': expected a feature id in [0, {d_sae}), "
                           f"found {feature}" if d_sae is not None else
                           f"{where}: field 'index': expected a feature id >= 0, found {feature}")
    return feature


def _check_range(labels: Mapping[int, str], d_sae: int, where: str) -> None:
    beyond = [f for f in labels if f >= d_sae]
    if beyond:
        raise InvalidInput(f"{where}: feature {max(beyond)} has a label but the SAE has only "
                           f"{d_sae} features: expected ids in [0, {d_sae}) (another SAE's "
                           "explanations? give --neuronpedia-id)")
