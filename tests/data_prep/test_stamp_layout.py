"""The stamp tests cannot tell which Debian release's Tux Paint package they run on.

Debian 12 and 13 ship different ``tuxpaint-stamps-default`` trees (folders, counts, captions). This
test makes a copy of the stamps on disk that no release has: every folder moved and renamed, a
seventh of the caption files and an eleventh of the images removed. It then runs every test file
that reads stamps against the copy (``CLIPFORGE_TEST_STAMPS``, see :mod:`tests.stamps`); they must
pass there as they do on the real tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests import stamps

REPO = Path(__file__).resolve().parents[2]
# Every test file that reads the stamps tree (the build tests through the small build's stamp folder).
STAMP_TESTS = ["test_prep_sources.py", "test_prep_build.py", "test_prep_filters.py", "test_prep_image_stages.py",
               "test_prep_text_filters.py", "test_prep_bad_input.py", "test_prep_sources_io.py",
               "test_prep_http_build.py", "test_prep_download.py"]


def rearranged_copy(src: Path, dest: Path) -> dict[str, int]:
    """Copy ``src`` to ``dest`` with folder ``a/b/c`` moved to ``c-set/b-a`` (a folder's files stay
    together, as Tux Paint's variant captions need), every 7th caption file and every 11th image left
    out (path order). Returns what was left out."""
    hidden = {"txt": 0, "png": 0}
    seen = {"txt": 0, "png": 0}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        kind = path.suffix.lstrip(".")
        if kind in seen:
            seen[kind] += 1
            if seen[kind] % (7 if kind == "txt" else 11) == 0:
                hidden[kind] += 1
                continue
        parts = path.relative_to(src).parent.parts
        folder = Path(f"{parts[-1]}-set", "-".join(reversed(parts[:-1])) or "top") if parts else Path("top-set")
        target = dest / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return hidden


def test_stamp_tests_pass_on_a_tree_no_release_has(tmp_path: Path) -> None:
    copy = tmp_path / "stamps"
    hidden = rearranged_copy(stamps.ROOT, copy)
    assert hidden["txt"] > 0 and hidden["png"] > 0
    original = {p.name for p in stamps.ROOT.iterdir()}
    assert not original & {p.name for p in copy.iterdir()}  # no top-level folder where it was
    env = {**os.environ, "CLIPFORGE_TEST_STAMPS": str(copy)}
    files = [f"tests/data_prep/{name}" for name in STAMP_TESTS]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"stamp tests failed on the rearranged copy {copy}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout
