"""Stage splitting and the branched (tree-structured) multi-task decoder."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from mtvision.models import BackboneError, create_backbone, create_model
from mtvision.models.branching_spec import BranchingSpec, SpecError
from mtvision.models.decoders.branched import BranchedDecoder, backbone_stages, run_stages, split_stages
from tests.models.learning import adam_steps

TASKS = ("semseg", "depth", "normals", "edge")
MIXED = {
    "tasks": list(TASKS),
    "stages": [
        [list(TASKS)],
        [list(TASKS)],
        [["semseg", "depth"], ["normals", "edge"]],
        [["semseg"], ["depth"], ["normals", "edge"]],
    ],
}
SWIN = (
    "swin_tiny_patch4_window7_224",
    {
        "img_size": 64,
        "depths": (1, 1, 1, 1),
        "embed_dim": 16,
        "num_heads": (1, 1, 2, 2),
        "window_size": 4,
        "dynamic_img_size": True,
    },
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A local test_resnet weights file (timm naming) with non-trivial batch-norm statistics."""
    torch.manual_seed(3)
    net = timm.create_model("test_resnet", pretrained=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("w") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _model(spec, decoder="branched", tasks=TASKS, weights=None, **options):
    options = {"neck_channels": 16, "head_channels": 8, **options}
    if decoder == "branched":
        options["spec"] = spec
    backbone = {"name": "test_resnet", "weights": weights}
    return create_model(
        backbone=backbone,
        decoder=decoder,
        tasks={t: 5 if t == "semseg" else None for t in tasks},
        decoder_options=options,
    )


# ---------------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize(
    "name, kwargs",
    [("test_resnet", {}), ("test_convnext", {}), ("test_efficientnet", {}), ("mobilenetv3_small_050", {}), SWIN],
    ids=["resnet", "convnext", "efficientnet", "mobilenet", "swin"],
)
def test_stages_in_sequence_reproduce_the_adapter_features(name, kwargs):
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs).eval()
    split = backbone_stages(backbone)
    assert len(split.stages) == backbone.num_stages
    assert (split.channels, split.strides) == (backbone.channels, backbone.strides)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want, got = backbone(x), run_stages(split.stages, x)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    # a stage maps the previous feature (not some hidden state) to the next one
    with torch.no_grad():
        assert torch.equal(split.stages[2](want[1]), want[2])


def test_split_stages_loads_local_weights_like_the_adapter(weights):
    split = split_stages("test_resnet", weights=weights)
    plain = create_backbone("test_resnet", weights=weights).eval()
    split.stages.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for w, g in zip(plain(x), run_stages(split.stages, x)):
            assert torch.equal(w, g)


def test_backbones_that_are_not_sequential_are_refused_by_name():
    with pytest.raises(BackboneError, match="'test_vit'.*cannot be cut into stages"):
        split_stages("test_vit", img_size=64)
    with pytest.raises(BackboneError, match="cannot be cut into stages"):
        create_model(
            backbone={"name": "test_vit", "kwargs": {"img_size": 64}},
            decoder="branched",
            tasks=["depth"],
            decoder_options={"spec": {"tasks": ["depth"], "stages": [[["depth"]]] * 3}},
        )


# ---------------------------------------------------------------------------------------------- decoder
def _count_copy_calls(decoder: BranchedDecoder) -> dict[tuple[int, int], int]:
    calls: dict[tuple[int, int], int] = {}
    for s, copies in enumerate(decoder.branches):
        for g, stage in enumerate(copies):
            calls[(s, g)] = 0
            stage.register_forward_hook(lambda *_, key=(s, g): calls.__setitem__(key, calls[key] + 1))
    return calls


def test_forward_runs_each_needed_copy_once_and_task_subsets_match():
    torch.manual_seed(0)
    model = _model(MIXED).eval()
    decoder = model.decoder
    assert [len(c) for c in decoder.branches] == [1, 1, 2, 3]
    calls = _count_copy_calls(decoder)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        full = model(x).predictions
    assert set(calls.values()) == {1}
    for k in calls:
        calls[k] = 0
    with torch.no_grad():
        only = model(x, tasks=["depth"]).predictions
    assert [k for k, v in calls.items() if v] == [(0, 0), (1, 0), (2, 0), (3, 1)]
    assert set(calls.values()) == {0, 1}
    assert torch.allclose(only["depth"], full["depth"], atol=1e-6)
    for k in calls:
        calls[k] = 0
    with torch.no_grad():
        pair = model(x, tasks=["edge", "normals"]).predictions
    assert [k for k, v in calls.items() if v] == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert torch.allclose(pair["normals"], full["normals"], atol=1e-6)


