"""Media in and out, in the order frames flow:

- ``decode``: a video file -> upright RGB ``Frame`` records with exact timestamps.
- ``colour``: stored YUV <-> RGB with the stream's own matrix, exact both ways, and the
  splicing that keeps untouched pixels as decoded.
- ``encode``: ``Frame`` records -> the output video, set up like the source.
- ``streams``: audio, subtitles, data and timecode copied packet for packet beside it.
- ``images``: still images, upright by EXIF orientation, metadata kept.
- ``files``: every file appears whole or not at all; input and output path checks.
"""
