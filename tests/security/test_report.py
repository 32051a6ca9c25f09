"""docs/security.md publishes the figures of the last `make fuzz`: they must be exactly what its reports say."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "fuzz"))

from report import measured_block, render  # noqa: E402


def test_security_page_shows_exactly_the_kept_reports():
    page = (ROOT / "docs" / "security.md").read_text()
    b, e = measured_block(page)
    data = ROOT / "docs" / "security-data"
    assert sorted(p.name for p in data.glob("*.json")) == sorted(
        ["campaign.json", "crashes.json", "fuzz-report.json", "load.json", "serve-abuse.json"]
    )
    assert page[b:e] == render(data), "docs/security.md was edited by hand: run `make fuzz` (or report.py --update)"
    assert "| **total** |" in page[b:e]
