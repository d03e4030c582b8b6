import cv2
import numpy as np

from mtvision.cli.make_synthetic import main
from mtvision.data.synthetic import generate


def test_cli_writes_nyud_layout_that_decodes_back(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["--out", str(out), "--num", "5", "--height", "24", "--width", "32", "--seed", "4", "--no-progress"]) == 0
    ids = (out / "gt_sets" / "train.txt").read_text().split() + (out / "gt_sets" / "val.txt").read_text().split()
    assert len(ids) == 5 and ids[-1] == "0004_000004"
    raw = generate(4, 2, 24, 32)
    sid = raw["meta"]["id"]
    image = cv2.cvtColor(cv2.imread(str(out / "images" / f"{sid}.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image, raw["image"])
    seg = cv2.imread(str(out / "segmentation" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(seg.astype(int) - 1, raw["semseg"])
    np.testing.assert_array_equal(np.load(out / "depth" / f"{sid}.npy"), raw["depth"])
    normals = cv2.cvtColor(cv2.imread(str(out / "normals" / f"{sid}.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_allclose(2.0 * normals / 255.0 - 1.0, raw["normals"], atol=1.0 / 255 + 1e-6)
    edge = cv2.imread(str(out / "edge" / f"{sid}.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(edge / 255.0, raw["edge"])
    preview = cv2.imread(str(out / "preview.png"))
    assert preview is not None and preview.shape[0] > 5 * 24
    assert "preview" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--num", "0"]) == 2
    assert "--num" in capsys.readouterr().err


def test_nyud_loader_reads_the_exported_scenes(tmp_path):
    from mtvision.data.nyud import NYUDv2

    out = tmp_path / "syn"
    main(["--out", str(out), "--num", "4", "--height", "20", "--width", "28", "--seed", "1", "--no-progress", "--preview-rows", "0"])
    ds = NYUDv2(out, split="train", tasks=["semseg", "depth", "normals", "edge"])
    assert len(ds) == 3 and ds.release.name == "ATRC/InvPT"
    raw = ds.load_raw(2)
    ref = generate(1, 2, 20, 28)
    np.testing.assert_array_equal(raw["semseg"], ref["semseg"])
    np.testing.assert_array_equal(raw["depth"], ref["depth"])
    np.testing.assert_array_equal(raw["edge"], ref["edge"])
    np.testing.assert_allclose(raw["normals"], ref["normals"], atol=1.0 / 255 + 1e-6)
