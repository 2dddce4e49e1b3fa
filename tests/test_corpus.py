"""Bad, damaged and unusual inputs (``tests/corpus.py``), each run as a real command line.

The whole corpus runs once per session, in parallel, and every case is checked for its
documented exit code, one ``error:`` line, no traceback, no hang, nothing left behind and an
untouched input (see ``tests/corpus.py``). The checker itself is tested on made-up outcomes.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.corpus import Case, Outcome, check, corpus, corpus_env, run_corpus, snapshot, table

CI_BUDGET_S = 300.0  # the issue's limit for the corpus on 2 cores
WORKERS = os.cpu_count() or 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ran(tmp_path_factory, gpen256_file):
    """(corpus, outcomes with their problems, wall seconds, the run's environment), made once."""
    root = tmp_path_factory.mktemp("corpus")
    weights_hash = _sha256(gpen256_file)
    env = corpus_env(root)
    with corpus(root / "cases", gpen256_file) as generated:
        start = time.monotonic()
        outcomes = run_corpus(generated.cases, env, workers=WORKERS)
        wall = time.monotonic() - start
        checked = [(o, check(o)) for o in outcomes]
    print(f"\ncorpus: {len(outcomes)} cases in {wall:.1f} s wall, "
          f"{sum(o.cpu_seconds for o in outcomes):.1f} s CPU, {WORKERS} at a time")
    print(table(checked))
    return generated, checked, wall, env, weights_hash == _sha256(gpen256_file)


def test_every_case_behaves_as_documented(ran):
    _, checked, _, _, _ = ran
    failing = [(o, p) for o, p in checked if p]
    if failing:
        pytest.fail(f"{len(failing)} of {len(checked)} cases misbehave:\n{table(failing)}", pytrace=False)


def test_corpus_covers_the_issue(ran):
    generated, _, _, _, _ = ran
    cases = generated.cases
    assert len(cases) >= 60, f"only {len(cases)} cases"
    assert {c.code for c in cases} >= {0, 1, 2, 3, 4, 5, 6}
    assert {c.kind for c in cases} >= {
        "unusable input", "damaged video", "damaged image", "unusual size", "unusual image",
        "unusual name", "output cannot be written", "disk full", "weights problem", "bad option",
        "device unavailable", "folder",
    }, f"kinds: {sorted({c.kind for c in cases})}; skipped: {generated.skipped}"
    assert not generated.skipped, f"this machine could not stage: {generated.skipped}"


def test_no_temporary_file_outlives_a_run_and_the_weights_stay_as_they_were(ran):
    """Every run had the same private TMPDIR. torch makes its compile-cache folder there on
    import (empty, reused): that is a cache, not something a run left behind."""
    _, _, _, env, weights_unchanged = ran
    left = [n for n in os.listdir(env["TMPDIR"]) if not n.startswith("torchinductor_")]
    assert left == [], f"left in the temporary folder by the runs: {left}"
    assert weights_unchanged


def test_corpus_fits_the_ci_budget(ran):
    """CPU seconds spread over the workers: the wall time on idle cores, whatever else runs here."""
    _, checked, wall, _, _ = ran
    cpu = sum(o.cpu_seconds for o, _ in checked)
    assert cpu / WORKERS < CI_BUDGET_S, f"{cpu:.0f} CPU s on {WORKERS} cores (wall here {wall:.0f} s)"


# --------------------------------------------------------------------------- the checker


@pytest.fixture
def made_up(tmp_path) -> tuple[Case, dict]:
    """A failing case (exit 3) whose folder holds its input, and that folder's snapshot."""
    (tmp_path / "in.mp4").write_bytes(b"input bytes")
    case = Case("made-up", "unusable input", tmp_path, ("in.mp4",), 3, message="in.mp4")
    return case, snapshot(tmp_path)


def _outcome(case: Case, before: dict, code: int | None, stderr: str) -> Outcome:
    return Outcome(case, code, stderr, 1.0, 1.0, before, snapshot(case.folder))


def test_checker_passes_a_clean_failure(made_up):
    case, before = made_up
    assert check(_outcome(case, before, 3, "error: input in.mp4 is not a video\n")) == []


@pytest.mark.parametrize(
    "code, stderr, damage, expected",
    [
        (4, "error: in.mp4 bad\n", None, "exit 4, documented 3"),
        (3, "error: in.mp4 bad\nerror: again\n", None, "2 error lines, expected 1"),
        (3, "", None, "0 error lines, expected 1"),
        (3, "usage: gpen-video [-h]\ngpen-video: error: in.mp4 bad\n", None, "usage printed"),
        (3, "Traceback (most recent call last):\nerror: in.mp4\n", None, "traceback"),
        (3, "error: something else\n", None, "does not match"),
        (3, "error: in.mp4: check free disk space\n", None, "blames disk space"),
        (None, "", None, "hang"),
        (3, "error: in.mp4 bad\n", lambda f: (f / ".in.mp4.tmp-1.mp4").write_bytes(b""), "left behind"),
        (3, "error: in.mp4 bad\n", lambda f: (f / "in.mp4").write_bytes(b"changed"), "changed or removed"),
        (3, "error: in.mp4 bad\n", lambda f: (f / "in.mp4").unlink(), "changed or removed"),
    ],
    ids=["code", "two-errors", "no-error", "usage", "traceback", "message", "disk-space", "hang", "leftover",
         "input-written", "input-deleted"],
)
def test_checker_catches(made_up, code, stderr, damage, expected):
    case, before = made_up
    if damage:
        damage(case.folder)
    problems = check(_outcome(case, before, code, stderr))
    assert any(expected in p for p in problems), problems


def test_checker_on_success_checks_outputs_and_warnings(made_up):
    case, before = made_up
    case = replace(case, code=0, outputs=("out.png",), size=(8, 6), warning="damaged")
    cv2.imwrite(str(case.folder / "out.png"), np.zeros((6, 8, 3), np.uint8))
    os.chmod(case.folder / "out.png", 0o666 & ~_umask())
    assert check(_outcome(case, before, 0, "warning: in.mp4 is damaged: 2 of 6 frames\n")) == []

    assert any("is required" in p for p in check(_outcome(replace(case, warned=True), before, 0, "")))
    problems = check(_outcome(case, before, 0, "warning: a\nwarning: b\n"))
    assert any("2 warning(s)" in p for p in problems), problems
    os.chmod(case.folder / "out.png", 0o600)
    assert any("mode 600" in p for p in check(_outcome(case, before, 0, ""))), "private mode not caught"
    cv2.imwrite(str(case.folder / "out.png"), np.zeros((7, 8, 3), np.uint8))
    os.chmod(case.folder / "out.png", 0o666 & ~_umask())
    assert any("8x7" in p for p in check(_outcome(case, before, 0, ""))), "wrong size not caught"
    (case.folder / "out.png").write_bytes(b"not an image")
    assert any("does not decode" in p for p in check(_outcome(case, before, 0, "")))
    (case.folder / "out.png").unlink()
    assert any("missing output" in p for p in check(_outcome(case, before, 0, "")))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checker_requires_lost_frames_to_be_counted(made_up):
    from tests.clips import make_clip

    case, before = made_up
    case = replace(case, code=0, outputs=("out.mkv",), size=(32, 16), frames=5, warning="damaged")
    make_clip(case.folder / "out.mkv", frames=3, size=(32, 16), audio_tracks=0)
    os.chmod(case.folder / "out.mkv", 0o666 & ~_umask())
    quiet = check(_outcome(case, before, 0, ""))
    assert any("2 of 5 frames lost without a warning" in p for p in quiet), quiet
    counted = "warning: in.mkv is damaged: 2 of about 5 frames could not be decoded\n"
    assert check(_outcome(case, before, 0, counted)) == []
    miscounted = check(_outcome(case, before, 0, counted.replace("2 of", "4 of")))
    assert any("counts 4 lost frames, 2 were" in p for p in miscounted), miscounted
