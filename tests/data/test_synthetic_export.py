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


# ------------------------------------------------------------------ PASCAL-Context layout
def test_class_maps_are_the_documented_ones():
    from mtvision.data import synthetic
    from mtvision.data.pascal import NORMALS_VALID_CONTEXT_CLASSES, SEMSEG_CLASS_NAMES
    from mtvision.data.synthetic_export import CONTEXT_CLASS_OF_SYNTHETIC, VOC_CLASS_OF_SYNTHETIC

    voc = {synthetic.CLASS_NAMES[c]: SEMSEG_CLASS_NAMES[v] for c, v in VOC_CLASS_OF_SYNTHETIC.items()}
    assert voc == {
        "floor": "background", "wall": "background", "ceiling": "background", "table": "diningtable",
        "cabinet": "background", "sofa": "sofa", "pillar": "person", "ball": "background",
        "picture": "tvmonitor", "bed": "background",
    }
    context = {synthetic.CLASS_NAMES[c]: v for c, v in CONTEXT_CLASS_OF_SYNTHETIC.items()}
    assert context == {"floor": 158, "wall": 440, "ceiling": 68, "table": 397, "cabinet": 46, "sofa": 368,
                       "pillar": 284, "ball": 10, "picture": 427, "bed": 18}
    assert set(context.values()) <= NORMALS_VALID_CONTEXT_CLASSES  # the loader keeps every pixel's normal


def test_stand_in_parts_of_a_rectangle_by_hand():
    from mtvision.data.synthetic_export import parts_target, stand_in_parts

    person = np.zeros((14, 10), bool)
    person[1:13, 1:9] = True  # 12 rows x 8 columns
    rows = ["11111111"] * 2 + ["33222233"] * 3 + ["44222244"] * 2 + ["55555555"] * 3 + ["66666666"] * 2
    expected = np.zeros((14, 10), np.uint8)
    expected[1:13, 1:9] = [[int(ch) for ch in row] for row in rows]
    parts = stand_in_parts(person)
    np.testing.assert_array_equal(parts_target([(15, person, parts)], person.shape), expected)
    names = dict(parts)
    assert set(names) == {"head", "torso", "ruarm", "rlarm", "luarm", "llarm", "ruleg", "rlleg", "luleg", "llleg"}
    assert names["ruarm"][3:6, 1:3].all() and names["ruarm"].sum() == 6  # the person's right: the image's left
    assert names["luleg"][8:11, 5:9].all() and names["luleg"].sum() == 12
    for _, mask in parts:  # the parts tile the person
        assert not (mask & ~person).any()
    assert sum(mask.sum() for _, mask in parts) == person.sum()


def test_pascal_objects_are_eight_connected_components_and_only_persons_have_parts():
    from mtvision.data.synthetic_export import pascal_objects

    seg = np.zeros((8, 9), np.uint8)
    seg[0:3, 0:2] = 15
    seg[3, 2] = 15  # touches the first person diagonally: the same object
    seg[5:8, 6:9] = 15  # a second person
    seg[5:7, 0:3] = 11  # a diningtable
    seg[0, 8] = 255  # ignore is no object
    objects = pascal_objects(seg)
    assert [voc for voc, _, _ in objects] == [11, 15, 15]
    assert objects[0][2] == [] and objects[0][1].sum() == 6
    assert objects[1][1].sum() == 7 and objects[1][1][3, 2] and objects[2][1].sum() == 9
    assert all(parts for _, _, parts in objects[1:])


def test_pascal_layout_round_trips_through_the_pascal_loader(tmp_path, capsys):
    import scipy.io

    from mtvision.data.pascal import HUMAN_PART_MAP, PascalContext
    from mtvision.data.synthetic_export import pascal_targets

    out = tmp_path / "pascal"
    argv = ["--layout", "pascal", "--out", str(out), "--num", "7", "--height", "24", "--width", "32", "--seed", "2",
            "--val-fraction", "0.3", "--no-progress", "--preview-rows", "0"]
    assert main(argv) == 0
    assert "PASCAL-Context layout" in capsys.readouterr().out
    assert not (out / "images").exists() and not (out / "gt_sets").exists()
    train = (out / "ImageSets" / "Context" / "train.txt").read_text().split()
    val = (out / "ImageSets" / "Context" / "val.txt").read_text().split()
    assert train == [f"0002_{i:06d}" for i in range(5)] and val == ["0002_000005", "0002_000006"]
    persons = 0
    for split in ("train", "val"):
        ds = PascalContext(out, split=split)
        assert ds.tasks == ("semseg", "parts", "saliency", "normals", "edge") and ds.edge_source == "png"
        for i, sid in enumerate(ds.ids):
            raw = ds.load_raw(i)
            ref = generate(2, int(sid.split("_")[1]), 24, 32)
            want = pascal_targets(ref)
            for task in ("semseg", "parts", "saliency", "edge"):
                np.testing.assert_array_equal(raw[task], want[task], err_msg=f"{sid} {task}")
            np.testing.assert_array_equal(raw["saliency"], ref["saliency"])
            np.testing.assert_array_equal(raw["edge"], ref["edge"])
            np.testing.assert_allclose(raw["normals"], ref["normals"], atol=1.0 / 255 + 1e-6)
            diff = np.abs(raw["image"].astype(int) - ref["image"].astype(int))
            assert diff.mean() < 1.0 and diff.max() <= 8  # JPEG quality 100, 4:4:4
            persons += int((raw["parts"] > 0).any())
            if (raw["parts"] > 0).any():
                assert set(np.unique(raw["parts"][raw["semseg"] == 15])) <= set(range(1, 7))
                assert not (raw["parts"][raw["semseg"] != 15]).any()
    assert persons == 5  # seed 2 shows pillars in scenes 0, 2, 3, 4 and 6: the parts path is exercised
    # the .mat files hold what the PASCAL-Part and PASCAL-Context releases hold
    anno = scipy.io.loadmat(out / "human_parts" / "0002_000006.mat")["anno"]
    assert anno.dtype.names == ("imname", "objects") and str(anno["imname"][0, 0][0]) == "0002_000006"
    objects = anno["objects"][0, 0]
    assert objects.dtype.names == ("class", "classIndex", "mask", "parts")
    people = [o for o in objects.ravel() if int(o["classIndex"].ravel()[0]) == 15]
    assert people and all(str(o["class"][0]) == "person" for o in people)
    assert people[0]["parts"].dtype.names == ("part_name", "mask")
    assert {str(p["part_name"][0]) for o in people for p in o["parts"].ravel()} <= set(HUMAN_PART_MAP)
    labelmap = scipy.io.loadmat(out / "pascal-context" / "trainval" / "0002_000006.mat")["LabelMap"]
    assert labelmap.dtype == np.uint16
    np.testing.assert_array_equal(labelmap, pascal_targets(generate(2, 6, 24, 32))["labelmap"])
    # parts alone keeps only the images with a person, as the reference does
    assert PascalContext(out, split="train", tasks=["parts"]).ids == ["0002_000000", "0002_000002", "0002_000003", "0002_000004"]
