"""Transfer recipes: config checks before training, exact beta folding, checkpoints and resume,
DDP agreement across ranks, and S->TP->T on real pretrained EfficientNet-Lite0 + Flowers-17."""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import graphprune as gp
import graphprune.recipes as R
from graphprune.recipes import command
from graphprune.recipes import run as pipelines  # RecipeRun calls finetune_ and prune_stage_

SIZE_PX = 32


def _synthetic(n: int = 16, classes: int = 2, seed: int = 0) -> R.TransferData:
    """A learnable toy task: class k adds a bright patch in quadrant k."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE_PX, SIZE_PX, generator=generator) * 0.1
    labels = torch.arange(n) % classes
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label % 4, 2)
        images[i, :, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 1.0
    pairs = TensorDataset(images, labels)
    train = DataLoader(pairs, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(images, labels), batch_size=8)
    return R.TransferData(train, val, tuple(f"c{k}" for k in range(classes)))


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False).eval()


def _quiet(**fields) -> R.TransferConfig:
    fields.setdefault("run", R.RunConfig(progress=False))
    return R.TransferConfig(**fields)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- bad configs fail first


@pytest.mark.parametrize("build", [
    lambda: R.TransTailorConfig(tau=-0.01),
    lambda: R.FinetuneConfig(mode="partial"),
    lambda: R.FinetuneConfig(epochs=-1),
    lambda: R.FinetuneConfig(lr=0.0),
    lambda: R.PruneConfig(ratio=0.3, flops_reduction=0.3),
    lambda: R.PruneConfig(flops_reduction=1.0),
    lambda: R.PruneConfig(scorer="nope"),
    lambda: R.PruneConfig(scorer="taylor", scorer_options={"data": []}),
    lambda: R.PruneConfig(scope="everywhere"),
    lambda: R.PruneConfig(flops_reduction=0.3, latency_reduction=0.3),
    lambda: R.PruneConfig(latency_reduction=1.0),
    lambda: R.PruneConfig(latency_reduction=0.3, granularity="kernel"),
    lambda: R.PruneConfig(latency_reduction=0.3, steps=2),
    lambda: R.PruneConfig(latency_reduction=0.3, latency_batch_size=0),
], ids=["tau<0", "mode", "epochs<0", "lr=0", "two-budgets", "reduction=1", "scorer", "owned-option", "scope",
        "flops-and-latency", "latency=1", "latency-kernel", "latency-steps", "latency-batch"])
def test_bad_config_raises(build):
    with pytest.raises(gp.InvalidArgumentError):
        build()


def test_prune_config_budget_defaults_to_flops_and_takes_one_alone():
    assert R.PruneConfig().budget() == {"flops_reduction": 0.3}
    assert R.PruneConfig(ratio=0.2).budget() == {"ratio": 0.2}  # no flops_reduction=None needed
    assert R.PruneConfig(latency_reduction=0.25).budget() == {"latency_reduction": 0.25}
    recorded = R.TransferConfig(prune=R.PruneConfig(latency_reduction=0.25)).to_dict()["prune"]
    assert (recorded["latency_reduction"], recorded["flops_reduction"]) == (0.25, None)


def test_prune_stage_to_a_measured_latency_reduction(tmp_path, monkeypatch):
    """The recipe's prune stage passes the latency target to the engine and records predicted vs measured."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loaded machine may miss the 2 points
        record = R.prune_stage_(model, _synthetic(), R.PruneConfig(latency_reduction=0.3), progress=False)
    latency = record.details["latency"]
    assert record.details["target_latency_reduction"] == 0.3 and latency["target"] == 0.3
    assert latency["measured"] > 0.05 and latency["batch_size"] == 1 and latency["steps"]
    assert sum(p.numel() for p in model.parameters()) < before and (tmp_path / "latency.json").is_file()


def _image_tree(root: Path, splits: dict[str, list[str]]) -> Path:
    from PIL import Image

    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(root / split / name / "a.png")
    return root


