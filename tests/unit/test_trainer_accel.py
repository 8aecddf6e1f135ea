"""The GPU path's options on the CPU: training.precision / .compile / .deterministic validated
on both sides and reaching the loop, the run's reproducibility record, the data-placement choice and
the device-side loss sums (trainer/accel.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_testkit import (
    REPO,
    fresh_tracking_uri,
    make_env,
    make_spec,
    prepare_digits,
)

from arf_trainer.errors import SpecError
from arf_trainer.spec import JobSpec
from arf_trainer.trainer import accel, loop
from arf_trainer.trainer.config import TrainConfig
from arf_trainer.trainer.data import load_manifest
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.loaders import open_source
from arf_trainer.trainer.run import run_train

DIGITS_HP = {"epochs": 3, "hidden_size": 32}  # 23 steps an epoch, ~1 s of training
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
ONE = DistEnv(rank=0, local_rank=0, world_size=1, enabled=False)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # bit-identical weights need equal threads
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def train_digits(tmp: Path, name: str, uri: str, epochs: int = 3,
                 **training: Any) -> dict[str, Any]:
    ws = tmp / name
    prepare_digits(ws)
    spec = make_spec("digits_smoke", run_id=f"manual__{name}",
                     hyperparameters={**DIGITS_HP, "epochs": epochs}, training=training)
    result = run_train(make_env(spec, ws, uri, tmp / "artifacts"))
    assert result is not None
    return result


# -- the template (Airflow side) -------------------------------------------------------------

def _template(name: str, old: str, new: str) -> str:
    text = (REPO / "config_templates" / f"{name}.yaml").read_text()
    assert old in text, old
    return text.replace(old, new, 1)


def test_template_accepts_precision_compile_and_deterministic() -> None:
    from arf_training.templates import parse_template

    text = _template("digits_smoke", "  recipe: classifier", "  recipe: classifier\n  "
                     "precision: bf16\n  compile: true\n  deterministic: false\n  "
                     "async_checkpoint: true")
    training = parse_template(text).training
    assert (training.precision, training.compile, training.deterministic,
            training.async_checkpoint) == ("bf16", True, False, True)
    default = parse_template((REPO / "config_templates" / "digits_smoke.yaml").read_text())
    assert (default.training.precision, default.training.compile,
            default.training.deterministic) == ("fp32", False, True)


@pytest.mark.parametrize("name, old, new, fragments", [
    pytest.param("digits_smoke", "  recipe: classifier", "  recipe: classifier\n  precision: fp16",
                 ["training.precision", "'fp16'", "'fp32'", "'bf16'"], id="unknown-precision"),
    pytest.param("digits_smoke", "  recipe: classifier", "  recipe: classifier\n  compile: 'yes'",
                 ["training.compile", "boolean"], id="compile-string"),
    pytest.param("digits_sklearn", "  command:", "  precision: bf16\n  command:",
                 ["training.precision: bf16", "built-in recipes only", "remove them"],
                 id="custom-command"),
    pytest.param("digits_smoke", "  recipe: classifier",
                 "  recipe: classifier\n  deterministic: 'no'",
                 ["training.deterministic", "boolean"], id="deterministic-string"),
    pytest.param("digits_sklearn", "  command:", "  deterministic: false\n  command:",
                 ["training.deterministic: false", "built-in recipes only"], id="custom-nondeterministic"),
    pytest.param("digits_sklearn", "  command:", "  async_checkpoint: true\n  command:",
                 ["training.async_checkpoint: true", "built-in recipes only"], id="custom-async-checkpoint"),
])
def test_template_rejects_bad_precision_and_compile(name: str, old: str, new: str,
                                                    fragments: list[str]) -> None:
    from arf_training.errors import TemplateError
    from arf_training.templates import parse_template

    with pytest.raises(TemplateError) as info:
        parse_template(_template(name, old, new), f"{name}.yaml")
    for fragment in fragments:
        assert fragment in str(info.value)


# -- the trainer's own check of the job spec --------------------------------------------------

@pytest.mark.parametrize("training, fragment", [
    pytest.param({"precision": "fp16"}, "training.precision='fp16' is not one of fp32, bf16",
                 id="precision"),
    pytest.param({"compile": "true"}, "training.compile='true' must be true or false",
                 id="compile"),
    pytest.param({"deterministic": 0}, "training.deterministic=0 must be true or false",
                 id="deterministic"),
])
def test_trainer_rejects_bad_precision_and_compile(training: dict, fragment: str) -> None:
    spec = JobSpec.from_dict(make_spec("digits_smoke", training=training))
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(")):
        TrainConfig.from_spec(spec, 1)


def test_bf16_trains_on_cpu_and_the_record_says_so(tmp_path: Path) -> None:
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    fp32 = train_digits(tmp_path, "fp32", uri, epochs=1)
    bf16 = train_digits(tmp_path, "bf16", uri, epochs=1, precision="bf16")
    again = train_digits(tmp_path, "bf16-again", uri, epochs=1, precision="bf16")
    # Autocast reached the loop (other weights than fp32), and it still learned; a rerun is
    # bit-identical on the CPU (measured: accel.MEASURED).
    assert bf16["weights_sha256"] != fp32["weights_sha256"]
    assert bf16["metrics"]["val_accuracy"] > 0.8
    assert bf16["metrics"]["train_loss"] == pytest.approx(fp32["metrics"]["train_loss"],
                                                          rel=0.05)
    assert again["weights_sha256"] == bf16["weights_sha256"]
    client = mlflow.MlflowClient(uri)
    run = client.get_run(bf16["mlflow_run_id"])
    assert run.data.params["precision"] == "bf16" and run.data.params["compile"] == "False"
    assert run.data.params["data_placement"] == "host"
    assert run.data.tags["arf.data_placement"] == "host (the device is the CPU)"
    assert run.data.tags["arf.bitwise_reproducible"] == "true"
    assert "bf16" in run.data.tags["arf.bitwise_reproducible_reason"]
    plain = client.get_run(fp32["mlflow_run_id"])
    assert plain.data.params["precision"] == "fp32"
    assert plain.data.tags["arf.bitwise_reproducible"] == "true"


def test_nondeterministic_run_is_recorded_as_such(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """training.deterministic: false reaches the loop (deterministic algorithms off, cuDNN
    autotuning on), is undone after the run, and the record (param, tags, lineage, the
    reproduce report's note) says the run is not bitwise reproducible."""
    import mlflow

    from arf_trainer.lineage import read_lineage
    from arf_training.reproduce import lineage_notes

    seen: list[tuple[bool, bool]] = []
    run_epoch = loop.run_epoch

    def spy(p: loop.Parts, epoch: int, clock: loop.Clock) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.backends.cudnn.benchmark))
        run_epoch(p, epoch, clock)

    monkeypatch.setattr(loop, "run_epoch", spy)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    uri = fresh_tracking_uri(tmp_path)
    fast = train_digits(tmp_path, "fast", uri, epochs=1, deterministic=False)
    assert seen == [(False, True)]
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark) == before
    default = train_digits(tmp_path, "default", uri, epochs=1)
    assert seen[1] == (True, False)
    assert fast["metrics"]["val_accuracy"] > 0.8
    client = mlflow.MlflowClient(uri)
    run = client.get_run(fast["mlflow_run_id"])
    assert run.data.params["deterministic"] == "False"
    assert run.data.tags["arf.bitwise_reproducible"] == "false"
    assert "training.deterministic: false" in run.data.tags["arf.bitwise_reproducible_reason"]
    assert client.get_run(default["mlflow_run_id"]).data.params["deterministic"] == "True"
    notes = lineage_notes(read_lineage(uri, fast["mlflow_run_id"]))
    assert any("not bitwise reproducible" in n and "training.deterministic: false" in n
               for n in notes), notes
    assert not any("bitwise" in n for n in lineage_notes(read_lineage(
        uri, default["mlflow_run_id"])))


