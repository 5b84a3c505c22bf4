"""The README's demo: the bundled experts merge into a winner that beats each of them on held-out data."""

import json

import pytest
from click.testing import CliRunner

from mergekit_evolve.cli import cli


@pytest.mark.slow
def test_demo_winner_beats_every_source_on_heldout(repo_root, tmp_path):
    run_dir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["run", str(repo_root / "recipes" / "demo.yml"), "-o", str(run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= {"objective", "winner", "sources"}
    assert len(report["sources"]) == 4  # base + three experts
    for name, source in report["sources"].items():
        assert report["winner"]["heldout"] > source["heldout"], (name, report)
    assert "winner" in result.output and "held-out" in result.output  # the closing table
    assert (run_dir / "best" / "model.safetensors").exists()
