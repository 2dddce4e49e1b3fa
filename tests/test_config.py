import sys
from pathlib import Path

import pytest

from gpen_video.config import CONFIG_DIR, Config, load_config
from gpen_video.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_every_shipped_preset_loads(name):
    """Every key of the preset file reaches the Config with its value, whatever its section."""
    data = tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    keys = {}
    for key, value in data.items():
        keys.update(value if isinstance(value, dict) else {key: value})
    config = load_config(name)
    assert keys, f"{name}.toml sets nothing"
    assert {k: getattr(config, k.replace("-", "_")) for k in keys} == keys
    assert config != Config()


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


def test_skip_tracks_from_toml_and_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("skip_tracks = [3, 7]\n")
    assert load_config(path).skip_tracks == (3, 7)
    path.write_text("skip_tracks = ['x']\n")
    with pytest.raises(ConfigError, match="list of whole numbers"):
        load_config(path)
    with pytest.raises(ConfigError, match="skip_tracks"):
        Config(skip_tracks=(-1,))


def test_cli_only_switches_are_not_job_settings():
    names = set(Config.__dataclass_fields__)
    assert not names & {"quiet", "debug", "overwrite", "single_pass", "lookahead"}


def test_an_installed_wheel_ships_and_finds_the_presets(tmp_path):
    """``pip install .`` (not editable) must carry configs/ and find it from anywhere."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"), str(root)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("gpen_video-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"gpen_video/configs/{p.name}" for p in (root / "configs").glob("*.toml")} <= names
    packages = {p.parent.relative_to(root).as_posix() for p in (root / "gpen_video").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names, "a subpackage is missing from pyproject's list"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import gpen_video.config as c; print(c.__file__); print(c.load_config('fast').model)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, model = done.stdout.split()
    assert Path(where).is_relative_to(site), where
    assert model == "GPEN-BFR-256"
