"""gpen-video: restore faces in videos with GPEN, keeping everything else intact."""

__version__ = "0.1.0"

from gpen_video.config import Config, load_config  # noqa: E402
from gpen_video.errors import GpenVideoError  # noqa: E402

__all__ = ["Config", "GpenVideoError", "__version__", "load_config"]
