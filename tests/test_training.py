"""The training path: reproducible stages, timm's optimizer groups and schedule, EMA, decoded data,
device settings checked before any data is read, and the CUDA / NCCL path where a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import graphprune as gp
import graphprune.recipes as R

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _image_root(root: Path, classes: int = 3, per_split: dict[str, int] | None = None, height_px: int = 36) -> Path:
    """Random-noise RGB images of three sizes in ImageFolder layout (augmentation has work to do)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (per_split or {"train": 6, "val": 3}).items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40 + 8 * (i % 3), height_px)
                pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
                pixels[:, :, k] = 255  # a learnable colour cue
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


_STAGE = textwrap.dedent("""
    import hashlib, json, sys, timm, torch
    import graphprune.recipes as R
    torch.set_num_threads(1)
    root, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(123)  # the recipe must not depend on the caller's RNG state: it reseeds
    source = timm.create_model("test_efficientnet", pretrained=False)
    data = R.image_folder_data(root, source, image_size=32, batch_size=4, seed=0)
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=1.5, lr=3e-3, ema_decay=0.9),
                              run=R.RunConfig(seed=7, progress=False, device="cpu"))
    model, result = R.s_to_t(source, data, config)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode()); digest.update(tensor.contiguous().numpy().tobytes())
    json.dump({"sha256": digest.hexdigest(), "metrics": result.to_json()}, open(out, "w"))
""")


def test_same_seed_gives_identical_weights_in_two_fresh_processes(tmp_path):
    root = _image_root(tmp_path / "data")
    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.json"
        subprocess.run([sys.executable, str(script), str(root), str(out)], check=True, env=env, cwd=REPO,
                       timeout=300)
        written = json.loads(out.read_text())
        metrics = json.loads(written["metrics"])
        for stage in metrics["stages"]:
            stage.pop("seconds")  # wall time: the one field allowed to differ
        outputs.append((written["sha256"], metrics))
    assert outputs[0] == outputs[1]  # bit-identical weights (sha256 of every tensor) and metrics
    assert [s["name"] for s in metrics["stages"]] == ["probe", "source"]
    assert metrics["stages"][1]["steps"] == 8  # 18 images, 4 per batch: 5 batches x 1.5 epochs = 7.5, rounded


def test_reseeded_stage_ignores_the_callers_rng_state():
    data = _toy_task()
    results = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        torch.rand(100)  # a different global RNG state before each call
        model = _toy_model()
        R.finetune_(model, data, R.FinetuneConfig(epochs=2, lr=1e-2), seed=5, progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def _toy_task(n: int = 16) -> R.TransferData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.arange(n) % 2
    images[labels == 1, 0] += 2.0
    pairs = TensorDataset(images, labels)
    return R.TransferData(DataLoader(pairs, batch_size=4, shuffle=True, generator=torch.Generator()),
                          DataLoader(pairs, batch_size=8), ("a", "b"))


def _toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=2)


# ----------------------------------------------------------------------------- optimizer, schedule, EMA


def test_head_trains_at_head_lr_scale_and_layer_decay_scales_the_backbone():
    model = _toy_model()
    optimizer = R.build_optimizer(model, R.FinetuneConfig(lr=1e-3, head_lr_scale=10.0, weight_decay=0.05))
    head = {id(p) for p in model.get_classifier().parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr_scale"] == (10.0 if in_head == {True} else 1.0)
        assert group["weight_decay"] in (0.0, 0.05)
    biases = {id(model.get_classifier().bias), id(model.bn1.weight)}
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if any(id(p) in biases for p in g["params"]))
    layered = R.build_optimizer(model, R.FinetuneConfig(lr=1e-3, head_lr_scale=1.0, layer_decay=0.5))
    scales = sorted({g["lr_scale"] for g in layered.param_groups})
    assert len(scales) > 3 and scales[0] < 0.1 and scales[-1] == 1.0
    linear = R.build_optimizer(model, R.FinetuneConfig(mode="linear", head_lr_scale=10.0))
    assert {g["lr_scale"] for g in linear.param_groups} == {1.0}  # linear mode: lr is the head's rate


def test_schedule_warms_up_then_decays_to_zero_with_the_group_scale():
    model = _toy_model()
    config = R.FinetuneConfig(lr=1e-3, head_lr_scale=10.0, warmup_fraction=0.25)
    optimizer = R.build_optimizer(model, config)
    schedule = R.build_schedule(optimizer, config, steps=8)
    head_group = next(g for g in optimizer.param_groups if g["lr_scale"] == 10.0)
    rates = [head_group["lr"]]
    for step in range(1, 9):
        schedule.step_update(num_updates=step)
        rates.append(head_group["lr"])
    assert rates[0] == pytest.approx(1e-3 * 0.01 * 10)
    assert max(rates) == pytest.approx(1e-2) and rates.index(max(rates)) == 2  # peak after 2 warmup steps
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))  # cosine: non-increasing after the peak