def test_missing_split_and_class_mismatch_raise_before_loading(tmp_path):
    model = _tiny()
    only_train = _image_tree(tmp_path / "a", {"train": ["x", "y"]})
    with pytest.raises(gp.InvalidArgumentError, match="split 'val' is missing"):
        R.image_folder_data(only_train, model, image_size=SIZE_PX)
    differ = _image_tree(tmp_path / "b", {"train": ["x", "y"], "val": ["x", "z"]})
    with pytest.raises(gp.InvalidArgumentError, match="class folders differ"):
        R.image_folder_data(differ, model, image_size=SIZE_PX)
    good = _image_tree(tmp_path / "c", {"train": ["x", "y"], "val": ["x", "y"]})
    data = R.image_folder_data(good, model, image_size=SIZE_PX, batch_size=2)
    assert data.class_names == ("x", "y") and data.example_inputs().shape == (1, 3, SIZE_PX, SIZE_PX)


def test_recipe_refuses_mismatched_classes_before_training(monkeypatch):
    calls = []
    monkeypatch.setattr(pipelines, "finetune_", lambda *a, **k: calls.append(k["name"]))
    data = _synthetic()
    data.train.dataset.classes = ["c0", "c1"]
    data.val.dataset.classes = ["c0", "c9"]
    with pytest.raises(gp.InvalidArgumentError, match="train and val classes differ"):
        R.s_tp_t(_tiny(), data, _quiet())
    with pytest.raises(gp.InvalidArgumentError, match="train and val classes differ"):
        R.transtailor(_tiny(), data, R.TransTailorConfig(run=R.RunConfig(progress=False)))
    with pytest.raises(gp.InvalidArgumentError, match="classifier"):
        R.sp_t(_tiny(), _synthetic(), _quiet(prune=R.PruneConfig(classifier_reuse=True)))
    assert calls == []


# ----------------------------------------------------------------------------- importance factors fold exactly


def _randomize_norms_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine, so a fold in the wrong place shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)


def _check_fold_is_exact(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> None:
    groups = gp.find_groups(gp.trace(model, x), ignore=gp.classifier_names(model), model=model)
    alphas = {g.id: torch.empty(g.size).uniform_(0.5, 1.5, generator=generator) for g in groups}
    factors = R.importance_factors(groups, model, alphas)
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(factors) <= convs and len(factors) >= len(groups)  # every producer, depthwise ones included
    plain = model(x)
    with R.applied_factors(model, factors):
        hooked = model(x)
    assert not torch.allclose(hooked, plain, atol=1e-3)  # the factors do change the function
    assert torch.equal(model(x), plain)  # hooks removed on exit
    folded = R.fold_factors_(copy.deepcopy(model), factors)
    assert not any(m._forward_hooks for m in folded.modules())
    torch.testing.assert_close(folded(x), hooked, rtol=1e-4, atol=1e-5)
    training = copy.deepcopy(model).train()  # batch statistics (what fine-tuning sees): the fold matches too
    with R.applied_factors(training, factors):
        hooked_train = training(x)
    # batch-of-2 statistics through ~50 norms amplify float32 rounding (measured 1.5e-4 on Lite0 logits)
    torch.testing.assert_close(folded.train()(x), hooked_train, rtol=1e-3, atol=1e-3)


def test_folding_importance_factors_leaves_outputs_unchanged():
    model = _tiny()
    generator = torch.Generator().manual_seed(1)
    _randomize_norms_(model, generator)
    _check_fold_is_exact(model, torch.randn(2, 3, SIZE_PX, SIZE_PX, generator=generator), generator)


def test_folding_is_exact_on_real_efficientnet_lite0(efficientnet_lite0_package):
    """The real case: ImageNet statistics, BatchNormAct2d with ReLU6, depthwise convs, residual streams."""
    from graphprune.assets import load_efficientnet_lite0

    generator = torch.Generator().manual_seed(2)
    model = load_efficientnet_lite0().double().eval()  # float64: the fold is exact, not float32 rounding
    _check_fold_is_exact(model, torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64), generator)


def test_importance_factors_are_the_trained_alphas_on_every_producer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 6, 3, groups=6), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    groups = gp.find_groups(gp.trace(net, x))
    alphas = {g.id: torch.linspace(0.5, 1.5, g.size) for g in groups}
    factors = R.importance_factors(groups, net, alphas)
    # the pointwise conv and the depthwise conv carry the same channels; alpha scaled both while it trained
    assert sorted(factors) == ["0", "3"]
    torch.testing.assert_close(factors["0"], torch.linspace(0.5, 1.5, 6))
    torch.testing.assert_close(factors["3"], torch.linspace(0.5, 1.5, 6))


