"""The task files a run hashes (run.json): a changed one is noticed on resume (see pipeline._changes)."""

from pathlib import Path

from tiny_models import write_copy_task

from mergekit_evolve.evaluate.suite import TaskSuite
from mergekit_evolve.recipe.evolve_settings import EvolveSettings


def suite(folder: Path) -> TaskSuite:
    settings = EvolveSettings.model_validate(
        {"objectives": [{"task": "tiny_copy", "heldout_task": "tiny_copy_heldout"}], "task_paths": ["tasks"]})
    return TaskSuite(settings, folder)


def test_included_yaml_and_function_helpers_are_hashed_with_the_task(tmp_path):
    tasks = write_copy_task(tmp_path)
    yaml = tasks / "tiny_copy.yaml"
    # the metric list moves to a shared file the task includes, and its docs pass through a helper
    text = yaml.read_text()
    head, metrics = text.split("metric_list:")
    (tasks / "_metrics.yaml").write_text("metric_list:" + metrics)
    (tasks / "utils.py").write_text("def process(docs):\n    return docs\n")
    yaml.write_text("include: _metrics.yaml\n" + head + "process_docs: !function utils.process\n")
    files = suite(tmp_path).files()
    assert {"tasks/tiny_copy.yaml", "tasks/_metrics.yaml", "tasks/utils.py", "data/copy_search.jsonl"} <= set(files)

    (tasks / "_metrics.yaml").write_text("metric_list:" + metrics.replace("higher_is_better: true",
                                                                          "higher_is_better: true\n"))
    (tasks / "utils.py").write_text("def process(docs):\n    return docs  # edited\n")
    changed = suite(tmp_path).files()
    assert {f for f in files if files[f] != changed[f]} == {"tasks/_metrics.yaml", "tasks/utils.py"}
