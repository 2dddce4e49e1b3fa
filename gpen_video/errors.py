"""Typed errors. The library raises these; only the CLI formats them for people.

Every message is one sentence a user can act on: what went wrong, with which file,
and what to do. Each class also inherits the matching built-in so callers that catch
``OSError`` or ``ValueError`` keep working.
"""

from __future__ import annotations


class GpenVideoError(Exception):
    """Base class of every error gpen-video raises on purpose."""

    exit_code = 1


class ConfigError(GpenVideoError, ValueError):
    """A preset file or option is invalid (unknown key, wrong type, out of range)."""

    exit_code = 2


class InputError(GpenVideoError, OSError):
    """The input cannot be used: missing, empty, not media, no video stream."""

    exit_code = 3


class DecodeError(GpenVideoError, OSError):
    """The input opened but could not be decoded far enough to do the job."""

    exit_code = 3


class OutputError(GpenVideoError, OSError):
    """The output cannot be written: exists without -y, equals the input, bad container."""

    exit_code = 4


class EncodeError(GpenVideoError, OSError):
    """The encoder or muxer failed while writing the output."""

    exit_code = 4


class StreamCopyError(OutputError):
    """A non-video stream cannot be copied into the chosen container (raised with --strict)."""


class WeightsError(GpenVideoError, OSError):
    """Model weights are missing, corrupt, of the wrong preset, or cannot be downloaded."""

    exit_code = 5


class DownloadError(WeightsError):
    """A download failed (no network, HTTP error, truncated transfer)."""


class DeviceError(GpenVideoError, RuntimeError):
    """The requested compute device is not available."""

    exit_code = 6


class Cancelled(GpenVideoError):
    """The job was stopped on request (a progress callback, a cancel event, Ctrl-C or a signal).

    Nothing is left behind: the output and the report are written only by a finished job.
    ``signal`` is the signal number when a signal stopped it; the exit code is then 128 + it.
    """

    exit_code = 130

    def __init__(self, message: str = "the job was cancelled; nothing was written", *, signal: int | None = None):
        super().__init__(message)
        self.signal = signal
        if signal is not None:
            self.exit_code = 128 + signal


def describe(exc: BaseException, details: str | None = None) -> str:
    """The one line a person is shown for ``exc``: a GpenVideoError's own sentence; anything
    else is a bug, named as unexpected, with where ``details`` are (a log, ``--debug``).

    >>> describe(InputError("input a.mp4 does not exist; check the path"))
    'input a.mp4 does not exist; check the path'
    >>> describe(KeyError("x"), "run again with --debug for details")
    "unexpected KeyError: 'x' (run again with --debug for details)"
    """
    if isinstance(exc, GpenVideoError):
        return str(exc)
    line = f"unexpected {type(exc).__name__}: {exc}"
    return f"{line} ({details})" if details else line