def test_untrained_alphas_are_one_and_target_taylor_scores_match():
    from graphprune.scoring.target_taylor import fit_channel_scales

    model = _tiny()
    data = _synthetic()
    x = data.example_inputs()
    groups = gp.find_groups(gp.trace(model, x), ignore=gp.classifier_names(model), model=model)
    fitted = fit_channel_scales(groups, model, data=data.val, epochs=0, progress=False)
    assert all(torch.equal(a, torch.ones(g.size)) for g, a in zip(groups, fitted.alphas.values()))
    assert all(torch.equal(f, torch.ones_like(f)) for f in R.importance_factors(groups, model, fitted.alphas).values())
    scores = gp.get_scorer("target_taylor")(groups, model, data=data.val, epochs=0, progress=False)
    assert all(torch.equal(scores[k], fitted.scores[k]) for k in scores)


# ----------------------------------------------------------------------------- recipes, checkpoints, resume


def test_s_tp_t_records_and_checkpoints(tmp_path):
    config = _quiet(source=R.FinetuneConfig(epochs=2, lr=3e-3),
                    prune=R.PruneConfig(scorer="l1", flops_reduction=None, ratio=0.4, scale_epochs=True),
                    target=R.FinetuneConfig(epochs=1, lr=1e-3),
                    run=R.RunConfig(checkpoint_dir=str(tmp_path), progress=False))
    source = _tiny()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model, result = R.s_tp_t(source, _synthetic(), config)
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())  # input untouched
    assert [s.name for s in result.stages] == ["probe", "source", "prune", "target"]
    prune, target = result.stages[2], result.stages[3]
    assert prune.macs == target.macs < result.stages[1].macs == result.base_macs
    assert prune.details["flops_reduction"] == pytest.approx(result.flops_reduction)
    assert target.steps == round(4 / (1 - prune.details["flops_reduction"]))  # 4 batches, scaled
    assert result.val_accuracy == pytest.approx(R.evaluate(model, _synthetic().val))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["probe", "source", "prune", "target"]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 5
    assert _same_state(gp.io.load(tmp_path / "stages" / "target"), model)
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_iterative_s_tp_t_reaches_the_budget_in_steps(tmp_path, monkeypatch):
    """prune.steps = 3: three cuts of 1/3 of the budget each (of the unpruned MACs), each recovered
    for a third of the epochs; stages named so that resume and the last records read as one cut."""
    config = _quiet(source=R.FinetuneConfig(epochs=1), target=R.FinetuneConfig(epochs=3),
                    prune=R.PruneConfig(scorer="l1", flops_reduction=0.3, steps=3),
                    run=R.RunConfig(checkpoint_dir=str(tmp_path), progress=False))
    source = timm.create_model("resnet18", pretrained=False).eval()  # fine enough for 10 % steps (test_* are not)
    model, result = R.s_tp_t(source, _synthetic(), config)
    names = [s.name for s in result.stages]
    assert names == ["probe", "source", "prune.1", "target.1", "prune.2", "target.2", "prune", "target"]
    base = result.base_macs
    reached = [1 - result.stage(n).macs / base for n in ("prune.1", "prune.2", "prune")]
    assert reached == pytest.approx([0.1, 0.2, 0.3], abs=0.015)  # each step ends at its share of the budget
    assert [result.stage(n).steps for n in ("target.1", "target.2", "target")] == [4, 4, 4]  # 1 epoch of 4 batches
    assert result.flops_reduction == pytest.approx(0.3, abs=0.015)
    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(pipelines, "finetune_", no_training)
    monkeypatch.setattr(pipelines, "prune_stage_", no_training)
    again, resumed = R.s_tp_t(source, _synthetic(), config)  # every stage checkpointed: loaded, not rerun
    assert _same_state(again, model) and [s.name for s in resumed.stages] == names