def test_every_copy_starts_from_the_same_backbone_weights(weights):
    model = _model(MIXED, weights=weights)
    for copies in model.decoder.branches:
        first = copies[0].state_dict()
        for other in list(copies)[1:]:
            assert all(torch.equal(first[k], v) for k, v in other.state_dict().items())
            assert not {id(p) for p in other.parameters()} & {id(p) for p in copies[0].parameters()}


def _copy_task_parts(src_neck, src_head, dst_neck, dst_head):
    dst_neck.load_state_dict(src_neck.state_dict())
    dst_head.load_state_dict(src_head.state_dict())


def test_separate_spec_is_independent_single_task_networks_at_init(weights):
    spec = BranchingSpec.separate(TASKS[:3], 4).to_dict()
    model = _model(spec, tasks=TASKS[:3], weights=weights).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = model(x).predictions
    for t in TASKS[:3]:
        single = _model(None, decoder="hps", tasks=(t,), weights=weights).eval()
        _copy_task_parts(model.decoder.necks[t], model.decoder.heads[t], single.decoder.neck, single.decoder.heads[t])
        with torch.no_grad():
            assert torch.allclose(single(x).predictions[t], out[t], atol=1e-6), t


def test_all_shared_spec_is_hard_parameter_sharing(weights):
    spec = BranchingSpec.all_shared(TASKS, 4, backbone="test_resnet")
    model = _model(spec.to_dict(), weights=weights).eval()
    hps = _model(None, decoder="hps", weights=weights).eval()
    for t in TASKS:  # HPS's neck is shared: give every branched neck the same weights
        _copy_task_parts(hps.decoder.neck, hps.decoder.heads[t], model.decoder.necks[t], model.decoder.heads[t])
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        want, got = hps(x).predictions, model(x).predictions
        feats, _ = model.decoder.task_features(x, list(TASKS))
        plain = create_backbone("test_resnet", weights=weights).eval()(x)
    for t in TASKS:
        assert torch.allclose(want[t], got[t], atol=1e-6), t
        assert all(torch.equal(a, b) for a, b in zip(feats[t], plain))
    assert sum(p.numel() for p in model.decoder.branches.parameters()) == sum(
        p.numel() for p in hps.decoder.backbone.parameters()
    )


def test_parameter_partition_follows_the_tree():
    model = _model(MIXED)
    d = model.decoder
    ids = lambda m: {id(p) for p in m.parameters()}  # noqa: E731
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS}
    everything = {id(p) for p in model.parameters()}
    assert shared | set().union(*per_task.values()) == everything
    assert not shared & set().union(*per_task.values())
    assert ids(d.branches[3][0]) <= per_task["semseg"] and ids(d.branches[3][1]) <= per_task["depth"]
    assert ids(d.necks["semseg"]) | ids(d.heads["semseg"]) <= per_task["semseg"]
    # copies used by two tasks are shared, as are the stages all tasks use
    for k, g in [(0, 0), (1, 0), (2, 0), (2, 1), (3, 2)]:
        assert ids(d.branches[k][g]) <= shared, (k, g)
    out = model(torch.randn(2, 3, 32, 48)).predictions
    out["depth"].mean().backward()
    assert all(p.grad is None for p in model.task_parameters("semseg"))
    assert all(p.grad is None for p in d.branches[2][1].parameters())
    assert all(p.grad is not None for p in model.task_parameters("depth"))


def test_shared_representation_is_a_cut_through_which_all_shared_gradient_flows(synthetic_batch):
    torch.manual_seed(0)
    model = _model(MIXED)
    images = synthetic_batch["image"][:2, :, :32, :48]
    output = model(images)
    out, reps = output.predictions, output.shared
    assert len(reps) == 2  # stage 0's map to the necks, stage 1's output (necks and stage 2)
    total = sum(o.square().mean() * (i + 1) for i, o in enumerate(out.values()))
    stem = [p for k in (0, 1) for p in model.decoder.branches[k][0].parameters()]
    direct = torch.autograd.grad(total, stem, retain_graph=True)
    rep_grads = torch.autograd.grad(total, reps, retain_graph=True)
    via = torch.autograd.grad(reps, stem, grad_outputs=rep_grads)
    for a, b in zip(direct, via):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # every task's loss reaches every representation tensor
    output = model(images)
    for t in TASKS:
        grads = torch.autograd.grad(output.predictions[t].mean(), output.shared, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), t


def test_no_shared_representation_when_tasks_split_at_the_first_stage():
    model = _model(BranchingSpec.separate(TASKS[:2], 4).to_dict(), tasks=TASKS[:2])
    assert model(torch.randn(1, 3, 32, 48)).shared == []


