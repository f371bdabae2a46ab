"""task=predict: classify image files with a checkpoint from any framework, or an exported ONNX model.

    cnnrun task=predict checkpoint=outputs/…/model.safetensors inputs=photos/
    cnnrun task=predict checkpoint=… inputs='shots/*.jpg' predict.top_k=3 predict.output=preds.csv

Each image is converted as the training data was (size, channels: from the checkpoint, by the image-folder
dataset's decoder) and normalised inside the model with the checkpoint's mean and std, so no dataset config is
needed. The framework is the checkpoint's own unless ``framework=`` is given on the command line; ``.onnx`` files
run with ONNX Runtime. Nothing is tracked in MLflow.

Exit codes: 0 every file predicted; 1 some files could not be read (named on stderr and in the output file,
the others predicted and written); 2 a mistake in the config (no checkpoint, inputs naming nothing, top_k out of
range, …), before anything is predicted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from rich.console import Console

from cnnrun.data.folder import MAX_LISTED, read_image
from cnnrun.errors import ConfigError, Problem, UserError
from cnnrun.predictor import ONNX, Predictor, batches, load_predictor, probabilities
from cnnrun.progress import ItemProgress, console
from cnnrun.tasks import predict_report
from cnnrun.tasks.predict_inputs import collect_inputs

DEFAULT_TOP_K = 5


class SomeInputsUnread(UserError):
    """Some files could not be read; the others were predicted (and written)."""

    exit_code = 1


def run(ctx) -> int:
    """Predict every input file; return how many were predicted."""
    cfg = ctx.cfg
    path, files = _checked_inputs(cfg)
    framework, options = chosen_framework(ctx)
    predictor = load_predictor(path, framework, options, cfg.device)
    k = top_k(cfg.predict.top_k, len(predictor.class_names))
    used = getattr(predictor, "framework", ONNX)
    device = getattr(getattr(predictor, "runner", None), "device_name", "cpu")
    console.print(f"predicting {len(files):,} file(s) with {path} ({len(predictor.class_names)} classes) in {used} "
                  f"on {device}", highlight=False)
    predictions = predict_files(predictor, files, k, cfg.predict.batch_size, cfg.predict.progress)
    out = Console()
    if not out.is_terminal:  # a pipe or a file: whole file names on one line each, not folded at 80 columns
        out = Console(width=10_000)
    out.print(predict_report.table(predictions, k))
    if cfg.predict.output:
        written = predict_report.write(Path(cfg.predict.output), predictions, k, str(path), used)
        console.print(f"predictions written to {written}", highlight=False)
    failed = [p for p in predictions if p.error]
    if failed:
        listed = "\n  ".join(f"{p.file}: {p.error}" for p in failed[:MAX_LISTED])
        more = f"\n  ... and {len(failed) - MAX_LISTED} more" if len(failed) > MAX_LISTED else ""
        raise SomeInputsUnread(f"{len(failed)} of {len(predictions)} file(s) could not be read and were not "
                               f"predicted (the other {len(predictions) - len(failed)} were):\n  {listed}{more}")
    return len(predictions)


def _checked_inputs(cfg) -> Tuple[Path, List[Path]]:
    """The checkpoint path and the input files, or one ConfigError with every problem of both."""
    problems: List[Problem] = []
    path = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else None
    if path is None:
        problems.append(Problem("checkpoint", "task=predict needs a model: checkpoint=PATH (a model.safetensors "
                                              "from training, or an exported .onnx file)"))
    elif not path.is_file():
        problems.append(Problem("checkpoint", f"{cfg.checkpoint}: no such file"))
    files: List[Path] = []
    try:
        files = collect_inputs(cfg.inputs)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems, "the config")
    return path, files


def chosen_framework(ctx) -> Tuple[Optional[str], object]:
    """(framework, its options) when ``framework`` was set on the command line, else (None, None): the
    checkpoint's own framework with its default options."""
    named = any(o.split("=", 1)[0].lstrip("+~").split(".")[0] == "framework" for o in ctx.overrides)
    if not named:
        return None, None
    name = ctx.cfg.framework.name
    return name, (None if name == ONNX else ctx.framework_options)


def top_k(requested: Optional[int], classes: int) -> int:
    if requested is None:
        return min(DEFAULT_TOP_K, classes)
    if requested > classes:
        raise ConfigError([Problem("predict.top_k", f"expected 1 to {classes} (the model has {classes} classes); "
                                                    f"received {requested}")], "the config")
    return requested


def predict_files(predictor: Predictor, files: List[Path], k: int, batch_size: int, progress: bool):
    """One :class:`~cnnrun.tasks.predict_report.Prediction` (top ``k``) per file, in order; a file that cannot be
    read gets its reason instead."""
    channels, height, width = predictor.input_shape
    names = list(predictor.class_names)
    results = []
    with ThreadPoolExecutor(max_workers=4) as pool, \
            ItemProgress("predicting", len(files), progress and len(files) > batch_size) as bar:
        for chunk in batches(files, batch_size):
            decoded = list(pool.map(lambda f: read_image(f, (height, width), channels), chunk))
            good = [image for image, _ in decoded if image is not None]
            probs = iter(probabilities(predictor, np.stack(good), batch_size) if good else [])
            for file, (image, why) in zip(chunk, decoded):
                if image is None:
                    results.append(predict_report.Prediction(str(file), error=why))
                else:
                    top = predict_report.top_classes(next(probs), names, k)
                    results.append(predict_report.Prediction(str(file), top))
            bar.advance(len(chunk))
    return results