@pytest.mark.parametrize("fields", [{"steps": 0}, {"steps": 2.0}, {"steps": 2, "ratio": 0.3, "flops_reduction": None},
                                    {"steps": 2, "granularity": "kernel"}])
def test_prune_steps_bad_values(fields):
    with pytest.raises(gp.InvalidArgumentError, match="steps"):
        R.PruneConfig(**fields)


def test_resume_skips_finished_stages(tmp_path, monkeypatch):
    config = _quiet(source=R.FinetuneConfig(epochs=1), prune=R.PruneConfig(flops_reduction=None, ratio=0.3),
                    target=R.FinetuneConfig(epochs=1), run=R.RunConfig(checkpoint_dir=str(tmp_path), progress=False))
    real = pipelines.finetune_
    ran: list[str] = []

    def crash_in_target(model, data, stage_config, **options):
        ran.append(options["name"])
        if options["name"] == "target":
            raise RuntimeError("simulated crash")
        return real(model, data, stage_config, **options)

    monkeypatch.setattr(pipelines, "finetune_", crash_in_target)
    with pytest.raises(RuntimeError, match="simulated crash"):
        R.s_tp_t(_tiny(), _synthetic(), config)
    assert ran == ["source", "target"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["probe", "prune", "source"]

    def counting(model, data, stage_config, **options):
        ran.append(options["name"])
        return real(model, data, stage_config, **options)

    monkeypatch.setattr(pipelines, "finetune_", counting)
    monkeypatch.setattr(pipelines, "prune_stage_", lambda *a, **k: pytest.fail("prune should be resumed"))
    ran.clear()
    model, result = R.s_tp_t(_tiny(), _synthetic(), config)
    assert ran == ["target"]
    assert [s.name for s in result.stages] == ["probe", "source", "prune", "target"]
    again, _ = R.s_tp_t(_tiny(), _synthetic(), config)  # everything finished: nothing runs
    assert ran == ["target"] and _same_state(again, model)
    other = _quiet(source=R.FinetuneConfig(epochs=2), run=config.run)
    with pytest.raises(gp.InvalidArgumentError, match="another configuration"):
        R.s_tp_t(_tiny(), _synthetic(), other)


@pytest.mark.parametrize("granularity", ["kernel", "unstructured"])
def test_transfer_cli_granularity_writes_the_deployed_model_and_resumes(granularity, tmp_path, capsys):
    from graphprune import cli

    root = _image_tree(tmp_path / "data", {"train": ["a", "b"], "val": ["a", "b"]})
    out = tmp_path / "out"
    argv = ["transfer", "test_resnet", "--data", str(root), "-o", str(out), "--recipe", "sp_t", "--granularity",
            granularity, "--flops-reduction", "0.5", "--target-epochs", "1", "--image-size", str(SIZE_PX),
            "--batch-size", "2", "--quiet", "--device", "cpu", "--json"]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["config"]["prune"]["granularity"] == granularity
    assert abs(metrics["stages"][-1]["details"]["flops_reduction"] - 0.5) < 0.005
    assert (out / "checkpoints" / "stages" / "prune" / "masks.pt").is_file()
    model = gp.io.load(out / "model")
    assert any(type(m).__name__ == "KernelConv2d" for m in model.modules()) == (granularity == "kernel")
    assert cli.main(argv) == 0  # the same command resumes: every stage read back
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in metrics["stages"]]
    s_to_t = cli.build_parser().parse_args([*argv[:6], "--recipe", "s_to_t", *argv[8:]])
    with pytest.raises(gp.InvalidArgumentError, match="applies to --recipe s_tp_t or sp_t"):
        command._configs(s_to_t)


def test_sp_t_zero_epochs_is_zero_shot_pruning():
    config = _quiet(prune=R.PruneConfig(scorer="random", flops_reduction=None, ratio=0.3),
                    target=R.FinetuneConfig(epochs=0))
    model, result = R.sp_t(_tiny(), _synthetic(), config)
    assert [s.name for s in result.stages] == ["probe", "prune", "target"]
    assert result.final.steps == 0 and result.flops_reduction > 0.2
    assert result.final.val_accuracy == result.stages[1].val_accuracy