def test_branched_model_learns(synthetic_batch):
    torch.manual_seed(0)
    tasks = ("semseg", "depth", "normals")
    spec = {
        "tasks": list(tasks),
        "stages": [
            [list(tasks)],
            [list(tasks)],
            [["semseg"], ["depth", "normals"]],
            [["semseg"], ["depth"], ["normals"]],
        ],
    }
    n = synthetic_batch["num_classes"]
    model = create_model(
        backbone="test_resnet",
        decoder="branched",
        tasks={"semseg": n, "depth": None, "normals": None},
        decoder_options={"spec": spec, "neck_channels": 16, "head_channels": 8},
    )
    images = synthetic_batch["image"][:4]
    loss_fn = lambda: sum(model.tasks[t].loss(o, synthetic_batch[t][:4]) for t, o in model(images).predictions.items())  # noqa: E731

    def every_parameter_has_a_gradient() -> None:
        assert all(p.grad is not None for p in model.parameters())

    first, last = adam_steps(model, loss_fn, steps=4, after_first_backward=every_parameter_has_a_gradient)
    assert last < first * 0.95


# ---------------------------------------------------------------------------------------------- bad input
def test_spec_must_fit_the_model():
    with pytest.raises(SpecError, match=r"leaves the model's task\(s\) \['edge'\] without a head"):
        _model({"tasks": list(TASKS[:3]), "stages": [[list(TASKS[:3])]] * 4})
    with pytest.raises(SpecError, match="does not have; did you mean 'depth'"):
        _model({"tasks": ["semseg", "dpth"], "stages": [[["semseg", "dpth"]]] * 4}, tasks=("semseg", "depth"))
    with pytest.raises(SpecError, match="written for backbone 'resnet18' but the model uses 'test_resnet'"):
        _model(BranchingSpec.all_shared(TASKS, 4, backbone="resnet18").to_dict())
    with pytest.raises(SpecError, match="stage index 4 is beyond the backbone"):
        _model(BranchingSpec.all_shared(TASKS, 5).to_dict())
    with pytest.raises(SpecError, match="one partition per backbone stage"):
        _model(BranchingSpec.all_shared(TASKS, 3).to_dict())
    with pytest.raises(SpecError, match="merges"):
        _model({"tasks": list(TASKS), "stages": [[["semseg", "depth"], ["normals", "edge"]], [list(TASKS)]] * 2})


def test_spec_option_accepts_a_file_and_follows_model_task_order(tmp_path):
    path = tmp_path / "tree.yaml"
    BranchingSpec(("depth", "semseg"), ((("semseg", "depth"),),) * 3 + ((("depth",), ("semseg",)),)).save(path)
    model = _model(str(path), tasks=("semseg", "depth"))
    assert model.decoder.spec.tasks == ("semseg", "depth")
    assert model.decoder.spec.group_of("depth", 3) == 0
    assert list(model(torch.randn(1, 3, 32, 48)).predictions) == ["semseg", "depth"]


def test_saved_branched_model_reloads_with_its_tree(tmp_path):
    from mtvision.models import load_model

    torch.manual_seed(0)
    model = _model(MIXED).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.decoder.spec == model.decoder.spec
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        a, b = model(x).predictions, loaded(x).predictions
    assert all(torch.equal(a[t], b[t]) for t in TASKS)


def test_shipped_config_builds_the_tree_it_describes():
    from pathlib import Path

    from mtvision.config import ExperimentConfig, load_config

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(ExperimentConfig, root / "configs/synthetic/branched_resnet18_128x160.yaml")
    model = create_model(cfg.model.resolved(cfg.data.tasks, {}, (cfg.data.height, cfg.data.width)))
    assert model.decoder.spec == BranchingSpec.load(root / "configs/synthetic/specs/split_last_two.yaml")
    assert [len(c) for c in model.decoder.branches] == [1, 1, 2, 3]


def test_gradient_checkpointing_gives_the_same_gradients(weights):
    grads = []
    for ckpt in (False, True):
        model = create_model(
            backbone={"name": "test_resnet", "weights": weights, "grad_checkpointing": ckpt},
            decoder="branched",
            tasks=list(TASKS),
            decoder_options={"spec": MIXED, "neck_channels": 16, "head_channels": 8},
        )
        assert all(s.grad_checkpointing == ckpt for c in model.decoder.branches for s in c)
        torch.manual_seed(0)
        for m in (model.decoder.necks, model.decoder.heads):  # same task parts in both runs
            for p in m.parameters():
                torch.nn.init.normal_(p, std=0.1)
        out = model(torch.ones(2, 3, 32, 48)).predictions
        sum(o.square().mean() for o in out.values()).backward()
        grads.append([p.grad.clone() for p in model.decoder.branches.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grads))
