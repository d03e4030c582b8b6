"""The search runner end to end: outputs, the ready-to-train config, budgets, configs, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mtvision.config import ConfigError, ExperimentConfig, from_dict, load_config
from mtvision.engine.run_folder import RunFolderError
from mtvision.models.branching_spec import BranchingSpec
from mtvision.search.config import SearchConfig
from mtvision.search.flops import BudgetError
from mtvision.search.runner import search
from tests.gloo import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(out: Path, method: str = "bmtas", **search_opts) -> SearchConfig:
    raw = {
        "output_dir": str(out),
        "data": {"dataset": "synthetic", "tasks": ["semseg", "depth", "normals"], "height": 32, "width": 32,
                 "scale_range": [1.0, 1.0], "photometric": False, "num_samples": {"train": 20, "val": 4, "test": 4},
                 "num_workers": 0},
        "model": {"backbone": {"name": "test_resnet"}, "decoder_options": {"neck_channels": 8, "head_channels": 8}},
        "search": {"method": method, "epochs": 3, "iterations_per_epoch": 2, "batch_size": 4, "warmup_epochs": 1,
                   "console": "plain", "log_interval": 2, **search_opts},
        "recipe": {"train": {"iterations": 2, "batch_size": 2, "eval_interval": 2},
                   "logging": {"console": "plain", "num_val_images": 1}, "output_dir": str(out / "train")},
    }
    return from_dict(SearchConfig, raw)


def test_bmtas_search_writes_everything_and_the_training_config_trains(tmp_path, capsys):
    from mtvision.engine.trainer import train

    out = tmp_path / "s"
    result = search(tiny(out), device="cpu")
    for name in ("spec.yaml", "arch_params.jsonl", "sharing.png", "expected_flops.json", "train_config.yaml", "search_config.yaml"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "arch_params.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and [r["warmup"] for r in records] == [True, False, False]
    assert records[0]["temperature"] == 5.0 and records[-1]["temperature"] == pytest.approx(0.1)
    assert records[0]["arch_loss"] is None and records[1]["resource_loss"] > 0
    assert len(records[-1]["sharing"]) == 4 and len(records[-1]["probabilities"][0]) == 3
    assert records[0]["logits"] != records[-1]["logits"]  # the architecture moved
    spec = BranchingSpec.load(out / "spec.yaml")
    assert spec == result.spec
    flops = json.loads((out / "expected_flops.json").read_text())
    assert flops["cheapest_flops"] <= flops["spec_flops"] <= flops["costliest_flops"]
    assert flops["cheapest_flops"] < flops["expected_flops"] < flops["costliest_flops"]
    assert (out / "sharing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "branching spec" in capsys.readouterr().out

    cfg = load_config(ExperimentConfig, out / "train_config.yaml", ["train.iterations=1", "train.eval_interval=1"])
    assert cfg.model.decoder == "branched"
    assert BranchingSpec.from_dict(cfg.model.decoder_options["spec"]) == spec
    trained = train(cfg, device="cpu")
    assert trained.step == 1 and (out / "train" / "model" / "config.json").is_file()


def test_ltb_search_and_budget_fitting(tmp_path):
    cfg = tiny(tmp_path / "ltb", "ltb")

    result = search(cfg, device="cpu")
    assert result.flops["estimate"].startswith("monte_carlo")
    assert [r["temperature"] for r in result.history][1] == pytest.approx(result.history[0]["temperature"] / 2**0.5)
    low = result.flops["cheapest_flops"]
    budget = low + 1.0
    budgeted = search(tiny(tmp_path / "ltb_budget", "ltb", target_flops=budget), device="cpu")
    assert budgeted.flops["spec_flops"] <= budget and budgeted.flops["budget"] == budget
    assert budgeted.spec == BranchingSpec.all_shared(["semseg", "depth", "normals"], 4, "test_resnet")


def test_a_budget_below_the_cheapest_tree_fails_before_any_work(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(BudgetError, match="below the cheapest tree"):
        search(tiny(out, target_flops=1e3), device="cpu")
    assert not out.exists()


def test_an_used_output_dir_needs_overwrite(tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(RunFolderError, match="--overwrite"):
        search(tiny(out), device="cpu")


def test_config_errors_are_clear(tmp_path):
    base = tiny(tmp_path / "c")
    raw = {"output_dir": "x", "data": {"dataset": "synthetic"}, "model": {}, "recipe": {}}
    with pytest.raises(ConfigError, match="resource_weight is for bmtas"):
        from_dict(SearchConfig, {**raw, "search": {"method": "ltb", "resource_weight": 0.1}})
    with pytest.raises(ConfigError, match="'branched'"):
        from_dict(SearchConfig, {**raw, "model": {"decoder": "hps"}, "search": {}})
    with pytest.raises(ConfigError, match="recipe.optim"):
        from_dict(SearchConfig, {**raw, "recipe": {"optm": {}}, "search": {}})
    with pytest.raises(ConfigError, match="recipe"):
        from_dict(SearchConfig, {**raw, "recipe": {"optim": {"lr": -1.0}}, "search": {}})
    with pytest.raises(ConfigError, match="did you mean 'search.epochs'"):
        from_dict(SearchConfig, {**raw, "search": {"epoch": 3}})
    assert base.search.method == "bmtas"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "search").glob("*.yaml")))
def test_shipped_search_configs_validate_and_give_training_configs(name):
    cfg = load_config(SearchConfig, ROOT / "configs" / "search" / name)
    cfg.validate()
    exp = cfg.experiment(BranchingSpec.separate(cfg.data.tasks, 4).to_dict())
    exp.validate()
    assert exp.model.decoder == "branched" and exp.data.tasks == cfg.data.tasks
    if cfg.data.dataset != "synthetic":
        assert cfg.data.holdout_fraction > 0 and exp.data.holdout_fraction > 0
        assert cfg.model["backbone"]["weights"]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = search(tiny(Path(out), epochs=3, iterations_per_epoch=2, batch_size=2), device="cpu")
    Path(out).with_name(f"rank{rank}.json").write_text(json.dumps([r["logits"] for r in result.history]))


def test_ddp_ranks_keep_bit_identical_architecture_parameters(tmp_path):
    ctx = torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=False, start_method="fork"
    )
    while not ctx.join(timeout=120):
        pass
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b  # exact float equality, every epoch
    assert a[0] != a[-1]
    assert (tmp_path / "ddp" / "spec.yaml").is_file()
