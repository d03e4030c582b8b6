"""BranchingSpec: parsing, tree queries, validation errors, text and file round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtvision.errors import MTVisionError
from mtvision.models.branching_spec import BranchingSpec, SpecError, as_spec

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["semseg", "depth", "normals", "edge"]
EXAMPLE = """\
backbone: resnet18
tasks: [semseg, depth, normals, edge]
stages:            # one partition per backbone stage, coarse to fine
  - [[semseg, depth, normals, edge]]
  - [[semseg, depth, normals, edge]]
  - [[semseg, depth], [normals, edge]]
  - [[semseg], [depth], [normals, edge]]
"""


@pytest.fixture
def example(tmp_path) -> BranchingSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE)
    return BranchingSpec.load(path)


def test_example_file_parses_into_a_tree(example):
    assert example.backbone == "resnet18" and example.tasks == tuple(TASKS)
    assert example.num_stages == 4
    assert [example.num_copies(k) for k in range(4)] == [1, 1, 2, 3]
    assert example.path("semseg") == (0, 0, 0, 0)
    assert example.path("depth") == (0, 0, 0, 1)
    assert example.path("edge") == (0, 0, 1, 2)
    assert example.parent(3, 2) == 1 and example.parent(3, 1) == 0 and example.parent(0, 0) is None
    assert example.shared_depth() == 2
    assert BranchingSpec.separate(TASKS, 4).shared_depth() == 0
    assert BranchingSpec.all_shared(TASKS, 4).shared_depth() == 4


def test_describe_draws_the_tree(example):
    assert example.describe() == (
        "resnet18: 4 tasks, 4 stages, 7 stage copies\n"
        "[stage 0-1] semseg, depth, normals, edge\n"
        "├── [stage 2] semseg, depth\n"
        "│   ├── [stage 3] semseg\n"
        "│   └── [stage 3] depth\n"
        "└── [stage 2-3] normals, edge"
    )
    assert BranchingSpec.separate(["a", "b"], 2).describe().splitlines()[1:] == [
        "image",
        "├── [stage 0-1] a",
        "└── [stage 0-1] b",
    ]


def test_helpers_build_the_extremes_and_from_labels(example):
    shared = BranchingSpec.all_shared(TASKS, 3, backbone="resnet18")
    assert shared.stages == ((tuple(TASKS),),) * 3 and shared.backbone == "resnet18"
    separate = BranchingSpec.separate(TASKS, 2)
    assert separate.stages == (tuple((t,) for t in TASKS),) * 2 and separate.backbone is None
    labels = [[0, 0, 0, 0], ["x", "x", "x", "x"], [0, 0, 1, 1], [5, 6, 7, 7]]
    assert BranchingSpec.from_labels(TASKS, labels, backbone="resnet18") == example
    with pytest.raises(SpecError, match="3 entries for 4 tasks"):
        BranchingSpec.from_labels(TASKS, [[0, 0, 0]])
    with pytest.raises(SpecError, match="positive integer"):
        BranchingSpec.all_shared(TASKS, 0)


def test_canonical_form_ignores_group_order(example):
    shuffled = BranchingSpec.from_dict(
        {
            **example.to_dict(),
            "stages": [
                [TASKS[::-1]],
                [TASKS],
                [["edge", "normals"], ["depth", "semseg"]],
                [["depth"], ["edge", "normals"], ["semseg"]],
            ],
        }
    )
    assert shuffled != example and shuffled.canonical() == example.canonical() == example
    assert hash(shuffled.canonical()) == hash(example)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_and_load_round_trip_and_stay_readable(tmp_path, example, suffix):
    path = tmp_path / "out" / f"tree{suffix}"
    example.save(path)
    assert BranchingSpec.load(path) == example
    text = path.read_text()
    if suffix == ".json":
        assert '    [["semseg"], ["depth"], ["normals", "edge"]]' in text
        assert json.loads(text) == example.to_dict()
    else:
        assert "  - [[semseg], [depth], [normals, edge]]" in text
        assert "# └── [stage 2-3] normals, edge" in text
    # atomic overwrite: the new content replaces the old and no temporary file is left behind
    BranchingSpec.all_shared(TASKS, 4).save(path)
    assert BranchingSpec.load(path) == BranchingSpec.all_shared(TASKS, 4)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_dict_round_trip_and_as_spec(example, tmp_path):
    assert BranchingSpec.from_dict(example.to_dict()) == example
    assert as_spec(example.to_dict()) == example and as_spec(example) is example
    path = tmp_path / "s.yaml"
    example.save(path)
    assert as_spec(str(path)) == example and as_spec(path) == example
    assert "backbone" not in BranchingSpec.all_shared(TASKS, 1).to_dict()
    with pytest.raises(SpecError, match="mapping or a path"):
        as_spec(3)


BAD = [
    (
        {"tasks": TASKS, "stages": [[["semseg", "depht", "normals", "edge"]]]},
        "unknown task 'depht'; did you mean 'depth'",
    ),
    ({"tasks": TASKS, "stages": [[["semseg", "depth", "normals"]]]}, r"leaves task\(s\) \['edge'\] without a group"),
    ({"tasks": TASKS, "stages": [[["semseg", "depth"], ["depth", "normals", "edge"]]]}, "task 'depth' in two groups"),
    ({"tasks": TASKS, "stages": [[["semseg", "semseg", "depth", "normals", "edge"]]]}, "twice in one group"),
    ({"tasks": TASKS, "stages": [[["semseg"], ["depth"], ["normals", "edge"]], [TASKS]]}, "merges the stage-0 groups"),
    ({"tasks": TASKS, "stages": [TASKS]}, "second pair of brackets"),
    ({"tasks": TASKS, "stages": [[TASKS, []]]}, "group 1 is empty"),
    ({"tasks": TASKS, "stages": []}, "non-empty list with one partition per backbone stage"),
    ({"tasks": TASKS, "stages": [[["semseg", 3, "normals", "edge"]]]}, "task names"),
    ({"tasks": [], "stages": [[[]]]}, "at least one task"),
    ({"tasks": ["a", "a"], "stages": [[["a"]]]}, r"lists \['a'\] more than once"),
    ({"tasks": TASKS, "stage": []}, "unknown branching spec key 'stage'; did you mean 'stages'"),
    ({"stages": [[TASKS]]}, r"missing key\(s\) \['tasks'\]"),
    ({"tasks": TASKS, "stages": [[TASKS]], "backbone": 18}, "timm model name"),
]


@pytest.mark.parametrize("data, message", BAD)
def test_bad_specs_fail_with_clear_errors(data, message):
    with pytest.raises(SpecError, match=message) as info:
        BranchingSpec.from_dict(data)
    assert isinstance(info.value, MTVisionError) and isinstance(info.value, ValueError)


def test_check_against_a_model(example):
    example.check(tasks=TASKS, num_stages=4, backbone="resnet18")
    example.check(tasks=TASKS[::-1])  # order does not matter, the set does
    with pytest.raises(SpecError, match="stage index 4 is beyond the backbone"):
        BranchingSpec.all_shared(TASKS, 5).check(num_stages=4, backbone="resnet18")
    with pytest.raises(SpecError, match="3 stages but resnet18 has 4: give one partition per backbone stage"):
        BranchingSpec.all_shared(TASKS, 3).check(num_stages=4, backbone="resnet18")
    with pytest.raises(SpecError, match=r"leaves the model's task\(s\) \['saliency'\] without a head"):
        example.check(tasks=TASKS + ["saliency"])
    with pytest.raises(SpecError, match=r"names task\(s\) \['edge'\] the model does not have"):
        example.check(tasks=TASKS[:3])
    with pytest.raises(SpecError, match="written for backbone 'resnet18' but the model uses 'resnet50'"):
        example.check(backbone="resnet50")
    BranchingSpec.all_shared(TASKS, 4).check(backbone="resnet50")  # no backbone named: any fits
    with pytest.raises(SpecError, match="stage index 4 is beyond the spec's 4 stages"):
        example.num_copies(4)
    with pytest.raises(SpecError, match="did you mean 'normals'"):
        example.path("normal")


def test_unreadable_files_fail_cleanly(tmp_path):
    with pytest.raises(SpecError, match="cannot read branching spec file"):
        BranchingSpec.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a\nstages: [")
    with pytest.raises(SpecError, match="not valid YAML/JSON"):
        BranchingSpec.load(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("tasks: [a]\nstages: [[[b]]]\n")
    with pytest.raises(SpecError, match=r"wrong.yaml: stage 0 names unknown task 'b'"):
        BranchingSpec.load(wrong)


def test_shipped_example_specs_fit_the_synthetic_resnet18_job():
    specs = {p.stem: BranchingSpec.load(p) for p in sorted((ROOT / "configs/synthetic/specs").glob("*.yaml"))}
    assert set(specs) == {"all_shared", "separate", "split_last_two"}
    for spec in specs.values():
        spec.check(tasks=TASKS, num_stages=4, backbone="resnet18")
    assert specs["all_shared"] == BranchingSpec.all_shared(TASKS, 4, "resnet18")
    assert specs["separate"] == BranchingSpec.separate(TASKS, 4, "resnet18")
    assert [specs["split_last_two"].num_copies(k) for k in range(4)] == [1, 1, 2, 3]
