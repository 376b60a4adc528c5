"""Settings precedence: defaults < TOML config file < RAGPT_* environment < explicit arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragpt.config import Settings, load_settings
from ragpt.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No RAGPT_* variable from the caller's shell, and a cwd without ragpt.toml."""
    import os

    for key in list(os.environ):
        if key.startswith("RAGPT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _toml(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def test_defaults_without_file_or_env():
    s = load_settings()
    d = Settings.model_fields
    assert s.k == d["k"].default
    assert s.chunk_tokens == d["chunk_tokens"].default
    assert s.index_dir == Path("indexes")
    assert s.dense and s.bm25


def test_defaults_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_settings().cache_dir == tmp_path / "xdg" / "ragpt"


def test_toml_in_cwd_overrides_defaults(tmp_path):
    _toml(tmp_path / "ragpt.toml", 'k = 7\nindex_dir = "from-file"\nbm25 = false\n')
    s = load_settings()
    assert (s.k, s.index_dir, s.bm25) == (7, Path("from-file"), False)
    assert s.chunk_tokens == Settings.model_fields["chunk_tokens"].default  # untouched keys keep defaults


def test_ragpt_config_env_names_the_file(monkeypatch, tmp_path):
    _toml(tmp_path / "ragpt.toml", "k = 7\n")  # ignored: RAGPT_CONFIG points elsewhere
    other = _toml(tmp_path / "elsewhere.toml", "k = 9\n")
    monkeypatch.setenv("RAGPT_CONFIG", str(other))
    assert load_settings().k == 9


def test_env_overrides_file(monkeypatch, tmp_path):
    _toml(tmp_path / "ragpt.toml", 'k = 7\nmax_new_tokens = 50\nembedder = "file-embedder"\n')
    monkeypatch.setenv("RAGPT_K", "11")
    monkeypatch.setenv("RAGPT_EMBEDDER", "env-embedder")
    s = load_settings()
    assert (s.k, s.embedder, s.max_new_tokens) == (11, "env-embedder", 50)


def test_explicit_arguments_override_env_and_file(monkeypatch, tmp_path):
    _toml(tmp_path / "ragpt.toml", "k = 7\ntemperature = 0.5\nthreads = 3\n")
    monkeypatch.setenv("RAGPT_K", "11")
    monkeypatch.setenv("RAGPT_TEMPERATURE", "0.7")
    s = load_settings(k=13, temperature=None, threads=None)  # None: a flag the user did not give
    assert (s.k, s.temperature, s.threads) == (13, 0.7, 3)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"chunk_tokens": 64, "chunk_overlap": 64}, "chunk_overlap"),
        ({"chunk_tokens": 64, "chunk_overlap": 100}, "chunk_overlap"),
        ({"bf16": "maybe"}, "bf16"),
        ({"k": 0}, "k"),
        ({"dense": False, "bm25": False}, "dense"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_arguments_raise_config_error_naming_the_problem(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(**kwargs)


def test_invalid_value_in_file_raises_config_error(tmp_path):
    _toml(tmp_path / "ragpt.toml", "chunk_tokens = 32\nchunk_overlap = 40\n")
    with pytest.raises(ConfigError, match="chunk_overlap") as e:
        load_settings()
    assert "ragpt.toml" in str(e.value)


def test_invalid_value_in_env_raises_config_error(monkeypatch):
    monkeypatch.setenv("RAGPT_BF16", "sometimes")
    with pytest.raises(ConfigError, match="bf16"):
        load_settings()


def test_valid_bf16_values_are_accepted_and_normalised():
    for v in ("auto", "ON", "off", "True", "0"):
        assert load_settings(bf16=v).bf16 == v.lower()


def test_missing_ragpt_config_file_raises_config_error(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "ragpt.toml"
    monkeypatch.setenv("RAGPT_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="nope"):
        load_settings()


def test_malformed_toml_raises_config_error(tmp_path):
    _toml(tmp_path / "ragpt.toml", "k = [unclosed\n")
    with pytest.raises(ConfigError, match="ragpt.toml"):
        load_settings()
