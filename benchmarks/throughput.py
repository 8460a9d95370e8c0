"""Training throughput: the fine-tuning step of the previous release vs today's, in one process, interleaved.

What a user calls is timed: ``graphprune.recipes.image_folder_data`` + ``finetune_`` of the
release before the training path was rebuilt (commit ``a16caf2``, extracted from git into a
temporary package ``_gp_old`` so both live in one process) against today's
``image_folder_data`` + ``finetune_`` with the run's :class:`~graphprune.recipes.Placement`
(CPU: fp32, ``channels_last`` for conv nets; CUDA: bf16 autocast) and BatchNorm statistics
frozen, the recipes' default before pruning (``--norm-stats train`` times today's loop with
batch statistics, as the old loop always ran). Each measurement is one
``finetune_`` call of ``--steps`` optimizer steps on the same ImageFolder split, same model
(ImageNet EfficientNet-Lite0), same image size and batch; evaluation is kept to one 8-image
batch so the call is dominated by training. Rounds alternate old / new, and the figure is
images per second of the median round. ``torch.utils.benchmark.Timer`` runs each call, so
thread settings are handled the same for both.

Example:
    python benchmarks/throughput.py                           # Lite0, 128 px, batch 32, 1 thread, flowers17
    python benchmarks/throughput.py --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment_columns  # noqa: E402

OLD_COMMIT = "a16caf2"
RESULTS = Path(__file__).resolve().parent / "results"


def old_package(commit: str = OLD_COMMIT) -> object:
    """The ``graphprune`` package of ``commit``, importable as ``_gp_old`` (relative imports intact)."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", commit, "graphprune"], check=True,
                          capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="gp-old-"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        archive.extractall(root, filter="data")
    (root / "graphprune").rename(root / "_gp_old")
    sys.path.insert(0, str(root))
    package = importlib.import_module("_gp_old")
    importlib.import_module("_gp_old.recipes")
    return package


def _small_val(loader: DataLoader) -> DataLoader:
    return DataLoader(Subset(loader.dataset, range(8)), batch_size=8, collate_fn=loader.collate_fn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: shared flowers17)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timed call")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved old/new rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--norm-stats", choices=("frozen", "train"), default="frozen",
                        help="today's BatchNorm setting (default: the recipes' default before pruning, frozen)")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import graphprune.recipes as R
    from graphprune.assets import load_efficientnet_lite0, shared_data_dir

    old = old_package()
    root = args.data or shared_data_dir() / "flowers17"
    source = load_efficientnet_lite0()
    classes = len(R.check_splits(root))

    old_data = old.recipes.image_folder_data(root, source, image_size=args.image_size, batch_size=args.batch_size)
    old_data = old.recipes.TransferData(old_data.train, _small_val(old_data.val), old_data.class_names)
    old_config = old.recipes.FinetuneConfig(epochs=1, lr=1e-4, max_batches_per_epoch=args.steps)

    new_model = source  # only for the data config; each call gets a fresh copy below
    new_data = R.image_folder_data(root, new_model, image_size=args.image_size, batch_size=args.batch_size)
    new_data = R.TransferData(new_data.train, _small_val(new_data.val), new_data.class_names)
    new_config = R.FinetuneConfig(epochs=1, lr=1e-4, max_batches_per_epoch=args.steps, norm_stats=args.norm_stats)

    import copy

    def fresh():
        model = copy.deepcopy(source)
        model.reset_classifier(classes)
        return model

    def run_old():
        old.recipes.finetune_(fresh(), old_data, old_config, progress=False)

    def run_new():
        model = fresh()
        placement = R.Placement.resolve(model, args.device)
        R.finetune_(placement.model_(model), R.on_device(new_data, placement), new_config, progress=False,
                    placement=placement)

    images = args.steps * args.batch_size
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, fn in (("old", run_old), ("new", run_new)):
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=args.threads)
            seconds[name].append(timer.timeit(1).median)
    rates = {k: images / statistics.median(v) for k, v in seconds.items()}
    env = environment_columns()
    placement = R.Placement.resolve(fresh(), args.device)
    row = {"model": "tf_efficientnet_lite0", "image_size": args.image_size, "batch_size": args.batch_size,
           "steps_per_call": args.steps, "rounds": args.rounds, "threads": args.threads,
           "device": str(placement.device), "new_channels_last": placement.channels_last, "new_bf16": placement.bf16,
           "new_norm_stats": args.norm_stats, "load_avg_1m": round(os.getloadavg()[0], 2),
           "old_img_s": round(rates["old"], 2), "new_img_s": round(rates["new"], 2),
           "speedup": round(rates["new"] / rates["old"], 3),
           "old_rounds_s": " ".join(f"{s:.2f}" for s in seconds["old"]),
           "new_rounds_s": " ".join(f"{s:.2f}" for s in seconds["new"]), **env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    if not new_file:
        with open(args.out, newline="") as handle:
            if next(csv.reader(handle), []) != list(row):
                raise SystemExit(f"{args.out} has other columns; delete it (or pass --out) for a fresh CSV")
    with open(args.out, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new_file:
            writer.writeheader()
        writer.writerow(row)
    print(f"old {rates['old']:.1f} img/s, new {rates['new']:.1f} img/s: x{rates['new'] / rates['old']:.2f} "
          f"({args.steps} steps x {args.batch_size} images per call, median of {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s), {placement.to_dict()}) -> {args.out}")


if __name__ == "__main__":
    main()
