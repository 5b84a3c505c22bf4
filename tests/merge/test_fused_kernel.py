"""The fast paths for linear and task_arithmetic give mergekit's own bits, for every dtype and edge case."""

import logging
import random

import pytest
import torch
from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.io.tasks import GatherTensors
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from mergekit_evolve.merge import chunked

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(40013,), (1,), (7,), (130, 33), (3, 5, 7)]  # odd sizes: vectorised bodies and scalar tails
MODELS = [ModelReference.parse(f"model-{i}") for i in range(6)]


def mergekit_task(method: str, count: int, weights: list[float], normalize: bool, lam: float = 1.0, base: int = 0,
                  dtype: str | None = None) -> ExecuteMergeMethodTask:
    """mergekit's own task for one tensor, as its planner builds it."""
    models = MODELS[:count]
    others = [m for i, m in enumerate(models) if method == "linear" or i != base]
    info = WeightInfo(name="weight")
    parameters = {"normalize": normalize} if method == "linear" else {"normalize": normalize, "lambda": lam}

    def per_input(model: ModelReference) -> dict:
        if model not in others:
            return {}
        return {"weight": weights[others.index(model)]} | ({} if method == "linear" else {"density": 1.0})

    return ExecuteMergeMethodTask(
        method_name=method,
        gather_tensors=GatherTensors(weight_info=ImmutableMap(data={m: info for m in models})),
        model_order=tuple(models),
        base_model=None if method == "linear" else models[base],
        output_weight=info,
        parameters=ImmutableMap(data=parameters),
        input_parameters=ImmutableMap(data={m: ImmutableMap(data=per_input(m)) for m in models}),
        dtype=dtype,
    )


