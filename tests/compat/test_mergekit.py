"""Pins what compat/mergekit.py relies on in the installed mergekit: an upgrade that moves one fails here."""

from importlib.metadata import version

import transformers
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from packaging.version import Version

from mergekit_evolve.compat import mergekit as compat


def config(base, v1) -> MergeConfiguration:
    return MergeConfiguration.model_validate({"merge_method": "task_arithmetic", "base_model": str(base),
                                              "models": [{"model": str(v1), "parameters": {"weight": 0.5}}]})


def planner(base, v1) -> MergePlanner:
    cfg = config(base, v1)
    options = MergeOptions(device="cpu", quiet=True)
    arch = get_architecture_info(cfg, options)
    return MergePlanner(cfg, arch, options, compat.out_config(cfg, arch))


def test_version_is_the_pinned_range():
    assert Version("0.1.5") <= Version(version("mergekit")) < Version("0.2")


def test_out_config_is_what_run_merge_writes(tiny_llama, tmp_path):
    base, v1, _ = tiny_llama
    cfg = config(base, v1)
    options = MergeOptions(device="cpu", quiet=True)
    run_merge(cfg.model_copy(deep=True), str(tmp_path / "out"), options=options)
    written = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    ours = compat.out_config(cfg, get_architecture_info(cfg, options))
    assert ours.to_dict()["num_hidden_layers"] == written.num_hidden_layers
    assert ours.hidden_size == written.hidden_size and ours.torch_dtype == written.torch_dtype


def test_planner_state_accessors_see_a_plan(tiny_llama):
    plan = planner(*tiny_llama[:2])
    assert compat.planner_method(plan).spec.name == "task_arithmetic"
    assert not compat.planner_merges_tokenizer(plan)
    assert compat.planned_tensors(plan) == []
    compat.plan_all(plan)
    names = [w.name for w, _ in compat.planned_tensors(plan)]
    assert "model.embed_tokens.weight" in names and len(names) == len(set(names))


def test_working_return_tensor_validates_a_plain_task(tiny_llama):
    plan = planner(*tiny_llama[:2])
    compat.plan_all(plan)
    weight, task = compat.planned_tensors(plan)[0]
    compat.WorkingReturnTensor(weight_info=weight, tensor_task=task, dtype=None)


def test_cached_model_configs_reads_each_config_once_and_restores(tiny_llama, monkeypatch):
    base, _, _ = tiny_llama
    original = ModelReference.config
    reads = []
    monkeypatch.setattr(ModelReference, "config",
                        lambda self, trust_remote_code=False: reads.append(self) or original(self))
    patched = ModelReference.config
    cache: dict = {}
    ref = ModelReference.parse(str(base))
    with compat.cached_model_configs(cache):
        first, second = ref.config(), ref.config()
        first.hidden_size = -1  # a copy: mergekit edits the configs it reads
    assert len(reads) == 1 and second.hidden_size != -1
    assert ModelReference.config is patched


def test_loader_cache_is_mergekits_per_process_cache():
    from mergekit.io.tasks import LoaderCache

    options = MergeOptions(device="cpu", quiet=True)
    assert compat.loader_cache(options) is LoaderCache().loaders


def test_genome_tables_cover_the_methods_genome_files_use():
    method_params, genome_definition = compat.genome_tables()
    assert {"linear", "task_arithmetic", "ties", "dare_ties"} <= set(method_params)
    assert "models" in genome_definition.model_fields
    assert "genome" in compat.evol_merge_configuration().model_fields


def test_run_merge_out_config_replaces_the_builder_run_merge_calls_and_restores_it():
    import mergekit.merge

    original = mergekit.merge._model_out_config
    with compat.run_merge_out_config(lambda *args, **kwargs: "built"):
        assert mergekit.merge._model_out_config(None, None) == "built"
    assert mergekit.merge._model_out_config is original
