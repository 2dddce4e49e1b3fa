"""Make ``gpen_video/restore/data/check_faces.png``: the faces the precision guard runs.

    python samples/make_check_faces.py

Two 256×256 crops side by side, aligned on GPEN's five-point template by the shipped
detector: scikit-image's astronaut (a NASA photograph, public domain) sharp, and the same
face degraded (4× down and up, JPEG quality 30) as GPEN usually sees it. They ship in the
package because scikit-image is only a test dependency.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from gpen_video.faces.align import face_affine
from gpen_video.faces.detect import create_detector

OUT = Path(__file__).resolve().parent.parent / "gpen_video" / "restore" / "data" / "check_faces.png"
SIDE = 256


def main() -> int:
    from skimage.data import astronaut

    rgb = astronaut()
    (found,) = create_detector("retinaface-mobile", progress=False).detect([rgb])
    if len(found) != 1:
        print(f"expected one face in the astronaut, found {len(found)}", file=sys.stderr)
        return 1
    affine = face_affine(found.landmarks[0], SIDE)
    sharp = cv2.warpAffine(rgb, affine, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    small = cv2.resize(sharp, (SIDE // 4, SIDE // 4), interpolation=cv2.INTER_AREA)
    blurred = cv2.resize(small, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
    ok, jpeg = cv2.imencode(".jpg", blurred[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
    degraded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]
    strip = np.concatenate([sharp, degraded], axis=1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(OUT), strip[..., ::-1].copy(), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{OUT}: {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