def awkward(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Magnitudes across the format's range, with zeros of both signs, subnormals, infinities and NaNs."""
    info = torch.finfo(dtype)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    values *= torch.exp(torch.randn(shape, generator=generator, dtype=torch.float64) * 3)
    special = torch.tensor([0.0, -0.0, info.smallest_normal / 4, -info.smallest_normal * 1.5, info.max,
                            float("inf"), -float("inf"), float("nan")], dtype=torch.float64)
    flat = values.view(-1)
    where = torch.randint(0, flat.numel(), (max(1, flat.numel() // 40),), generator=generator)
    flat[where] = special[torch.randint(0, len(special), (len(where),), generator=generator)]
    return values.to(dtype)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit; NaN payloads excepted, as torch's own NaN bits differ between its vectorised and scalar code."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[got.element_size()]
    assert torch.equal(got.isnan(), expected.isnan())
    keep = ~expected.isnan()
    differ = (got.view(bits) != expected.view(bits)) & keep
    assert not differ.any(), f"{int(differ.sum())} of {got.numel()} differ: {got[differ][:4]} vs {expected[differ][:4]}"


def cases(method: str):
    """(count, weights, normalize, lambda) over 1..4 inputs (task vectors), zero and negative weights,
    weights summing to about zero (mergekit's divisor clamp) and lambda != 1."""
    rng = random.Random(method)
    for count in range(1, 5):
        for normalize in (False, True):
            for lam in (1.0, 0.6) if method == "task_arithmetic" else (1.0,):
                weights = [rng.choice([0.0, -0.35, 1.0, rng.uniform(-2, 2)]) for _ in range(count)]
                yield count, weights, normalize, lam
    yield 2, [0.4, -0.4], True, 1.0
    yield 3, [1e-9, 0.0, -1e-9], True, 1.3
    yield 2, [0.0, 0.0], True, 1.0  # linear divides by a zero sum: inf and NaN, as torch does


@pytest.fixture(params=["fused", "blocked"])
def path(request, monkeypatch):
    monkeypatch.setattr(chunked, "_verdicts", {})
    if request.param == "blocked":
        monkeypatch.setattr(chunked, "_fused", lambda: None)
    elif chunked._fused() is None:
        pytest.skip("numba is not installed for this Python")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_fast_paths_equal_mergekit(path, method, dtype):
    generator = torch.Generator().manual_seed(DTYPES.index(dtype) * 2 + (method == "linear"))
    for index, (count, weights, normalize, lam) in enumerate(cases(method)):
        shape = SHAPES[0] if index == 0 else SHAPES[1 + index % (len(SHAPES) - 1)]
        inputs = count if method == "linear" else count + 1
        base = index % inputs
        task = mergekit_task(method, inputs, weights, normalize, lam, base)
        tensors = {m: awkward(shape, dtype, generator) for m in MODELS[:inputs]}
        expected = task.execute(tensors=tensors)
        merge = chunked.ChunkedMerge(inner=task, chunk_bytes=256)  # many row blocks on the blocked path
        fast = chunked._method(task, list(tensors.values()))
        assert fast is not None
        assert_same(merge.run_into(tensors, None), expected)
        assert chunked._verdicts.get(fast.key, False) is (path == "fused")  # the probe passed: the kernel ran


def test_run_into_writes_a_matching_out_and_ignores_another(monkeypatch):
    task = mergekit_task("linear", 2, [0.3, 0.7], True)
    tensors = {m: torch.randn(40, 9) for m in MODELS[:2]}
    expected = task.execute(tensors=tensors)
    out = torch.full((40, 9), 7.0)
    assert chunked.ChunkedMerge(inner=task).run_into(tensors, out) is out
    assert torch.equal(out, expected)
    for wrong in (torch.zeros(40, 9, dtype=torch.float64), torch.zeros(9, 40), torch.zeros(9, 40).t()):
        before = wrong.clone()
        got = chunked.ChunkedMerge(inner=task).run_into(tensors, wrong)
        assert got is not wrong and torch.equal(got, expected)
        assert torch.equal(wrong, before)
    assert torch.equal(chunked.ChunkedMerge(inner=task).execute(tensors=tensors), expected)
    monkeypatch.setattr(chunked, "_fused", lambda: None)  # the blocked path writes into out too
    out = torch.zeros(40, 9)
    assert chunked.ChunkedMerge(inner=task).run_into(tensors, out) is out and torch.equal(out, expected)


@pytest.mark.skipif(chunked._fused() is None, reason="numba is not installed for this Python")
def test_probe_mismatch_falls_back_to_blocked_torch(monkeypatch, caplog):
    real = chunked._fused().task_arithmetic

    def off_by_one_ulp(base, others, weights, divisor, lam, out):
        real(base, others, weights, divisor, lam, out)
        out.view(torch.int16)[::3] ^= 1

    monkeypatch.setattr(chunked._fused(), "task_arithmetic", off_by_one_ulp)
    monkeypatch.setattr(chunked, "_verdicts", {})
    blocked = []
    torch_block = chunked._TaskArithmetic.torch_block

    def counted(self, blocks, out):
        blocked.append(len(blocks[0]))
        torch_block(self, blocks, out)

    monkeypatch.setattr(chunked._TaskArithmetic, "torch_block", counted)
    task = mergekit_task("task_arithmetic", 3, [0.5, -1.0], True, 0.8)
    tensors = {m: torch.randn(300, 5).to(torch.bfloat16) for m in MODELS[:3]}
    with caplog.at_level(logging.DEBUG, logger=chunked.__name__):
        got = chunked.ChunkedMerge(inner=task, chunk_bytes=1024).run_into(tensors, None)
    assert_same(got, task.execute(tensors=tensors))
    assert "fused kernel differs from torch" in caplog.text
    assert chunked._verdicts == {("task_arithmetic", torch.bfloat16, 3, True, True): False}
    assert len(blocked) > 2  # the probe's one call, then the row blocks


@pytest.mark.parametrize("why", ["mixed dtypes", "a cast", "five task vectors", "a missing input"])
def test_other_calls_run_mergekit_itself(why):
    generator = torch.Generator().manual_seed(3)
    count = 6 if why == "five task vectors" else 3
    task = mergekit_task("task_arithmetic", count, [0.2] * (count - 1), True,
                         dtype="float64" if why == "a cast" else None)
    tensors = {m: awkward((50, 3), torch.float32, generator) for m in MODELS[:count]}
    if why == "mixed dtypes":
        tensors[MODELS[1]] = tensors[MODELS[1]].to(torch.bfloat16)
    if why == "a missing input":
        task = task.model_copy(update={"output_weight": WeightInfo(name="weight", optional=True)})
        del tensors[MODELS[2]]
    assert chunked._method(task, [tensors.get(m) for m in task.model_order]) is None
    assert_same(chunked.ChunkedMerge(inner=task).run_into(tensors, None), task.execute(tensors=tensors))