def test_ema_stage_ends_with_the_average_not_the_last_weights():
    data = _toy_task()
    plain, averaged = _toy_model(), _toy_model()
    R.finetune_(plain, data, R.FinetuneConfig(epochs=2, lr=1e-2), seed=1, progress=False)
    R.finetune_(averaged, data, R.FinetuneConfig(epochs=2, lr=1e-2, ema_decay=0.5), seed=1, progress=False)
    differs = [k for k, v in plain.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, averaged.state_dict()[k])]
    assert differs  # same steps, same data: only the average can differ


def test_label_smoothing_changes_the_loss_it_reports():
    data = _toy_task()
    records = []
    for smoothing in (0.0, 0.3):
        model = _toy_model()
        records.append(R.finetune_(model, data, R.FinetuneConfig(epochs=1, lr=1e-9, label_smoothing=smoothing),
                                   seed=1, progress=False).train_loss)
    assert records[1] != pytest.approx(records[0], rel=1e-3)


def test_distillation_pulls_the_student_towards_the_teacher_and_leaves_the_teacher_alone():
    data = _toy_task()
    teacher = _toy_model()
    R.finetune_(teacher, data, R.FinetuneConfig(epochs=3, lr=1e-2), seed=0, progress=False)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.cat([x for x, _ in data.val])
    with torch.no_grad():
        target = teacher.eval()(images).softmax(1)
    teacher.train()
    gaps = {}
    for weight in (0.0, 0.9):
        student = _toy_model()
        record = R.finetune_(student, data, R.FinetuneConfig(epochs=3, lr=1e-2, distill=weight), seed=2,
                             progress=False, teacher=teacher)
        assert record.details["distill"] == weight
        with torch.no_grad():
            gaps[weight] = float((student.eval()(images).softmax(1) - target).abs().sum(1).mean())
    assert gaps[0.9] < gaps[0.0]  # same seed, same steps: only the loss differs
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_distillation_needs_a_teacher_and_a_weight_in_range():
    with pytest.raises(gp.InvalidArgumentError, match="needs a teacher"):
        R.finetune_(_toy_model(), _toy_task(), R.FinetuneConfig(epochs=1, distill=0.5), progress=False)
    for bad in (dict(distill=1.5), dict(distill=-0.1), dict(distill_temperature=0)):
        with pytest.raises(gp.InvalidArgumentError, match="distill"):
            R.FinetuneConfig(**bad)
    config = R.TransferConfig(prune=R.PruneConfig(ratio=0.3, flops_reduction=None),
                              target=R.FinetuneConfig(epochs=1, distill=0.5), run=R.RunConfig(progress=False))
    with pytest.raises(gp.InvalidArgumentError, match="no fine-tuned model to distill from"):
        R.sp_t(_toy_model(), _toy_task(), config)


def test_s_tp_t_distills_the_pruned_model_from_the_fine_tuned_one():
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=1), prune=R.PruneConfig(ratio=0.3, flops_reduction=None),
                              target=R.FinetuneConfig(epochs=1, distill=0.5), run=R.RunConfig(progress=False))
    model, result = R.s_tp_t(_toy_model(), _toy_task(), config)
    assert result.stage("target").details["distill"] == 0.5
    assert result.final.macs < result.base_macs


def test_timm_optimizer_names_are_accepted_and_unknown_ones_refused():
    assert R.FinetuneConfig(optimizer="lamb").optimizer == "lamb"
    with pytest.raises(gp.InvalidArgumentError, match="not a timm optimizer"):
        R.FinetuneConfig(optimizer="nope")
    for bad in (dict(head_lr_scale=0), dict(layer_decay=1.5), dict(warmup_fraction=1.0), dict(label_smoothing=-0.1),
                dict(ema_decay=1.0)):
        with pytest.raises(gp.InvalidArgumentError):
            R.FinetuneConfig(**bad)


# ----------------------------------------------------------------------------- data decoded once


