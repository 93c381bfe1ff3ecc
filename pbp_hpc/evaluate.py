"""Evaluate a saved model: `python -m pbp_hpc.evaluate MODEL [--data-dir DIR] [--plots DIR] [--json]`.

Reads a model file that `train.save_model` wrote (pbp_hpc.model_file: the parameters of the best
validation pass and the run's config), or a checkpoint (checkpoint.path: the parameters where the
run stopped, and the settings it stored to be resumed with), rebuilds the network from the config's model.layers and
model.dtype, and classifies the test set of the data set that config names (the same files,
subset and size as in training; --data-dir points at another copy of the IDX files): test
accuracy, per-class accuracy and the confusion matrix, as text or JSON; --plots DIR also writes
the confusion matrix as a figure. One process, no MPI launch needed.

Exit status: 0, or 2 for a file that is not a readable model (the one-line message names the file
that was expected: a results file, a YAML config or any other file is not a model), a model that does not fit the
data (input width, class count), or data that cannot be found; the message names the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

import h5py

from pbp_hpc import checkpoint
from pbp_hpc import config as configmod
from pbp_hpc import model_file
from pbp_hpc.data import datasets
from pbp_hpc.data.mnist import load_mnist, resolve_data_dir
from pbp_hpc.engine import activations, losses, model
from pbp_hpc.errors import ConfigError, PbpError

CHUNK = 4096  # test examples classified per pass


EXPECTED = "expected a model file written by train.save_model (e.g. --set train.save_model=model.h5) or a checkpoint"
# What other HDF5 files of pbp_hpc say about themselves (root attribute -> value -> what the file is)
_OTHERS = {("schema", "pbp_hpc-results"): "a results file (what sweeps record; python -m pbp_hpc.analyze reads it)"}


def kind_of(path: Path) -> str:
    """'model', 'checkpoint', or ModelFileError: one line naming the file, what it is, and what was expected."""
    if not path.is_file():
        raise model_file.ModelFileError(f"no model file at {path}" if not path.exists() else f"{path} is not a file; {EXPECTED}")
    if not h5py.is_hdf5(path):
        what = "a YAML config (a run's settings, not its parameters)" if path.suffix in (".yaml", ".yml") else "not an HDF5 file"
        raise model_file.ModelFileError(f"{path} is {what}; {EXPECTED}")
    try:
        with h5py.File(path, "r") as f:
            # only plain strings count: an attribute of another type (an array, a number) names no format
            attrs = {k: f.attrs[k] for k in ("format", "schema") if k in f.attrs and isinstance(f.attrs[k], str)}
    except (OSError, KeyError, ValueError) as exc:
        raise model_file.ModelFileError(f"cannot read {path}: {exc}; {EXPECTED}") from None
    if attrs.get("format") == model_file.FORMAT:
        return "model"
    if attrs.get("format") == checkpoint.FORMAT:
        return "checkpoint"
    for (key, value), what in _OTHERS.items():
        if attrs.get(key) == value:
            raise model_file.ModelFileError(f"{path} is {what}; {EXPECTED}")
    raise model_file.ModelFileError(f"{path} is an HDF5 file that pbp_hpc did not write as a model or checkpoint; {EXPECTED}")


def _from_checkpoint(path: Path) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """A checkpoint's parameters as a model: the config from the settings it stored to be resumed with."""
    try:
        ck = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise model_file.ModelFileError(str(exc)) from None
    key = ck["meta"].get("resume_key") if isinstance(ck["meta"], dict) else None
    if not isinstance(key, dict) or not {"model", "data"} <= key.keys():
        raise model_file.ModelFileError(f"{path}: a checkpoint without the run's settings (meta.resume_key); {EXPECTED}")
    cfg = {k: key[k] for k in ("model", "data", "algorithm", "optimizer", "schedule", "train") if k in key}
    meta = {"checkpoint": {"epoch": ck["epoch"], "step": ck["step"]}, "best": None}
    return ck["theta"], cfg, meta


def load_model(path: str | Path) -> tuple[np.ndarray, configmod.Config, dict[str, Any]]:
    """The parameters, the validated config and the meta of a model file or a checkpoint;
    ModelFileError naming the file (and, for another kind of file, the file expected)."""
    path = Path(path)
    theta, cfg_dict, meta = model_file.load(path) if kind_of(path) == "model" else _from_checkpoint(path)
    try:
        cfg = configmod.from_dict(cfg_dict, f"the config stored in {path}")
    except ConfigError as exc:
        raise model_file.ModelFileError(str(exc)) from None
    n = model.Layout(cfg.model.layers).n_params
    if theta.shape[0] != n:
        raise model_file.ModelFileError(f"{path}: {theta.shape[0]} parameters, but model.layers {cfg.model.layers} "
                                        f"needs {n}; the file is damaged or was not written by train.save_model")
    return theta.astype(cfg.model.dtype, copy=False), cfg, meta if isinstance(meta, dict) else {}


