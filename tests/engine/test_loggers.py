import json
import math
import struct
import sys

import numpy as np
import pytest

from mtvision.engine import loggers as L
from mtvision.errors import MTVisionError
from mtvision.tasks import get_task


class RecordingLogger(L.Logger):
    def __init__(self, fail_on_close: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_on_close = fail_on_close

    def log_config(self, config):
        self.calls.append(("config", dict(config)))

    def log_scalars(self, values, step):
        self.calls.append(("scalars", dict(values), step))

    def log_predictions(self, step, panels):
        self.calls.append(("predictions", step, len(panels)))

    def log_artifact(self, path, name, kind="model", aliases=()):
        self.calls.append(("artifact", str(path), name, kind, list(aliases)))

    def close(self):
        self.calls.append(("close",))
        if self.fail_on_close:
            raise RuntimeError("boom")


def semseg_depth_panel(sample_id: str = "scene_0007") -> L.PredictionPanel:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    seg_pred = np.zeros((16, 24), dtype=np.int64)
    seg_pred[:, 12:] = 2
    seg_gt = seg_pred.copy()
    seg_gt[:2] = 255
    depth_gt = np.linspace(0.5, 4.0, 16 * 24, dtype=np.float32).reshape(16, 24)
    depth_gt[0, 0] = 0.0
    return L.PredictionPanel(
        image=image,
        predictions={"semseg": seg_pred, "depth": depth_gt * 1.1},
        targets={"semseg": seg_gt, "depth": depth_gt},
        class_names={"semseg": ["wall", "floor", "chair"]},
        sample_id=sample_id,
    )


# ---------------------------------------------------------------- JSONL
def test_jsonl_lines_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(L.time, "time", lambda: 1700000000.5)
    path = tmp_path / "run" / "metrics.jsonl"
    with L.JsonlLogger(path) as logger:
        logger.log_config({"optim": {"lr": 1e-3, "betas": (0.9, 0.999)}, "out": tmp_path / "x"})
        logger.log_scalars({"train/loss/total": np.float32(0.5), "train/lr": 0.001, "epoch": 3}, step=10)
        logger.log_scalars({"train/loss/depth": math.nan, "train/grad_norm": math.inf}, step=11)
    with L.JsonlLogger(path) as logger:  # a resumed run appends
        logger.log_artifact(tmp_path / "ckpt", "best", aliases=["best", "step-11"])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"time": 1700000000.5, "config": {"optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "out": str(tmp_path / "x")}},
        {"step": 10, "time": 1700000000.5, "train/loss/total": 0.5, "train/lr": 0.001, "epoch": 3},
        {"step": 11, "time": 1700000000.5, "train/loss/depth": None, "train/grad_norm": None},
        {
            "time": 1700000000.5,
            "artifact": "best",
            "kind": "model",
            "path": str(tmp_path / "ckpt"),
            "aliases": ["best", "step-11"],
        },
    ]
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_jsonl_flushes_each_line_and_refuses_after_close(tmp_path):
    path = tmp_path / "m.jsonl"
    logger = L.JsonlLogger(path)
    logger.log_scalars({"a": 1.0}, step=0)
    assert json.loads(path.read_text())["a"] == 1.0  # visible before close
    logger.close()
    logger.close()
    with pytest.raises(MTVisionError, match="closed"):
        logger.log_scalars({"a": 2.0}, step=1)


def test_to_jsonable_handles_dataclasses_arrays_and_tensors():
    import dataclasses

    import torch

    @dataclasses.dataclass
    class Optim:
        lr: float = 0.1
        steps: tuple = (1, 2)

    assert L.to_jsonable({"o": Optim(), "a": np.arange(3), "t": torch.tensor(2.5), 1: np.int64(4)}) == {
        "o": {"lr": 0.1, "steps": [1, 2]},
        "a": [0, 1, 2],
        "t": 2.5,
        "1": 4,
    }


# ---------------------------------------------------------------- console table
@pytest.mark.parametrize(
    ("value", "text"),
    [(45.2134, "45.21"), (3.14159, "3.142"), (0.61234, "0.6123"), (0.0001234, "1.23e-04"), (0.0, "0.0000"), (7, "7")],
)
def test_format_metric(value, text):
    assert L.format_metric(value) == text


def test_format_metrics_table_exact():
    table = L.format_metrics_table(
        {
            "semseg": {"mIoU": 45.2134, "pixAcc": 71.3},
            "depth": {"rmse": 0.61234, "absrel": 0.182},
            "normals": {"mean": 21.456, "rmse": 29.01},
        }
    )
    assert table == (
        "task      mIoU  pixAcc    rmse  absrel   mean\n"
        "-------  -----  ------  ------  ------  -----\n"
        "semseg   45.21   71.30       -       -      -\n"
        "depth        -       -  0.6123  0.1820      -\n"
        "normals      -       -   29.01       -  21.46"
    )


# ---------------------------------------------------------------- group and factory
def test_logger_group_fans_out_and_closes_all():
    first, second = RecordingLogger(fail_on_close=True), RecordingLogger()
    group = L.LoggerGroup([first, second])
    group.log_config({"seed": 1})
    group.log_scalars({"train/loss/total": 1.0}, step=3)
    group.log_predictions(3, [semseg_depth_panel()])
    group.log_artifact("/tmp/ckpt", "last", aliases=iter(["latest"]))  # a one-shot iterable reaches both
    with pytest.raises(RuntimeError, match="boom"):
        group.close()
    expected = [
        ("config", {"seed": 1}),
        ("scalars", {"train/loss/total": 1.0}, 3),
        ("predictions", 3, 1),
        ("artifact", "/tmp/ckpt", "last", "model", ["latest"]),
        ("close",),
    ]
    assert first.calls == expected
    assert second.calls == expected


def test_build_loggers_without_wandb_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now fail
    group = L.build_loggers(tmp_path, config={"seed": 3})
    assert [type(lg) for lg in group.loggers] == [L.JsonlLogger]
    group.log_scalars({"val/semseg/mIoU": 50.0}, step=1)
    group.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["config"] == {"seed": 3}
    assert lines[1]["val/semseg/mIoU"] == 50.0
    assert L.build_loggers(tmp_path / "rank1", wandb=True, is_main_process=False).loggers == []
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------- panels and pictures
def test_panel_rejects_bad_shapes():
    with pytest.raises(MTVisionError, match="uint8"):
        L.PredictionPanel(np.zeros((4, 4, 3), np.float32), {}, {})
    with pytest.raises(MTVisionError, match="depth"):
        L.PredictionPanel(np.zeros((4, 4, 3), np.uint8), {"depth": np.zeros((4, 5))}, {})


def test_colour_pair_puts_target_and_prediction_on_one_scale():
    target = np.full((2, 3), 1.0, np.float32)
    target[0, 0] = 2.0
    prediction = np.full((2, 3), 4.0, np.float32)
    target_rgb, prediction_rgb = L.colour_pair("depth", target, prediction)
    colorize = get_task("depth").colorize
    np.testing.assert_array_equal(target_rgb, colorize(np.concatenate([target, prediction], axis=1))[:, :3])
    # alone, the constant prediction would span no range; here it is the far end of the shared scale
    assert prediction_rgb[0, 0].tolist() == colorize(np.array([[1.0, 4.0]]))[0, 1].tolist()
    assert target_rgb[1, 1].tolist() == colorize(np.array([[1.0, 4.0]]))[0, 0].tolist()
    none_rgb, alone = L.colour_pair("saliency", None, np.array([[0.0, 1.0]]))
    assert none_rgb is None and alone.tolist() == get_task("saliency").colorize(np.array([[0.0, 1.0]])).tolist()
    assert alone[0, 0].tolist() != alone[0, 1].tolist()  # the top of the heat scale, not its bottom


def test_class_labels_name_present_ids_and_ignore():
    assert L.class_labels(semseg_depth_panel(), "semseg") == {0: "wall", 2: "chair", 255: "ignore"}
    panel = L.PredictionPanel(np.zeros((1, 2, 3), np.uint8), {"parts": np.array([[0, 9]])}, {})
    assert L.class_labels(panel, "parts") == {0: "0", 9: "9"}


# ---------------------------------------------------------------- real wandb, offline
def read_wandb_records(path):
    """Records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of CRC/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        chunks.append(data[pos : pos + length])
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_wandb_offline_run_records_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "config.json").write_text('{"tasks": ["semseg", "depth"]}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)

    group = L.build_loggers(
        tmp_path / "out",
        wandb=True,
        wandb_run_name="unit",
        wandb_tags=("test",),
        config={"optim": {"lr": 0.002}, "seed": 7},
    )
    wandb_logger = group.loggers[-1]
    assert isinstance(wandb_logger, L.WandbLogger)
    group.log_scalars({"train/loss/total": 0.75, "train/loss/semseg": 0.5}, step=4)
    group.log_scalars({"val/semseg/mIoU": 41.5, "val/depth/rmse": 0.625}, step=8)
    group.log_predictions(8, [semseg_depth_panel()])
    group.log_artifact(folder, "mtvision model/best", aliases=["best", "step-8"])
    with pytest.raises(MTVisionError, match="does not exist"):
        wandb_logger.log_artifact(tmp_path / "missing", "x")
    group.close()
    import wandb

    wandb.teardown()  # run.finish() may return before wandb-core has flushed the offline transaction log

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("*.wandb")
    records = read_wandb_records(log_file)
    by_type: dict[str, list] = {}
    for record in records:
        by_type.setdefault(record.WhichOneof("record_type"), []).append(record)

    assert "run" in by_type, (sorted(by_type), log_file.stat().st_size)
    (run_record,) = [r.run for r in by_type["run"]]
    assert run_record.display_name == "unit" and list(run_record.tags) == ["test"]
    config = {item.key: json.loads(item.value_json) for r in by_type["config"] for item in r.config.update}
    assert config["optim"] == {"lr": 0.002} and config["seed"] == 7

    history = []
    for r in by_type["history"]:
        items = {"/".join(item.nested_key) or item.key: item.value_json for item in r.history.item}
        history.append((r.history.step.num, items))
    scalars = {step: {k: json.loads(v) for k, v in items.items() if not k.startswith("_")} for step, items in history}
    assert scalars[4] == {"train/loss/total": 0.75, "train/loss/semseg": 0.5}
    assert scalars[8]["val/semseg/mIoU"] == 41.5 and scalars[8]["val/depth/rmse"] == 0.625
    assert scalars[8]["val/predictions/semseg/_type"] == "images/separated"
    assert scalars[8]["val/predictions/depth/count"] == 1
    assert scalars[8]["val/predictions/depth/captions"] == ["scene_0007: image | target | prediction"]

    media = sorted(p.relative_to(run_dir / "files" / "media" / "images") for p in run_dir.rglob("*.png"))
    assert any(str(p).startswith("val/predictions/semseg_") for p in media)
    assert any(str(p).startswith("val/predictions/depth_") for p in media)
    assert len([p for p in media if str(p).startswith("mask/val/predictions/semseg_")]) == 2  # prediction + gt
    depth_png = next(run_dir.rglob("val/predictions/depth_*.png"))
    import cv2

    assert cv2.imread(str(depth_png)).shape == (2 * 2 + 16, 3 * 24 + 4 * 2, 3)  # image | target | prediction

    (artifact,) = [r.artifact for r in by_type["artifact"]]
    assert artifact.name == "mtvision-model-best" and artifact.type == "model"
    assert set(artifact.aliases) == {"best", "step-8", "latest"}  # wandb adds 'latest' itself
    assert sorted(entry.path for entry in artifact.manifest.contents) == ["config.json", "model.safetensors"]
    assert wandb_logger.run is None  # finished


# ---------------------------------------------------------------- W&B resume: the same run continues
def test_wandb_resume_continues_the_run_stored_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    first = L.build_loggers(out, wandb=True, jsonl=False)
    first_id = first.loggers[0].run.id
    first.close()
    assert (out / L.WANDB_ID_FILE).read_text().strip() == first_id
    resumed = L.build_loggers(out, wandb=True, jsonl=False, resume=True)
    assert resumed.loggers[0].run.id == first_id
    resumed.close()
    fresh = L.build_loggers(out, wandb=True, jsonl=False, resume=False)  # a new training: a new W&B run
    fresh_id = fresh.loggers[0].run.id
    fresh.close()
    assert fresh_id != first_id and (out / L.WANDB_ID_FILE).read_text().strip() == fresh_id
    import wandb

    wandb.teardown()


def test_resume_without_a_stored_id_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    monkeypatch.setattr(L.WandbLogger, "__init__", lambda self, *a, **k: calls.append(k) or setattr(self, "run", None))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / L.WANDB_ID_FILE).write_text("not an id!\n")
    L.build_loggers(tmp_path / "run", wandb=True, jsonl=False, resume=True)
    L.build_loggers(tmp_path / "other", wandb=True, jsonl=False, resume=True)
    assert [(c["id"], c["resume"]) for c in calls] == [(None, None), (None, None)]


# ---------------------------------------------------------------- TensorBoard, read back with tensorboard's reader
def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_writes_scalars_pictures_and_hparams(tmp_path):
    import cv2
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = {"optim": {"lr": 0.002, "betas": [0.9, 0.999]}, "seed": 7, "model": {"decoder": "hps", "weights": None}}
    group = L.build_loggers(tmp_path, tensorboard=True, config=config)
    assert [type(lg) for lg in group.loggers] == [L.JsonlLogger, L.TensorBoardLogger]
    group.log_scalars({"train/loss/total": 0.75, "train/lr": 1e-3}, step=4)
    group.log_scalars({"train/loss/total": 0.5}, step=8)
    group.log_scalars({"val/semseg/mIoU": 41.5, "val/score": 0.25}, step=8)
    panel = semseg_depth_panel()
    group.log_predictions(8, [panel])
    group.close()

    events = _events(tmp_path / L.TENSORBOARD_DIR)
    assert [(e.step, e.value) for e in events.Scalars("train/loss/total")] == [(4, 0.75), (8, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("val/semseg/mIoU")] == [(8, 41.5)]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)

    (picture,) = events.Images("val/predictions/depth/0")
    assert picture.step == 8
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(picture.encoded_image_string, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    target_rgb, prediction_rgb = L.colour_pair("depth", panel.targets["depth"], panel.predictions["depth"])
    np.testing.assert_array_equal(decoded, L.image_grid([[panel.image, target_rgb, prediction_rgb]]))
    assert events.Images("val/predictions/semseg/0")

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams == {"optim.lr": 0.002, "optim.betas": "[0.9, 0.999]", "seed": 7.0, "model.decoder": "hps",
                       "model.weights": "null"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["val/score", "val/semseg/mIoU"]


def test_tensorboard_resume_appends_to_the_same_folder(tmp_path):
    first = L.build_loggers(tmp_path, jsonl=False, tensorboard=True)
    first.log_scalars({"train/loss": 1.0}, step=1)
    first.close()
    second = L.build_loggers(tmp_path, jsonl=False, tensorboard=True, resume=True)
    second.log_scalars({"train/loss": 0.5}, step=2)
    second.close()
    assert [(e.step, e.value) for e in _events(tmp_path / L.TENSORBOARD_DIR).Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


def test_tensorboard_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MTVisionError, match="pip install tensorboard"):
        L.build_loggers(tmp_path, tensorboard=True)