def test_decoded_images_give_the_same_batches_as_reading_the_files(tmp_path):
    # images no taller than the eval resize (32 / crop_pct 0.95 -> 33 px): decoding keeps them as they are,
    # so the cached and the file-reading paths run the very same tensor transforms
    root = _image_root(tmp_path / "data", height_px=30)
    model = timm.create_model("test_efficientnet", pretrained=False)
    cached = R.image_folder_data(root, model, image_size=32, batch_size=5, augment=False, cache=True)
    files = R.image_folder_data(root, model, image_size=32, batch_size=5, augment=False, cache=False)
    pairs = list(zip(cached.val, files.val))
    assert len(pairs) == 2
    for a, b in pairs:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert isinstance(cached.val.dataset, R.DecodedImages)
    images, _ = next(iter(cached.train))
    assert images.dtype == torch.float32 and images.shape == (5, 3, 32, 32)


def test_probe_fits_the_head_and_keeps_the_backbone(tmp_path):
    root = _image_root(tmp_path / "data")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    data = R.image_folder_data(root, model, image_size=32, batch_size=4)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}
    record = R.linear_probe_(model, data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert record.kind == "probe" and record.val_accuracy > 1 / 3  # the colour cue is linearly separable
    assert record.details["l2"] in R.probe.L2_GRID


# ----------------------------------------------------------------------------- bad input before training


@pytest.mark.parametrize("device, message", [("tpu", "unknown device"), ("cuda:x", "unknown device"),
                                             ("cpu:0", "unknown device")])
def test_unknown_device_is_refused_in_the_config(device, message):
    with pytest.raises(gp.InvalidArgumentError, match=message):
        R.RunConfig(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(gp.InvalidArgumentError, match="CUDA is not available"):
        R.RunConfig(device="cuda")


def test_bad_precision_and_layout_are_refused():
    with pytest.raises(gp.InvalidArgumentError, match="precision"):
        R.RunConfig(precision="fp8")
    with pytest.raises(gp.InvalidArgumentError, match="channels_last"):
        R.RunConfig(channels_last=True)


def test_data_root_without_train_is_refused(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(gp.InvalidArgumentError, match="split 'train' is missing"):
        R.image_folder_data(tmp_path, timm.create_model("test_efficientnet"), image_size=32)


def test_auto_placement_on_this_machine():
    conv = R.Placement.resolve(timm.create_model("resnet18"))
    vit = R.Placement.resolve(timm.create_model("vit_tiny_patch16_224"))
    assert conv.channels_last and not vit.channels_last
    assert conv.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert conv.bf16 == torch.cuda.is_available()  # bf16 autocast by default on CUDA only


def test_recipe_trains_channels_last_and_returns_the_default_layout():
    data = _toy_task()
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=1), head_init="random",
                              run=R.RunConfig(progress=False, device="cpu", channels_last="on"))
    model, result = R.s_to_t(_toy_model(), data, config)
    assert result.stage("source").details["channels_last"] is True
    assert model.conv1.weight.is_contiguous()


# ----------------------------------------------------------------------------- CUDA, NCCL


@needs_cuda
def test_recipe_runs_on_cuda_in_bf16():
    data = _toy_task()
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=2, lr=1e-2),
                              prune=R.PruneConfig(scorer="taylor", flops_reduction=None, ratio=0.3, scoring_batches=2),
                              target=R.FinetuneConfig(epochs=1), run=R.RunConfig(progress=False, device="cuda"))
    model, result = R.s_tp_t(_toy_model(), data, config)
    assert next(model.parameters()).device.type == "cuda"
    assert result.stage("source").details["bf16"] is True and result.final.macs < result.base_macs
    assert 0.0 <= result.val_accuracy <= 1.0


def _nccl_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), TORCHELASTIC_RUN_ID="test")
    config = R.TransferConfig(source=R.FinetuneConfig(epochs=1, lr=3e-3),
                              prune=R.PruneConfig(scorer="l1", flops_reduction=None, ratio=0.3),
                              target=R.FinetuneConfig(epochs=1), run=R.RunConfig(progress=False, device="cuda"))
    model, result = R.s_tp_t(_toy_model(), _toy_task(), config)
    backend = torch.distributed.get_backend()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"state": state, "backend": backend, "accuracy": result.val_accuracy},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@needs_cuda
def test_ddp_on_cuda_selects_nccl_and_ranks_end_identical(tmp_path, free_port):
    world_size = min(2, torch.cuda.device_count())  # one rank per GPU; one GPU still runs NCCL + DDP
    mp.spawn(_nccl_worker, args=(world_size, free_port, str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    assert {r["backend"] for r in results} == {"nccl"}
    for other in results[1:]:
        assert other["accuracy"] == results[0]["accuracy"]
        assert all(torch.equal(other["state"][k], v) for k, v in results[0]["state"].items())


def test_backend_follows_the_device():
    from graphprune.recipes.distributed import backend_for

    assert backend_for(torch.device("cuda", 0)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"

