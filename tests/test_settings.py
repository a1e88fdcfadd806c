"""guard.Settings: the one strict reader behind the config file and the plugins' blocks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from guard import ConfigError, Settings


def test_values_are_read_with_defaults_and_required_keys() -> None:
    block = Settings({"hook": "blocks.6.hook_resid_post", "threshold": 2, "on": True,
                      "action": "FLAG", "ids": [3, 1], "features": "all", "n": 5}, "detectors.j")
    assert block.hook("hook") == "blocks.6.hook_resid_post"
    assert block.number("threshold") == 2.0
    assert block.boolean("on") is True
    assert block.choice("action", ("log", "flag"), fold_case=True) == "flag"
    assert block.int_list("ids") == (3, 1)
    assert block.features("features") == "all"
    assert block.positive_int("n") == 5
    assert block.string("path", None) is None
    assert block.number("bias", 0.5) == 0.5
    block.finish()
    with pytest.raises(ConfigError) as caught:
        block.string("missing")
    assert str(caught.value) == ("detectors.j.missing: expected a value (this key is "
                                 "required), found 'nothing'")


BAD: list[tuple[Callable[[Settings], object], Any, str]] = [
    (lambda s: s.string("v"), "", "a non-empty string"),
    (lambda s: s.string("v", empty=True), 3, "a string"),
    (lambda s: s.hook("v"), "blocks 1", "a hook name such as blocks.12.hook_resid_post"),
    (lambda s: s.boolean("v"), "yes", "true or false"),
    (lambda s: s.positive_int("v"), True, "a positive integer"),
    (lambda s: s.positive_int("v"), 0, "a positive integer"),
    (lambda s: s.number("v"), math.inf, "a finite number"),
    (lambda s: s.number("v"), True, "a finite number"),
    (lambda s: s.number("v", min=0), -1, "a number >= 0"),
    (lambda s: s.number("v", above=0), 0, "a number > 0"),
    (lambda s: s.choice("v", ("open", "closed")), "Open", "one of open, closed"),
    (lambda s: s.int_list("v"), [1, -1], "a list of integers >= 0"),
    (lambda s: s.features("v"), "some", "'all' or a list of feature ids (integers >= 0)"),
    (lambda s: s.feature_id("v"), "7", "a feature id (an integer >= 0)"),
    (lambda s: s.section("v"), [1], "a mapping"),
    (lambda s: s.sequence("v", "a list of names"), "x", "a list of names"),
    (lambda s: s.sequence("v", "a list of names", non_empty=True), [], "a list of names"),
]


@pytest.mark.parametrize(("read", "value", "expected"), BAD)
def test_an_error_names_the_full_key_what_was_expected_and_what_was_found(
    read: Callable[[Settings], object], value: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        read(Settings({"v": value}, "plugins.config.p"))
    assert (caught.value.key, caught.value.expected, caught.value.found) == (
        "plugins.config.p.v", expected, value)


def test_nested_sections_and_lists_extend_the_key_path() -> None:
    top = Settings({"server": {"tls": {"cert_file": 5}}, "edits": [{"feature": "x"}]})
    with pytest.raises(ConfigError, match=r"^server\.tls\.cert_file: expected a non-empty"):
        top.section("server").section("tls").string("cert_file")
    edits = top.sequence("edits", "a list of edits")
    assert edits.names() == [0]
    with pytest.raises(ConfigError, match=r"^edits\[0\]\.feature: expected a feature id"):
        edits.section(0).feature_id("feature", digits=True)


def test_unknown_keys_are_rejected_naming_the_allowed_ones() -> None:
    block = Settings({"listen": "x", "listne": "y"}, "server")
    block.string("listen")
    with pytest.raises(ConfigError) as caught:
        block.finish()
    assert str(caught.value) == ("server.listne: expected one of the keys listen, found "
                                 "\"unknown key 'listne'\"")
    # only(): before reading, so a typo is not reported as a missing required key
    with pytest.raises(ConfigError, match=r"^rule\.hok: expected one of the keys of a rule: "
                                          r"edits, hook,"):
        Settings({"hok": "h"}, "rule").only(("hook", "edits"), "of a rule")


def test_named_sections_and_feature_id_keys() -> None:
    top = Settings({"a": {"x": 1}, "b": None})
    assert [(name, block.data) for name, block in top.sections("detector")] == [
        ("a", {"x": 1}), ("b", {})]
    with pytest.raises(ConfigError, match=r"^5: expected a detector name"):
        list(Settings({5: {}}).sections("detector"))
    weights = Settings({123: 0.5, "7": 1.0}, "weights")
    assert weights.feature_keys() == {123: 123, 7: "7"}
    with pytest.raises(ConfigError, match=r"^weights\.5: expected each feature id once"):
        Settings({5: 1.0, "5": 2.0}, "weights").feature_keys()
    with pytest.raises(ConfigError, match=r"^weights\.x: expected a feature id"):
        Settings({"x": 1.0}, "weights").feature_keys()


def test_a_plugins_block_that_is_not_a_mapping_names_the_block() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(["path"], what="a mapping of decision log settings")
    assert (caught.value.key, caught.value.expected) == ("", "a mapping of decision log settings")
    assert len(Settings(None)) == 0
