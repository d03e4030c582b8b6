"""`mtv-eval TARGET`: evaluate a run, pretrained folder or checkpoint on a split; write metrics JSON
and, on request, colorized prediction PNGs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtvision.cli.common import find_run_config, parse, run_command
from mtvision.errors import MTVisionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-eval",
        description="Evaluate a trained model. TARGET is a run folder (config.yaml + model/), a pretrained folder "
        "(config.json + model.safetensors; give --config for the data) or a checkpoint folder under a run.",
        epilog="examples:\n  mtv-eval runs/synthetic_hps_resnet18 --split test --predictions runs/preds\n"
        "  mtv-eval models/invpt_nyud --config configs/nyud/invpt_vitl16_448x576.yaml data.root=/data/NYUDv2\n"
        "exit codes: 0 done, 2 bad arguments or config, 1 runtime failure",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", type=Path, help="run folder, pretrained folder or checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the experiment config, e.g. data.root=/data/NYUDv2")
    parser.add_argument("--config", type=Path, help="experiment YAML (default: the run's config.yaml)")
    parser.add_argument("--split", default="test", help="'test' (default), 'val' or a split name of the dataset")
    parser.add_argument("--out", type=Path, help="metrics JSON (default: TARGET/metrics_<split>.json)")
    parser.add_argument("--predictions", type=Path, help="also write colorized predictions (PNG) to this folder")
    parser.add_argument("--npy", action="store_true", help="with --predictions, also write raw maps as .npy")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    from mtvision import distributed as dist

    try:
        return run_command("mtv-eval", lambda: _run(args), args.overrides, "data.root=/data/NYUDv2")
    finally:
        dist.cleanup()


def _run(args: argparse.Namespace) -> int:
    from mtvision import distributed as dist
    from mtvision.config import ExperimentConfig, load_config
    from mtvision.data.registry import get_dataset
    from mtvision.engine.checkpoint import load_checkpoint
    from mtvision.engine.data import eval_loader, evaluation_set
    from mtvision.engine.evaluator import evaluate
    from mtvision.engine.loggers import format_metrics_table
    from mtvision.engine.progress import Progress
    from mtvision.engine.trainer import model_config_for
    from mtvision.models.pretrained import load_model
    from mtvision.models.registry import create_model

    target = args.target
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    config_path = args.config or find_run_config(target)
    if config_path is None:
        raise MTVisionError(f"no config.yaml found for {target}; pass --config with the experiment YAML (for its data section)")
    cfg = load_config(ExperimentConfig, config_path, args.overrides)
    info = dist.init_distributed(args.device)
    if (target / "config.json").is_file():
        model = load_model(target, device=info.device)
    elif (target / "model" / "config.json").is_file():
        model = load_model(target / "model", device=info.device)
    elif (target / "state.json").is_file():
        state = load_checkpoint(target)
        model = create_model(model_config_for(cfg, dict(get_dataset(cfg.data.dataset).num_classes)))
        model.load_state_dict(state["model"])
        model.to(info.device)
    else:
        raise MTVisionError(f"{target} is neither a run folder, a pretrained folder nor a checkpoint folder")
    pre = model.config.preprocess
    dataset, split = evaluation_set(cfg.data, args.split, pre.mean, pre.std)
    base = getattr(dataset, "dataset", dataset)  # the dataset behind a held-out Subset
    batch_size = args.batch_size or cfg.train.batch_size
    loader = eval_loader(dataset, batch_size, cfg.data, info.rank, info.world_size)
    tasks = {t: model.tasks[t] for t in cfg.data.tasks if t in model.tasks}
    with Progress(len(loader), f"eval {split}", enabled=info.is_main) as bar:
        metrics = evaluate(model, loader, tasks, base.meter_info(), info.device, progress=bar)
    if info.is_main:
        out = args.out or (target / f"metrics_{args.split}.json")
        out.write_text(json.dumps({"split": split, "target": str(target), "metrics": metrics}, indent=2))
        print(format_metrics_table(metrics))
        print(f"metrics: {out}")
    if args.predictions is not None:  # every rank writes its own share of the samples
        _write_predictions(model, loader, tasks, info.device, args.predictions, args.npy, pre.mean, pre.std, info.is_main)
    return 0


def _write_predictions(model, loader, tasks, device, folder: Path, npy: bool, mean, std, is_main: bool = True) -> None:
    """Colorized prediction PNGs, one per sample and task, with a progress bar."""
    import numpy as np

    from mtvision import visualize
    from mtvision.engine.evaluator import predict_panels
    from mtvision.engine.progress import Progress

    folder.mkdir(parents=True, exist_ok=True)
    with Progress(len(loader), "predictions", enabled=is_main) as bar:
        for batch in loader:
            for panel in predict_panels(model, batch, tasks, device, mean, std, limit=batch["image"].shape[0]):
                sid = panel["sample_id"]
                visualize.save_png(str(folder / f"{sid}_image.png"), panel["image"])
                for name, task in tasks.items():
                    pred = panel["predictions"][name]
                    visualize.save_png(str(folder / f"{sid}_{name}.png"), task.colorize(pred))
                    if npy:
                        np.save(folder / f"{sid}_{name}.npy", pred)
            bar.update(1)
    if is_main:
        print(f"predictions: {folder}")


if __name__ == "__main__":
    sys.exit(main())
