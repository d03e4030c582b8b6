"""Exported graphs (ONNX in onnxruntime, TorchScript, ExportedProgram) compute what the PyTorch model computes,
with one named output per task, any batch size, and the single-task path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtvision.cli import export as cli
from mtvision.export import ExportError, check_export, export_model, load_exported, read_export_metadata
from mtvision.models import create_model

SIZE = (64, 96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model(
        backbone="test_resnet",
        tasks={"semseg": 5, "depth": None, "normals": None, "edge": None},
        decoder_options={"neck_channels": 16, "head_channels": 8},
    )
    with torch.no_grad():  # move BN statistics and weights away from their initial values
        net.train()(torch.randn(4, 3, *SIZE))
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.config.preprocess.input_size = list(SIZE)
    return net.eval()


def _reference(model, images, tasks):
    with torch.no_grad():
        out = model(torch.from_numpy(images), tasks).predictions
    return [out[t].numpy() for t in tasks]


def test_onnx_in_onnxruntime_equals_pytorch_for_any_batch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(model, tmp_path / "m.onnx", "onnx", optimize=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["semseg", "depth", "normals", "edge"]
    assert session.get_inputs()[0].shape[1:] == [3, *SIZE] and isinstance(session.get_inputs()[0].shape[0], str)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        images = rng.standard_normal((batch, 3, *SIZE)).astype(np.float32)
        got = session.run(None, {"images": images})
        for want, have in zip(_reference(model, images, model.task_names), got):
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, atol=1e-4, rtol=0)
    meta = read_export_metadata(path)
    assert meta["outputs"] == model.task_names and meta["input"]["shape"] == ["batch", 3, *SIZE]
    assert meta["preprocess"]["mean"] == model.config.preprocess.mean and meta["decode"] is False


@pytest.mark.slow
def test_onnx_single_task_and_decoded_outputs(model, tmp_path):
    pytest.importorskip("onnxruntime")
    path = export_model(model, tmp_path / "d.onnx", "onnx", tasks=["normals"], decode=True)
    (got,) = load_exported(path, "onnx")(np.ones((2, 3, *SIZE), np.float32))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # unit normals
    assert check_export(model, path, "onnx", ["normals"], decode=True) < 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_equal_pytorch_on_the_single_task_path(model, tmp_path, fmt):
    path = export_model(model, tmp_path / ("m.pt2" if fmt == "exported-program" else "m.pt"), fmt, tasks=["depth", "semseg"])
    images = np.random.default_rng(1).standard_normal((3, 3, *SIZE)).astype(np.float32)
    got = load_exported(path, fmt)(images)
    assert len(got) == 2
    for want, have in zip(_reference(model, images, ["depth", "semseg"]), got):
        np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)
    assert read_export_metadata(path)["outputs"] == ["depth", "semseg"]


def test_single_task_export_computes_only_that_task(model, tmp_path):
    calls = []
    handles = [h.register_forward_hook(lambda *_: calls.append(1)) for h in model.decoder.heads.values()]
    try:
        export_model(model, tmp_path / "one.pt", "torchscript", tasks=["depth"])
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 1  # one head traced


def test_bad_requests_are_clear(model, tmp_path):
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, tmp_path / "x", "tflite")
    with pytest.raises(ExportError, match="multiple of the model's size divisor 32"):
        export_model(model, tmp_path / "x", "torchscript", size=(50, 96))
    bare = create_model(backbone="test_resnet", tasks=["depth"])
    with pytest.raises(ExportError, match="--size H W"):
        export_model(bare, tmp_path / "x", "torchscript")


def test_cli_writes_and_checks_the_file(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "folder")
    out = tmp_path / "m.pt2"
    code = cli.main([str(tmp_path / "folder"), "--format", "exported-program", "--out", str(out), "--tasks", "edge", "--check"])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "outputs edge" in printed and "largest difference from PyTorch" in printed
    assert cli.main([str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(out)]) == 2
    assert cli.main([str(tmp_path / "folder"), "--format", "onnx", "--out", str(out), "--tasks", "parts"]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "examples:" in capsys.readouterr().out