def data_config(cfg: configmod.Config, data_dir: Optional[str], n_test: Optional[int]) -> configmod.Config:
    """The config's data set; with data_dir, the IDX files there instead (not downloaded)."""
    d = cfg.data.model_copy()
    if data_dir is not None:
        d.dir, d.download = data_dir, False
        if d.name == "synthetic":
            d.name = "idx"
    if n_test is not None:
        d.n_test = n_test
    return cfg.model_copy(update={"data": d})


def load_test(cfg: configmod.Config, model_path: Path) -> tuple[Any, str]:
    """The test set as training loaded it (datasets._load_idx's test part: the first data.n_test
    images of the test file; synthetic: datasets.load), and where it came from. A model that does
    not fit the data (input width, class count) is refused."""
    layers = cfg.model.layers
    if cfg.data.name == "synthetic":
        # the world size the run had: a synthetic weak-scaling data set (and its default test size) grew with it
        data = datasets.load(cfg, cfg.parallel.ranks or 1, None)
        source, n_features, origin = data.test, data.n_features, data.origin
    else:
        directory = resolve_data_dir(cfg.data.dir, download=cfg.data.download)
        arrays = load_mnist(directory)
        n_features, origin = arrays.test_images.shape[1], str(directory)
        n_test = arrays.test_labels.shape[0] if cfg.data.n_test is None else min(cfg.data.n_test, arrays.test_labels.shape[0])
        source = datasets.ArraySource(arrays.test_images[:n_test], arrays.test_labels[:n_test], layers[-1])
    if n_features != layers[0]:
        raise ConfigError(f"model {model_path} takes {layers[0]} inputs but {origin} has {n_features} features per example")
    labels = source.labels_of(np.arange(len(source)))
    if labels.size and int(labels.max()) >= layers[-1]:
        raise ConfigError(f"model {model_path} has {layers[-1]} outputs but {origin} has labels up to "
                          f"{int(labels.max())} ({int(labels.max()) + 1} classes)")
    return source, origin


def predict(theta: np.ndarray, cfg: configmod.Config, source: Any) -> np.ndarray:
    """The predicted class of every example of source, in CHUNK-sized passes, with the config's
    activation and loss (model.predict_into, the forward pass training validates with)."""
    layout = model.Layout(cfg.model.layers)
    ws, bs = model.views(theta, layout, np)
    act, loss = activations.get(cfg.model.activation), losses.get(cfg.model.loss)
    n = len(source)
    work = model.Workspace(layout, min(max(n, 1), CHUNK), np, cfg.model.dtype)
    out = np.empty(n, dtype=np.int64)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        source.features_into(np.arange(lo, hi), work.x[: hi - lo])
        out[lo:hi] = model.predict_into(np, ws, bs, work.x, work, hi - lo, act, loss)
    return out


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m