def test_classifier_reuse_freezes_the_fine_tuned_classifier_and_alignment_runs():
    config = _quiet(source=R.FinetuneConfig(epochs=1),
                    prune=R.PruneConfig(flops_reduction=None, ratio=0.3, classifier_reuse=True, alignment_weight=1.0),
                    target=R.FinetuneConfig(epochs=1))
    full, _ = R.s_to_t(_tiny(), _synthetic(), _quiet(source=config.source))  # same seed, same data order
    model, result = R.s_tp_t(_tiny(), _synthetic(), config)
    head, full_head = model.get_classifier(), full.get_classifier()
    assert torch.equal(head.weight, full_head.weight) and torch.equal(head.bias, full_head.bias)
    assert result.final.details["alignment_weight"] == 1.0 and result.final.train_loss is not None


def test_transtailor_search_returns_best_folded_step():
    config = R.TransTailorConfig(source=R.FinetuneConfig(epochs=2, lr=3e-3), step_flops_reduction=0.15, max_steps=2,
                                 tau=1.0, scoring_batches=2, finetune=R.FinetuneConfig(epochs=1, lr=1e-3),
                                 run=R.RunConfig(progress=False))
    data = _synthetic()
    model, result = R.transtailor(_tiny(), data, config)
    steps = [s for s in result.stages if s.kind == "search-step"]
    assert [s.name for s in steps] == ["step-1", "step-2"]
    assert steps[1].macs < steps[0].macs < result.base_macs
    best = max(steps, key=lambda s: s.val_accuracy)
    assert result.final.name == best.name
    assert R.evaluate(model, data.val) == pytest.approx(best.val_accuracy)  # beta folded: no hooks needed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, granularity: str = "channel") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    prune = (R.PruneConfig(scorer="taylor", flops_reduction=None, ratio=0.3, scoring_batches=2)
             if granularity == "channel" else R.PruneConfig(granularity=granularity, flops_reduction=0.3))
    config = _quiet(source=R.FinetuneConfig(epochs=1, lr=3e-3), prune=prune,
                    target=R.FinetuneConfig(epochs=1),
                    run=R.RunConfig(checkpoint_dir=str(Path(out_dir) / "run"), progress=False, device="cpu"))
    model, result = R.s_tp_t(_tiny(), _synthetic(), config)
    torch.save({"state": model.state_dict(), "accuracy": result.val_accuracy,
                "plans": list(model.graphprune_plans)}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("granularity", ["channel", "kernel"])
def test_ddp_two_ranks_end_identical(tmp_path, free_port, granularity):
    """Channels: rank 0 ships its plan; kernels: each rank masks its copy, and they agree."""
    start = time.perf_counter()
    mp.spawn(_ddp_worker, args=(2, free_port, str(tmp_path), granularity), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["plans"] == ranks[1]["plans"] and ranks[0]["plans"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"]
    saved = gp.io.load(tmp_path / "run" / "stages" / "target")  # written once, by rank 0
    assert all(torch.equal(v, ranks[0]["state"][k]) for k, v in saved.state_dict().items())
    assert time.perf_counter() - start < 300


# ----------------------------------------------------------------------------- real model, real data


def test_s_tp_t_efficientnet_lite0_flowers17(shared_data, efficientnet_lite0_package):
    """Pretrained EfficientNet-Lite0 -> Flowers-17 (17 classes, chance 5.9 %) at 96 px."""
    from graphprune.assets import load_efficientnet_lite0

    source = load_efficientnet_lite0()
    data = R.image_folder_data(shared_data / "flowers17", source, image_size=96, batch_size=34, per_class=8,
                               val_per_class=5, augment=False)
    config = _quiet(source=R.FinetuneConfig(epochs=2, mode="linear", lr=1e-2),
                    prune=R.PruneConfig(scorer="taylor", flops_reduction=0.3),
                    target=R.FinetuneConfig(epochs=2, mode="full", lr=2e-3, norm_stats="train"))
    model, result = R.s_tp_t(source, data, config)
    source_acc, pruned_acc = result.stage("source").val_accuracy, result.final.val_accuracy
    assert source_acc >= 0.45, result.to_json()
    assert pruned_acc >= 0.30, result.to_json()
    assert result.flops_reduction == pytest.approx(0.3, abs=0.02)
