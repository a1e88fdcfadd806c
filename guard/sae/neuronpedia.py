"""Neuronpedia ids: ``model/<layer>-<set>`` (e.g. ``gemma-2-2b/20-gemmascope-res-16k``), what
SAELens configs call ``neuronpedia_id`` and what names an SAE's feature pages and its
explanation exports (see ``guard.sae.labels``)."""

from __future__ import annotations

from pathlib import Path

from guard.errors import InvalidInput, SaeFileError

#: Neuronpedia's pages: ``{NEURONPEDIA_URL}/{neuronpedia_id}/{feature}``.
NEURONPEDIA_URL = "https://www.neuronpedia.org"


def parse_neuronpedia_id(value: object, where: str = "neuronpedia_id") -> tuple[str, str]:
    """``model/<layer>-<set>`` as ``(model, source)``; anything else is an error naming
    ``where``."""
    if isinstance(value, str):
        model, sep, source = value.strip().partition("/")
        if sep and model and source and "/" not in source and not any(
                c.isspace() for c in value.strip()):
            return model, source
    raise InvalidInput(
        f"{where}: expected a Neuronpedia id 'model/<layer>-<set>' (e.g. "
        f"'gemma-2-2b/20-gemmascope-res-16k'), found {value!r}"
    )


def neuronpedia_id_field(path: Path, value: object, field: str = "neuronpedia_id") -> str | None:
    """A config file's ``neuronpedia_id`` field: None when absent or null, else a checked id
    (an error names the file and the field)."""
    if value is None:
        return None
    try:
        model, source = parse_neuronpedia_id(value, f"field {field!r}")
    except InvalidInput as e:
        raise SaeFileError(path, str(e)) from None
    return f"{model}/{source}"


def feature_url(neuronpedia_id: str, feature: int) -> str:
    """The feature's Neuronpedia page."""
    return f"{NEURONPEDIA_URL}/{neuronpedia_id}/{int(feature)}"
