"""Site files, policies and secret references."""

from __future__ import annotations

from pathlib import Path

import pytest

from standby.core.config import (
    Policy,
    SecretRef,
    SiteOptions,
    get_site,
    load_policy,
    load_site_file,
    parse_duration,
    resolve_secret,
)
from standby.core.errors import AuthError, ConfigError, NotFound


class Opts(SiteOptions):
    uri: str
    password: SecretRef | None = None


def site(tmp_path: Path, text: str, name: str = "s1") -> Path:
    (tmp_path / "sites").mkdir(exist_ok=True)
    path = tmp_path / "sites" / f"{name}.toml"
    path.write_text(text)
    return path


def test_site_keys_are_validated_with_one_line_errors(tmp_path: Path) -> None:
    s = load_site_file(site(tmp_path, 'plugin = "x"\nuri = "a://b"\nbogus = 1\n'))
    with pytest.raises(ConfigError, match=r"s1.toml: unknown key 'bogus'"):
        s.options(Opts)
    s = load_site_file(site(tmp_path, 'plugin = "x"\n'))
    with pytest.raises(ConfigError, match=r"missing key 'uri'"):
        s.options(Opts)
    with pytest.raises(ConfigError, match=r"missing key 'plugin'"):
        load_site_file(site(tmp_path, 'uri = "a://b"\n'))
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_site_file(site(tmp_path, "plugin = \n"))


def test_literal_secrets_are_refused_and_never_echoed(tmp_path: Path) -> None:
    s = load_site_file(site(tmp_path, 'plugin = "x"\nuri = "a://b"\npassword = "hunter2"\n'))
    with pytest.raises(ConfigError) as exc:
        s.options(Opts)
    assert "secret reference" in str(exc.value) and "hunter2" not in str(exc.value)


def test_secret_references_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_TEST_SECRET", "s3cret")
    assert resolve_secret("env:SB_TEST_SECRET") == "s3cret"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert resolve_secret(f"file:{f}") == "from-file"
    with pytest.raises(AuthError, match="env:SB_NOPE is not set"):
        resolve_secret("env:SB_NOPE")
    with pytest.raises(AuthError, match="cannot be read"):
        resolve_secret(f"file:{tmp_path / 'missing'}")


def test_unknown_site_names_the_known_ones(tmp_path: Path) -> None:
    site(tmp_path, 'plugin = "x"\n', "alpha")
    with pytest.raises(NotFound, match=r"unknown site 'beta' \(configured: alpha\)"):
        get_site("beta", tmp_path)


def test_policy_files_and_durations(tmp_path: Path) -> None:
    assert parse_duration("15m") == 900 and parse_duration("7d") == 604800
    with pytest.raises(ConfigError):
        parse_duration("soon")
    assert load_policy("default", tmp_path) == Policy()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "gold.toml").write_text('rpo = "1m"\nretain = 48\n')
    gold = load_policy("gold", tmp_path)
    assert gold.rpo_seconds == 60 and gold.retain_count == 48
    (tmp_path / "policies" / "bad.toml").write_text('rpo = "1m"\nspeed = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'speed'"):
        load_policy("bad", tmp_path)
    with pytest.raises(NotFound):
        load_policy("silver", tmp_path)
    with pytest.raises(ConfigError, match="at least 1"):
        Policy(retain_count=0).checked()


def test_schema_head_constant_matches_alembic() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from standby.core.state.db import MIGRATIONS, SCHEMA_HEAD

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD


def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    """`url` for `uri`: the unknown key and the one it was meant to be, not only 'missing'."""
    s = load_site_file(site(tmp_path, 'plugin = "x"\nurl = "qemu:///system"\n'))
    with pytest.raises(ConfigError, match=r"s1.toml: unknown key 'url' \(did you mean 'uri'\?\)$"):
        s.options(Opts)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "typo.toml").write_text("retian = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'retian' \(did you mean 'retain'\?\)"):
        load_policy("typo", tmp_path)


def test_an_unset_secret_names_the_site_file_and_key_never_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Secretive(SiteOptions):
        uri: str
        password: SecretRef

    monkeypatch.delenv("SB_NOPE", raising=False)
    opts = load_site_file(
        site(tmp_path, 'plugin = "x"\nuri = "a://b"\npassword = "env:SB_NOPE"\n')
    ).options(Secretive)
    with pytest.raises(AuthError) as err:
        opts.secret("password")
    assert str(err.value) == (
        f"secret env:SB_NOPE ({tmp_path}/sites/s1.toml: key 'password') is not set in the "
        "environment"
    )
    monkeypatch.setenv("SB_NOPE", "hunter2")
    assert opts.secret("password") == "hunter2"
