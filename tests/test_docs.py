"""The documentation site: it builds with broken links and anchors as errors, and every figure it quotes is one
that benchmarks/RESULTS.md records (results live there only)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Numbers in the prose that are settings or facts of the hardware, not measurements.
NOT_FIGURES = {
    "compression.md": {"0.001", "8.9"},  # the loss allocation's step of sparsity; FP8's compute capability
}


def _figures(text: str) -> list[str]:
    """Decimal numbers outside code: the figures a page quotes."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text)


def test_every_quoted_figure_is_in_results() -> None:
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    missing = {
        page.name: [
            f for f in _figures(page.read_text()) if f not in results and f not in NOT_FIGURES.get(page.name, ())
        ]
        for page in sorted(DOCS.glob("*.md"))
        if not page.is_symlink()
    }
    assert {k: v for k, v in missing.items() if v} == {}


def test_the_figure_check_sees_a_figure_that_is_not_recorded() -> None:
    assert _figures("RAC keeps 0.985 ± 0.009 (`sparsity: 0.7`, [x](a.md#b)) at 102.8 tokens") == [
        "0.985",
        "0.009",
        "102.8",
    ]


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs absent")
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    broken = DOCS / "broken.md"
    broken.write_text("# Broken\n\n[nowhere](no-such-page.md) and [no anchor](index.md#no-such-heading)\n")
    try:
        bad = subprocess.run(
            [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True
        )
    finally:
        broken.unlink()
    assert bad.returncode != 0 and "no-such-page.md" in bad.stderr