def report(matrix: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall; None for a class with no examples) and the matrix."""
    total = int(matrix.sum())
    per_class = [None if row.sum() == 0 else float(row[i] / row.sum()) for i, row in enumerate(matrix)]
    return {"examples": total, "accuracy": float(np.trace(matrix) / total) if total else None,
            "per_class_accuracy": per_class, "class_counts": [int(r.sum()) for r in matrix],
            "confusion_matrix": matrix.tolist()}


def text_lines(path: Path, cfg: configmod.Config, meta: dict[str, Any], origin: str, rep: dict[str, Any]) -> list[str]:
    acc = rep["accuracy"]
    best = meta.get("best") or {}
    ck = meta.get("checkpoint")
    lines = [f"model {path}: layers {cfg.model.layers}, {cfg.model.dtype}"
             + (f"; a checkpoint: the parameters at epoch {ck['epoch']}, step {ck['step']}" if ck else "")
             + (f"; saved at the validation pass of epoch {best.get('epoch')}, step {best.get('step')} "
                f"(validation accuracy {100 * best['val_accuracy']:.2f}%)" if best.get("val_accuracy") is not None else ""),
             f"test set: {rep['examples']} examples from {origin}",
             f"test accuracy: {'n/a' if acc is None else f'{100 * acc:.2f}%'}", "", "per-class accuracy:"]
    for c, (a, n) in enumerate(zip(rep["per_class_accuracy"], rep["class_counts"])):
        lines.append(f"  class {c:>2}: {'   n/a' if a is None else f'{100 * a:6.2f}%'}  ({n} examples)")
    m = np.asarray(rep["confusion_matrix"])
    width = max(5, len(str(int(m.max()) if m.size else 0)) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):",
              " " * 8 + "".join(f"{c:>{width}}" for c in range(m.shape[1]))]
    lines += [f"  {r:>4}  " + "".join(f"{v:>{width}}" for v in row) for r, row in enumerate(m)]
    return lines


def plot_confusion(rep: dict[str, Any], title: str, out: Path) -> Path:
    """The confusion matrix as a heat map of the errors: the off-diagonal cells coloured on a log scale
    by their share of the true class's examples (a linear scale leaves every error invisible next to
    the diagonal's ~98%), the diagonal apart in grey; each cell's count written in it."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = np.asarray(rep["confusion_matrix"])
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    k = m.shape[0]
    errors = np.ma.masked_where(np.eye(k, dtype=bool) | (m == 0), share)
    size = max(5.0, 0.55 * k + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["Reds"].copy()
    cmap.set_bad("white")
    low = float(errors.min()) if errors.count() else 1e-3
    high = float(errors.max()) if errors.count() else 1.0
    norm = LogNorm(vmin=low, vmax=max(high, low * 10))
    im = ax.imshow(errors, cmap=cmap, norm=norm)
    small = "small" if k <= 12 else "xx-small"
    for i in range(k):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, color="0.85"))
        for j in range(k):
            if m[i, j]:
                dark = i != j and norm(share[i, j]) > 0.6
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=small,
                        color="white" if dark else "black", fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (grey: correct)")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(im, ax=ax, label="errors: share of the true class's examples (log scale)", shrink=0.8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _evaluate(path: Path, data_dir: Optional[str], n_test: Optional[int]
              ) -> tuple[dict[str, Any], configmod.Config, dict[str, Any]]:
    theta, cfg, meta = load_model(path)
    cfg = data_config(cfg, data_dir, n_test)
    source, origin = load_test(cfg, path)
    labels = source.labels_of(np.arange(len(source)))
    predicted = predict(theta, cfg, source)
    rep = report(confusion(labels, predicted, cfg.model.layers[-1]))
    result = {"model": str(path), "layers": cfg.model.layers, "dtype": cfg.model.dtype, "data": origin,
              "data_name": cfg.data.name, "best": meta.get("best"), **rep}
    return result, cfg, meta


def evaluate(path: str | Path, data_dir: Optional[str] = None, n_test: Optional[int] = None) -> dict[str, Any]:
    """The whole evaluation as a JSON-ready dict (what --json prints): model, layers, dtype, data,
    best (the validation pass the model was saved at), examples, accuracy, per_class_accuracy,
    class_counts, confusion_matrix (rows: true class, columns: predicted)."""
    return _evaluate(Path(path), data_dir, n_test)[0]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model file written by train.save_model, or a checkpoint (checkpoint.path)")
    p.add_argument("--data-dir", metavar="DIR", help="the IDX files to test on, instead of the model config's data.dir")
    p.add_argument("--n-test", type=int, metavar="N", help="test examples to use (default: the model config's data.n_test)")
    p.add_argument("--plots", metavar="DIR", help="write the confusion matrix as DIR/confusion_<model>.png")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    path = Path(args.model)
    try:
        if args.n_test is not None and args.n_test < 1:
            raise ConfigError("--n-test must be at least 1")
        if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
            raise ConfigError(f"--plots {args.plots} is a file; give a directory for the figure")
        result, cfg, meta = _evaluate(path, args.data_dir, args.n_test)
        if args.plots:
            acc = "n/a" if result["accuracy"] is None else f"{100 * result['accuracy']:.2f}%"
            title = f"{path.name}: layers {result['layers']}, test accuracy {acc}\n{result['examples']} test examples"
            out = plot_confusion(result, title, Path(args.plots) / f"confusion_{path.stem}.png")
            print(f"wrote {out}", file=sys.stderr)
    except PbpError as exc:
        print(f"pbp_hpc.evaluate: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(result))
        else:
            print("\n".join(text_lines(path, cfg, meta, result["data"], result)))
    except BrokenPipeError:  # `... | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
