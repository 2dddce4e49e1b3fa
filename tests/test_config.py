from pathlib import Path

import pytest

from gpen_video.config import CONFIG_DIR, Config, load_config
from gpen_video.errors import ConfigError


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_shipped_preset_loads(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert config != Config() or name == "default"


def test_presets_include_the_documented_three():
    assert {"home-video", "fast", "archival"} <= {p.stem for p in CONFIG_DIR.glob("*.toml")}


def test_flags_override_preset_and_none_means_not_given():
    config = load_config("fast", crf=25, model=None)
    assert config.crf == 25
    assert config.model == "GPEN-BFR-256"  # from the preset, not the None flag


@pytest.mark.parametrize(
    "toml, message",
    [
        ("crf = 'high'", "wrong type"),
        ("[output]\nno_such_key = 1", "unknown key 'no_such_key'"),
        ("codec = 'mpeg2'", "codec must be one of"),
        ("strength = 1.5", "strength is out of range"),
        ("detect_size = true", "wrong type"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="home-video"):
        load_config(tmp_path / "nope.toml")


def test_int_accepted_for_float_field(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("strength = 1\nscore_threshold = 0.8\n")
    config = load_config(path)
    assert config.strength == 1.0 and isinstance(config.strength, float)
    assert config.score_threshold == 0.8


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().crf = 3  # type: ignore[misc]
