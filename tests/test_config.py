"""Configuration: validation errors name the key path; env overrides; the embedded default."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from guard.cli import build_parser, main, override_flag, serve_environment
from guard.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ENV_OVERRIDES,
    MAX_CONFIG_BYTES,
    TRANSPORT_HEADROOM,
    GuardConfig,
    load_config,
    load_default_config,
    parse_config,
)
from guard.errors import ConfigError


def test_embedded_default_is_valid() -> None:
    config = load_default_config(env={})
    assert config.server.listen.startswith("unix://")
    assert config.server.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    # The default fits a [512, 8192] F32 batch.
    assert config.server.max_message_bytes >= 512 * 8192 * 4
    assert config.source == "<embedded default>"


def test_empty_file_gives_defaults() -> None:
    config = parse_config("", env={})
    assert config.logging.level == "info"
    assert config.saes == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: [1]", "server: expected a mapping, found [1]"),
        ("server: {listne: x}", "server.listne: expected one of the keys"),
        ("server: {max_message_bytes: -3}",
         "server.max_message_bytes: expected a positive integer, found -3"),
        ("server: {max_message_bytes: '32MB'}",
         "server.max_message_bytes: expected a positive integer, found '32MB'"),
        ("server: {listen: 'not an address'}",
         "server.listen: expected unix:///path/to.sock or host:port"),
        ("server: {reflection: 'yes'}", "server.reflection: expected true or false"),
        ("server: {max_segments_per_batch: 0}",
         "server.max_segments_per_batch: expected a positive integer, found 0"),
        ("server: {max_requests_per_stream: many}",
         "server.max_requests_per_stream: expected a positive integer, found 'many'"),
        ("server: {drain_grace_seconds: -1}", "server.drain_grace_seconds: expected a number >= 0"),
        ("logging: {level: loud}", "logging.level: expected one of debug, info, warning, error"),
        ("saes: {path: x}", "saes: expected a list of SAE entries"),
        ("saes: [{hook: blocks.1.hook_resid_post}]", "saes[0].path: expected the path"),
        ("saes: [{path: a}, {path: b, sha256: abc}]",
         "saes[1].sha256: expected 64 hex characters"),
        ("saes: [{path: a, features: [1, -2]}]",
         "saes[0].features: expected 'all' or a list of feature ids"),
        ("saes: [{path: a, hook: 'blocks 1'}]", "saes[0].hook: expected a hook name"),
        ("saes: [{path: a, dtype: fp8}]", "saes[0].dtype: expected one of auto, fp32"),
        ("saes: [{path: a, featurs: all}]", "saes[0].featurs: expected one of the keys"),
        ("bogus: 1", "bogus: expected one of the keys"),
        ("server: {listen: [unclosed", "<file>: expected valid YAML at line 1"),
        ("- just\n- a list", "<top level>: expected a mapping"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"guard.yaml: {message}")):
        parse_config(text, source="guard.yaml", env={})


def test_error_names_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("logging: {level: loud}", source="/etc/guard/guard.yaml", env={})
    assert str(info.value).startswith("/etc/guard/guard.yaml: logging.level:")


def test_env_overrides_apply_and_are_validated() -> None:
    env = {"GUARD_LISTEN": "127.0.0.1:7000", "GUARD_LOG_LEVEL": "DEBUG"}
    config = parse_config("server: {listen: 'unix:///x.sock'}", env=env)
    assert config.server.listen == "127.0.0.1:7000"
    assert config.logging.level == "debug"
    with pytest.raises(ConfigError, match=r"logging\.level"):
        parse_config("", env={"GUARD_LOG_LEVEL": "chatty"})


def test_relative_sae_paths_resolve_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "guard.yaml").write_text(
        "saes:\n  - path: saes/layer6\n    features: [3, 1, 3]\n"
    )
    config = load_config(tmp_path / "guard.yaml", env={})
    assert config.saes[0].path == tmp_path.resolve() / "saes" / "layer6"
    assert config.saes[0].features == (1, 3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a readable configuration file"):
        load_config(tmp_path / "nope.yaml")


def test_config_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("server: {listen: '127.0.0.1:0'}\n")
    assert main(["config", "check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {max_message_bytes: 0}\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: server.max_message_bytes: expected a positive integer, found 0" in err


def test_serve_flags_override_the_environment_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("server: {listen: 'unix:///tmp/file.sock'}\nlogging: {level: warning}\n")
    monkeypatch.setenv("GUARD_LISTEN", "unix:///tmp/env.sock")
    monkeypatch.setenv("GUARD_LOG_LEVEL", "error")
    monkeypatch.delenv("GUARD_METRICS_LISTEN", raising=False)
    args = build_parser().parse_args(["serve", "--config", str(config), "--listen",
                                      "127.0.0.1:7000", "--metrics-listen", "127.0.0.1:0"])
    loaded = load_config(config, env=serve_environment(args))
    assert loaded.server.listen == "127.0.0.1:7000"  # the flag, over the variable and the file
    assert loaded.logging.level == "error"  # no flag: the variable, over the file
    assert loaded.telemetry.metrics_listen == "127.0.0.1:0"


def test_serve_help_documents_a_flag_for_every_environment_override(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for variable, (section, key) in ENV_OVERRIDES.items():
        assert f"{override_flag(variable)} " in text
        assert f"{section}.{key} (environment: {variable})" in text
    assert "--listen ADDRESS" in text and "--log-level LEVEL" in text


def test_a_bad_flag_value_names_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--log-level", "loud"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "logging.level: expected one of debug, info, warning, error, found 'loud'" in err


def test_the_continuous_batching_limits_are_read() -> None:
    config = parse_config(
        "server: {max_segments_per_batch: 64, max_requests_per_stream: 100}", env={})
    assert (config.server.max_segments_per_batch, config.server.max_requests_per_stream) == (
        64, 100)


_ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 600, "nesting deeper than 32 levels"),
        ("server:\n  max_message_bytes: " + "9" * 5000,
         "line 2, column 22, found 'cannot read this value (Exceeds the limit"),
        (_ALIAS_BOMB, "values with its aliases expanded"),
        ("a: " + "x" * (MAX_CONFIG_BYTES + 1), f"at most {MAX_CONFIG_BYTES} bytes"),
        ("server: {max_message_bytes: 1099511627776}",
         "server.max_message_bytes: expected at most 1073741823"),
    ],
    ids=["600-nested-lists", "5000-digit-int", "alias-bomb", "over-size-cap", "1-TiB-message"],
)
def test_hostile_yaml_is_a_bounded_config_error(text: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="bad.yaml", env={})
    assert time.monotonic() - start < 2
    assert message in str(caught.value)
    assert str(caught.value).startswith("bad.yaml: ")
    assert len(str(caught.value)) < 500
    assert "\n" not in str(caught.value)


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"{re.escape(str(big))}: <file>: expected a "
                       f"configuration file of at most {MAX_CONFIG_BYTES} bytes"):
        load_config(big, env={})


def test_the_largest_message_grpc_takes_passes() -> None:
    limit = (2**31 - 1) // TRANSPORT_HEADROOM
    assert parse_config(f"server: {{max_message_bytes: {limit}}}",
                        env={}).server.max_message_bytes == limit
    with pytest.raises(ConfigError, match="max_message_bytes"):
        parse_config(f"server: {{max_message_bytes: {limit + 1}}}", env={})


def test_ordinary_anchors_and_nesting_still_load() -> None:
    text = ("plugins:\n  config:\n    p: &shared {a: {b: {c: [1, [2, [3]]]}}}\n"
            "    q: *shared\n")
    config = parse_config(text, env={})
    assert config.plugins.config["q"] == config.plugins.config["p"]


def test_an_empty_file_means_defaults_at_start_but_is_refused_on_reload(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert load_config(empty, env={}).saes == ()
    with pytest.raises(ConfigError, match="an empty file is refused on reload"):
        load_config(empty, env={}, allow_empty=False)
    empty.write_text("{}\n")
    assert load_config(empty, env={}, allow_empty=False).saes == ()


def test_found_values_are_cut_in_error_messages() -> None:
    long = ConfigError("k", "a short string", "x" * 100_000)
    assert len(str(long)) < 300
    huge = ConfigError("k", "a small integer", 10**5000)
    assert "an integer of about 5001 digits" in str(huge)
    nested = ConfigError("k", "a number", [[list(range(1000))] * 1000])
    assert len(str(nested)) < 300


@pytest.mark.parametrize(
    "text",
    ["[" * 600, "server:\n  max_message_bytes: " + "9" * 5000,
     "server: {max_message_bytes: 1099511627776}"],
    ids=["nested", "digits", "1-TiB"],
)
def test_serve_with_a_bad_config_prints_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["serve", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_config_check_refuses_a_1_tib_message(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {max_message_bytes: 1099511627776}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "server.max_message_bytes: expected at most" in capsys.readouterr().err


def test_a_rejected_reload_keeps_the_old_config(tmp_path: Path) -> None:
    from guard.sidecar.reload import ConfigReloader

    class Engine:
        def __init__(self) -> None:
            self.configs: list[GuardConfig] = []

        def reload(self, config: GuardConfig) -> None:
            self.configs.append(config)

    file = tmp_path / "guard.yaml"
    file.write_text("plugins: {config: {p: {v: 1}}}\n")
    engine = Engine()
    reloader = ConfigReloader(engine, file, load_config(file, env={}), env={})  # type: ignore[arg-type]
    for bad in ("[" * 600, "plugins: {trace: " + "9" * 5000 + "}", _ALIAS_BOMB, ""):
        file.write_text(bad)
        assert reloader.reload("test") is False
    assert engine.configs == []
    file.write_text("plugins: {config: {p: {v: 2}}}\n")
    assert reloader.reload("test") is True
    assert engine.configs[-1].plugins.config["p"] == {"v": 2}


def test_a_reload_that_raises_anything_is_rejected(tmp_path: Path) -> None:
    from guard.sidecar.reload import ConfigReloader

    class Engine:
        def reload(self, config: GuardConfig) -> None:
            raise RuntimeError("boom")

    file = tmp_path / "guard.yaml"
    file.write_text("{}\n")
    reloader = ConfigReloader(Engine(), file, load_config(file, env={}), env={})  # type: ignore[arg-type]
    assert reloader.reload("test") is False