def test_compile_wraps_the_trained_core(tmp_path: Path) -> None:
    """Plumbing only: compiling takes 30-90 s on this CPU (a real compiled run is in
    test_compile_run_is_reproducible_on_cpu, marked slow)."""
    prepare_digits(tmp_path)
    spec = JobSpec.from_dict(make_spec("digits_smoke", training={"compile": True},
                                       hyperparameters=DIGITS_HP))
    cfg = TrainConfig.from_spec(spec, 1)
    manifest = load_manifest(tmp_path / "prepare")
    source = open_source("memory", manifest, cfg.recipe, ONE)
    info = cfg.recipe.describe_data(manifest, cfg.hp, source.labels, source.feature_width)
    state = loop._build_state(cfg, cfg.recipe, info, source, None, ONE, CPU)
    assert isinstance(state.net, torch._dynamo.eval_frame.OptimizedModule)
    assert state.net._orig_mod is state.model.net
    eager = loop._build_state(TrainConfig.from_spec(JobSpec.from_dict(
        make_spec("digits_smoke", hyperparameters=DIGITS_HP)), 1), cfg.recipe, info, source,
        None, ONE, CPU)
    assert eager.net is eager.model.net


@pytest.mark.slow
def test_compile_run_is_reproducible_on_cpu(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    uri = fresh_tracking_uri(tmp_path)
    eager = train_digits(tmp_path, "eager", uri)
    first = train_digits(tmp_path, "compiled", uri, compile=True)
    second = train_digits(tmp_path, "compiled-again", uri, compile=True)
    assert first["weights_sha256"] != eager["weights_sha256"]  # Inductor's kernels ran
    assert second["weights_sha256"] == first["weights_sha256"]
    assert first["metrics"]["val_accuracy"] > 0.8


def test_bitwise_record_names_what_is_not_verified() -> None:
    assert accel.bitwise_record(CPU, "fp32", False)["arf.bitwise_reproducible"] == "true"
    assert accel.bitwise_record(CUDA, "fp32", False)["arf.bitwise_reproducible"] == "true"
    compiled = accel.bitwise_record(CPU, "fp32", True)  # measured: test_compile_run_...
    assert compiled["arf.bitwise_reproducible"] == "true"
    assert "torch.compile" in compiled["arf.bitwise_reproducible_reason"]
    for options in (("bf16", False), ("fp32", True)):  # measured on an H200 (gpu_check.sh)
        record = accel.bitwise_record(CUDA, *options)
        assert record["arf.bitwise_reproducible"] == "true"
        assert "H200" in record["arf.bitwise_reproducible_reason"]
    for device in (CPU, CUDA):
        record = accel.bitwise_record(device, "fp32", False, deterministic=False)
        assert record["arf.bitwise_reproducible"] == "false"
        assert f"false on {device.type}" in record["arf.bitwise_reproducible_reason"]
    record = accel.bitwise_record(CUDA, "bf16", True)  # not measured together
    assert record["arf.bitwise_reproducible"] == "false"
    assert "not verified" in record["arf.bitwise_reproducible_reason"]
    assert "cuda" in record["arf.bitwise_reproducible_reason"]


# -- where the data sits ----------------------------------------------------------------------

@pytest.mark.parametrize("device, loading, data, free, mode", [
    pytest.param(CPU, "memory", 10**9, None, "host", id="cpu"),
    pytest.param(CUDA, "memory", 10 * 2**20, 80 * 2**30, "device", id="fits"),
    pytest.param(CUDA, "memory", 50 * 2**30, 80 * 2**30, "pinned", id="too-large"),
    pytest.param(CUDA, "memory", 40 * 2**30, 80 * 2**30, "device", id="at-the-share"),
    pytest.param(CUDA, "stream", 0, 80 * 2**30, "pinned", id="stream"),
])
def test_placement_choice(device: torch.device, loading: str, data: int, free: int | None,
                          mode: str) -> None:
    placement = accel.choose_placement(device, loading, data, free)
    assert placement.mode == mode
    assert placement.label.startswith(f"{mode} (")


def test_device_resident_loader_gives_the_same_batches(tmp_path: Path) -> None:
    """The `device` placement's loader path (order copied once, batches indexed in place),
    run with the CPU as its device: the same batches as the host path."""
    prepare_digits(tmp_path)
    spec = JobSpec.from_dict(make_spec("digits_smoke", hyperparameters=DIGITS_HP))
    cfg = TrainConfig.from_spec(spec, 1)
    manifest = load_manifest(tmp_path / "prepare")
    source = open_source("memory", manifest, cfg.recipe, ONE)
    info = cfg.recipe.describe_data(manifest, cfg.hp, source.labels, source.feature_width)
    model = cfg.recipe.build_model(info)
    host = source.loader(cfg.recipe, info, model, ONE, 64, seed=0)
    resident = source.loader(cfg.recipe, info, model, ONE, 64, seed=0)
    resident.to_device(CPU)
    assert resident.device == CPU and host.device is None
    assert resident.tensor_bytes() == sum(t.nbytes for t in (*host.tensors, host.x_val,
                                                               host.y_val))
    for epoch, skip in ((0, 0), (1, 5)):
        pairs = list(zip(host.batches(epoch, skip), resident.batches(epoch, skip), strict=True))
        assert len(pairs) == host.steps_per_epoch - skip
        for (x1, y1), (x2, y2) in pairs:
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_no_host_read_per_step(tmp_path: Path) -> None:
    """The loop reads values back to the host (`.item()`, `float()`, ...: a device sync on a
    GPU) a few times an epoch, not once a step (the old loop read every step's loss)."""
    import sys
    from collections import Counter

    from torch.overrides import TorchFunctionMode

    reads: Counter[str] = Counter()

    class CountReads(TorchFunctionMode):
        READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
                 torch.Tensor.__int__, torch.Tensor.__bool__}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in self.READS:
                reads[sys._getframe(1).f_globals.get("__name__", "")] += 1
            return func(*args, **(kwargs or {}))

    uri = fresh_tracking_uri(tmp_path)
    with CountReads():
        result = train_digits(tmp_path, "count", uri)
    assert result["steps"] == 69
    # AdamW reads its step counter, a host tensor by design (not `capturable`): no device sync.
    ours = sum(n for caller, n in reads.items() if not caller.startswith("torch."))
    # Per epoch: the training loss sum, the validation loss and accuracy; one checkpoint read.
    assert ours <= 3 * 3 + 1, reads


def test_loss_sum_equals_the_per_step_item_sum() -> None:
    """float32 losses summed in float64 on the device give the Python float sum exactly."""
    torch.manual_seed(0)
    losses = torch.rand(500) * 3
    rows = [int(r) for r in torch.randint(1, 257, (500,))]
    expected = 0.25
    for loss, n in zip(losses, rows, strict=True):
        expected += loss.item() * n
    summed = accel.LossSum(0.25, CPU)
    for loss, n in zip(losses, rows, strict=True):
        summed.add(loss, n)
    assert summed.value() == expected
