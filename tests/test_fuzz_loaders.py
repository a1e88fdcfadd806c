"""Property-based fuzzing of the SAE file loaders (SAELens, sparsify, Gemma Scope).

Valid fixtures from ``tests.sae_fixtures`` are mutated (``tests.fuzz_strategies.sae_cases``):
the loader must either load a consistent SAE (shapes agree with the config, every weight
finite float32) or raise :class:`guard.errors.SaeFileError` naming the file and what is wrong
in it; never another exception (KeyError, struct.error, a NumPy ValueError, RecursionError).
``-s`` prints the counts; ``python -m bench.fuzz`` runs the same property for longer.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_strategies import Mutation, build_sae, check_loader, sae_cases

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfuzz loaders: {COUNTS['cases']} cases; "
          + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()) if k != "cases"))


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          # The cases write small files; the deep-JSON mutations are large on purpose.
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=sae_cases())
def test_loaders_load_consistently_or_refuse_with_file_and_field(
    case: tuple[str, list[Mutation]],
) -> None:
    fmt, mutations = case
    with tempfile.TemporaryDirectory(prefix="guard-fuzz-sae-") as tmp:
        outcome = check_loader(build_sae(Path(tmp), fmt, mutations))
    COUNTS["cases"] += 1
    COUNTS[outcome] += 1
    COUNTS[fmt] += 1


def test_valid_fixtures_load() -> None:
    """The unmutated fixture of every format loads (the mutations start from good files)."""
    from tests.fuzz_strategies import SAE_FORMATS

    for fmt in SAE_FORMATS:
        with tempfile.TemporaryDirectory() as tmp:
            assert check_loader(build_sae(Path(tmp), fmt, [])) == "loaded", fmt


@pytest.mark.parametrize(
    ("fmt", "mutations", "fragment"),
    [
        # Each one raised something other than SaeFileError before the fuzzing found it.
        ("saelens-standard", [("cfg_bytes", b"\x80")], "not UTF-8"),  # UnicodeDecodeError
        ("saelens-standard", [("cfg_bytes", b"<deep>")], "nested too deeply"),  # RecursionError
        ("saelens-standard", [("header", b"<deep>")], "nested too deeply"),  # RecursionError
        ("saelens-standard", [("nan", 0, 0, 1e300)], "beyond the float32 range"),  # F64 cast
        ("gemmascope", [("nan", 0, 0, 1e300)], "beyond the float32 range"),  # float64 npz
        ("saelens-standard", [("cfg_set", "normalize_activations", True),
                              ("cfg_set", "norm_scaling_factor", 10**400)],
         "'norm_scaling_factor'"),  # TypeError from np.isfinite
        ("saelens-standard", [("cfg_set", "normalize_activations", True),
                              ("cfg_set", "norm_scaling_factor", 1e300)], "folded in"),
        ("saelens-gated", [("dtype", 5, "bf16"), ("dtype", 5, "float16")], "'r_mag'"),
    ],
    ids=["cfg-not-utf8", "cfg-deep-json", "header-deep-json", "f64-overflow",
         "npz-f64-overflow", "huge-int-factor", "huge-factor", "gated-exp-overflow"],
)
def test_found_by_fuzzing(fmt: str, mutations: list[Mutation], fragment: str) -> None:
    from guard.errors import SaeFileError
    from guard.sae.formats import load_any

    with tempfile.TemporaryDirectory() as tmp:
        path = build_sae(Path(tmp), fmt, mutations)
        assert check_loader(path).startswith("SaeFileError:")
        with pytest.raises(SaeFileError, match=fragment.replace("(", r"\(")):
            load_any(path, "blocks.6.hook_resid_post" if fmt == "gemmascope" else None)
