"""M3ViT as released: gate, PUP heads and training-time task-attention modules against hand-written
formulas; the MoE-ified ViT against the dense ViT at copy-initialisation; task pathways, balancing
loss, costs."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mtvision.models import create_model
from mtvision.models.backbones import create_backbone
from mtvision.models.decoders.base import MOE_BALANCE
from mtvision.models.decoders.m3vit import M3ViTDecoder, PUPHead, TaskAttentionModule
from mtvision.models.m3vit_backbone import M3ViTBackbone, M3ViTError, MoEBlock, load_dense_weights, moeify_vit
from mtvision.tasks import resolve_tasks
from tests.models.learning import adam_steps

TASKS3 = ("semseg", "depth", "normals")
VIT = {"name": "test_vit", "kwargs": {"img_size": 64, "dynamic_img_size": True}}


def _dense():
    torch.manual_seed(0)
    return create_backbone("test_vit", img_size=64, dynamic_img_size=True).eval()


def _model(tasks=TASKS3, **options):
    torch.manual_seed(0)
    options = {"num_experts": 4, "top_k": 2, "head_channels": 8, **options}
    spec = {t: (5 if t == "semseg" else None) for t in tasks}
    return create_model(backbone=VIT, decoder="m3vit", tasks=spec, decoder_options=options)


def test_defaults_follow_the_released_m3vit_configuration():
    defaults = {k: v.default for k, v in inspect.signature(moeify_vit).parameters.items()}
    layout = tuple(defaults[k] for k in ("num_experts", "top_k", "every", "routing"))
    assert layout == (16, 4, 2, "per_task")
    options = {k: v.default for k, v in inspect.signature(M3ViTDecoder).parameters.items()}
    assert (options["num_experts"], options["top_k"], options["expert_mlp_ratio"]) == (16, 4, 1.0)
    assert options["balance_weight"] == 1e-2 and options["capacity_factor"] is None
    assert (options["gate"], options["gate_noise_std"], options["head_channels"], tuple(options["tam_levels"])) == ("release", 0.0, 256, (0, 1, 2))
    vit = copy.deepcopy(_dense().body.model)
    assert moeify_vit(vit, ["depth"], num_experts=4, top_k=2) == [1, 3, 5]  # every other block, from block 1
    assert [isinstance(b, MoEBlock) for b in vit.blocks] == [False, True] * 3


def test_copied_experts_reproduce_the_dense_vit():
    dense = _dense()
    backbone = M3ViTBackbone(copy.deepcopy(dense), ["semseg", "depth"], num_experts=4, top_k=2, noise_std=0.0).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = dense(x)
        got = backbone(x).features
    for task in ("semseg", "depth"):
        assert len(got[task]) == len(expected)
        for a, b in zip(got[task], expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # with noise, the experts are distinct perturbations of the dense MLP
    noisy = M3ViTBackbone(copy.deepcopy(dense), ["depth"], num_experts=4, top_k=2, noise_std=0.05)
    moe = noisy.moe_layers()[1]
    dense_w1 = dense.body.model.blocks[1].mlp.fc1.weight
    assert not torch.equal(moe.w1[0], moe.w1[1])
    spread = (moe.w1 - dense_w1).std().item()
    assert spread == pytest.approx(0.05 * dense_w1.std().item(), rel=0.2)


def test_copy_init_refuses_experts_of_another_width():
    vit = copy.deepcopy(_dense().body.model)
    with pytest.raises(M3ViTError, match="cannot copy block 1's dense MLP \\(hidden 192\\) into experts of hidden 64"):
        moeify_vit(vit, ["depth"], num_experts=4, top_k=2, expert_hidden=64, init="copy")
    assert moeify_vit(vit, ["depth"], num_experts=4, top_k=2, expert_hidden=64) == [1, 3, 5]  # auto: ViT init
    assert vit.blocks[1].moe.w1.shape == (4, 64, 64)


def test_dense_weights_load_into_experts_and_bad_shapes_are_named():
    dense = _dense()
    state = dense.body.model.state_dict()
    torch.manual_seed(5)
    fresh = create_backbone("test_vit", img_size=64, dynamic_img_size=True)
    backbone = M3ViTBackbone(fresh, ["depth"], num_experts=4, top_k=2, expert_hidden=None).eval()
    load_dense_weights(backbone, state, noise_std=0.0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).features["depth"][-1], dense(x)[-1], atol=1e-5, rtol=1e-5)
    bad = dict(state)
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(10, 64)
    with pytest.raises(
        M3ViTError, match="'blocks.0.attn.qkv.weight' has shape \\(10, 64\\) but .* needs \\(192, 64\\)"
    ):
        load_dense_weights(backbone, bad)
    bad = dict(state)
    bad["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 64)
    bad["blocks.1.mlp.fc1.bias"] = torch.zeros(100)
    with pytest.raises(M3ViTError, match="fc1.weight has shape \\(100, 64\\) but the experts need \\(192, 64\\)"):
        load_dense_weights(backbone, bad, experts="copy")
    del bad["blocks.1.mlp.fc1.bias"]
    with pytest.raises(M3ViTError, match="missing from the dense weights.*blocks.1.mlp.fc1.bias"):
        load_dense_weights(backbone, bad)


def test_release_gate_initialisation_and_values():
    model = _model()
    moe = model.decoder.backbone.moe_layers()[1]
    assert (moe.gate_values, moe.noisy_gating, moe.fixed_noise_std, moe.unbiased_balance) == ("softmax_top_k", False, 0.0, True)
    assert not list(moe.noise_weight)  # no trainable noise in the release's gate
    gate = moe.gate_weight["depth"]  # nn.Linear's init over d x E: U(+-1/sqrt(E))
    assert gate.abs().max() <= 1 / math.sqrt(4) and gate.std().item() == pytest.approx(0.5 / math.sqrt(3), rel=0.15)
    bound = 1 / math.sqrt(moe.hidden * moe.dim)  # FastMoE's expert init over E x out x in: fan-in out * in
    assert moe.w1.abs().max() <= bound and moe.w1.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert moe.b1.abs().sum() == 0 and moe.b2.abs().sum() == 0
    # gate values: the top-k of a softmax over every expert, not renormalised
    x = torch.randn(7, moe.dim)
    idx, values, _ = moe._route(x, "depth")
    probs = torch.softmax(x @ gate, dim=-1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(values, top.values)
    assert torch.equal(idx, top.indices) and (values.sum(-1) < 1).all()
    shazeer = _model(gate="shazeer").decoder.backbone.moe_layers()[1]
    assert shazeer.noisy_gating and shazeer.gate_values == "top_k_softmax" and shazeer.gate_weight["depth"].abs().sum() == 0
    with pytest.raises(KeyError, match="M3ViT gate"):
        _model(gate="vmoe")


def test_pup_head_formula():
    torch.manual_seed(0)
    head = PUPHead(6, 4, 3).eval()
    for bn in head.norms:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    tokens = torch.randn(1, 6, 2, 3)
    pred, levels = head(tokens)
    x = F.layer_norm(tokens.permute(0, 2, 3, 1), (6,), head.norm.weight, head.norm.bias, eps=1e-6).permute(0, 3, 1, 2)
    feats = []
    for i in range(4):
        conv, bn = head.convs[i], head.norms[i]
        x = torch.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), bn.running_mean, bn.running_var, bn.weight, bn.bias))
        feats.append(x)
        if i < 3:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    expected = F.interpolate(F.conv2d(x, head.out.weight, head.out.bias), scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(pred, expected)
    assert pred.shape[-2:] == (32, 48)  # stride 16 tokens -> stride 1
    for got, want in zip(levels, feats[1:]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tasks", [("semseg", "depth"), ("semseg", "parts", "saliency", "normals", "edge")])
def test_task_attention_module_formula(tasks):
    torch.manual_seed(0)
    spec = resolve_tasks(list(tasks), {"semseg": 5, "parts": 7})
    tam = TaskAttentionModule(spec, 4).eval()
    for m in tam.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    feats = {t: torch.randn(1, 4, 8, 12) for t in tasks}

    def cbn(seq, x, transposed=False):
        conv, bn = seq[0], seq[1]
        y = (F.conv_transpose2d(x, conv.weight, conv.bias, stride=2, padding=1, output_padding=1) if transposed
             else F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=1))
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias)

    z = torch.cat([feats[t] for t in tasks], 1)
    b = torch.sigmoid(cbn(tam.balance, torch.relu(cbn(tam.mix, z))))
    # the release's weightings: T = 2 -> [B, 1 - B]; T = 5 -> [B/2, B/2, (1-B)/3, (1-B)/3, (1-B)/3]
    w = [b, 1 - b] if len(tasks) == 2 else [b / 2, b / 2, (1 - b) / 3, (1 - b) / 3, (1 - b) / 3]
    m = torch.relu(cbn(tam.fuse, torch.cat([feats[t] * wt for t, wt in zip(tasks, w)], 1)))
    m = torch.relu(cbn(tam.down[1], torch.relu(cbn(tam.down[0], m))))
    m = torch.sigmoid(cbn(tam.up[1], torch.relu(cbn(tam.up[0], m, True)), True))
    joint = torch.cat([feats[t] * (1 + m) for t in tasks], 1)
    out = tam(feats)
    for t in tasks:
        want = F.conv2d(torch.relu(cbn(tam.refine[t], joint)), tam.predict[t].weight, tam.predict[t].bias)
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


def test_task_attention_predictions_only_in_training_with_every_task():
    model = _model(tam_levels=[0, 2]).train()
    x = torch.randn(2, 3, 64, 64)
    deep = model(x).deep_supervision
    assert set(deep) == set(TASKS3)
    assert [tuple(d.shape[-2:]) for d in deep["depth"]] == [(8, 8), (32, 32)]  # levels 0 (stride 8) and 2 (stride 2)
    assert model(x, tasks=["depth"]).deep_supervision == {}
    assert _model(tam_levels=[]).train()(x).deep_supervision == {}
    assert not list(_model(tasks=("depth",)).decoder.tam.parameters())  # one task: nothing to attend across
    model.eval()
    with torch.no_grad():
        assert model(x).deep_supervision == {}
    with pytest.raises(ValueError, match="tam_levels"):
        _model(tam_levels=[3])


def test_backbone_checks():
    with pytest.raises(M3ViTError, match="needs a plain timm ViT"):
        create_model(backbone="test_resnet", decoder="m3vit", tasks=["depth"])
    with pytest.raises(M3ViTError, match="feature index 0 precedes the first MoE block"):
        create_model(
            backbone={**VIT, "out_indices": [0, 5]},
            decoder="m3vit",
            tasks=["depth"],
            decoder_options={"num_experts": 4, "top_k": 2},
        )
    with pytest.raises(KeyError, match="unknown task of this M3ViT backbone 'edge'"):
        _model().decoder.backbone(torch.randn(1, 3, 32, 32), ["edge"])


def test_single_task_pathway_matches_all_tasks_and_costs_about_one_third():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 80)
    calls = {t: 0 for t in TASKS3}
    for t, head in model.decoder.heads.items():
        head.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    with torch.no_grad():
        with FlopCounterMode(display=False) as all_counter:
            full = model(x).predictions
        with FlopCounterMode(display=False) as one_counter:
            only = model(x, tasks=["depth"]).predictions
    assert list(only) == ["depth"] and calls == {"semseg": 1, "depth": 2, "normals": 1}
    torch.testing.assert_close(only["depth"], full["depth"], atol=1e-5, rtol=1e-5)
    ratio = one_counter.get_total_flops() / all_counter.get_total_flops()
    assert 1 / 3 <= ratio < 1 / 3 + 0.1, ratio  # only the patch embedding and block 0 are shared
    with pytest.raises(KeyError):
        model(x, tasks=["dpth"])


def test_training_outputs_carry_the_balancing_loss_of_every_moe_layer():
    for gate, trained in (("release", "gate_weight"), ("shazeer", "noise_weight")):
        model = _model(balance_weight=0.5, gate=gate).train()
        x = torch.randn(2, 3, 64, 64)
        out = model(x)
        aux = out.regularizers[MOE_BALANCE]
        assert aux.ndim == 0 and aux.requires_grad and aux.item() > 0
        assert sorted(model.decoder.backbone.moe_layers()) == [1, 3, 5]
        aux.backward()
        for moe in model.decoder.backbone.moe_layers().values():
            for t in TASKS3:
                grad = getattr(moe, trained)[t].grad
                assert grad is not None and grad.abs().sum() > 0, (gate, t)
        model.eval()
        assert model(x).regularizers == {}


def test_balancing_loss_is_the_releases_per_layer_and_task_sum():
    """0.01 x sum over MoE layers and task gates of cv²(importance) + cv²(load), with the unbiased
    variance, importance from the unrenormalised top-k probabilities and the hard load."""
    model = _model().train()
    backbone = model.decoder.backbone
    seen = []
    for moe in backbone.moe_layers().values():
        original = moe._route

        def spy(x, task, original=original, moe=moe):
            probs = torch.softmax(x.float() @ moe.gate_weight[task], dim=-1)
            top = probs.topk(moe.top_k, dim=-1)
            full = torch.zeros_like(probs).scatter(1, top.indices, top.values)
            imp, load = full.sum(0), (full > 0).float().sum(0)
            cv2 = lambda v: v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)  # noqa: E731
            seen.append(0.01 * (cv2(imp) + cv2(load)).item())
            return original(x, task)

        moe._route = spy
    out = model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 3 * 3  # 3 MoE layers x 3 task gates
    assert out.regularizers[MOE_BALANCE].item() == pytest.approx(sum(seen), rel=1e-5)


def test_shared_representation_and_parameter_partition():
    for levels in ([], [0, 1]):
        model = _model(tam_levels=levels).train()
        output = model(torch.randn(2, 3, 32, 32))
        out, (rep,) = output.predictions, output.shared
        assert rep.shape == (2, 1 + 4, 64)  # class token + 2 x 2 patches entering block 1
        for t in TASKS3:
            (g,) = torch.autograd.grad(out[t].square().mean(), rep, retain_graph=True)
            assert g.abs().sum() > 0, t
        per_task = {t: {id(p) for p in model.task_parameters(t)} for t in TASKS3}
        shared = {id(p) for p in model.shared_parameters()}
        assert not shared & set().union(*per_task.values())
        assert shared | set().union(*per_task.values()) == {id(p) for p in model.parameters()}
        moe = model.decoder.backbone.moe_layers()[3]
        assert id(moe.w1) in shared
        pathway = {id(p) for p in model.decoder.heads["depth"].parameters()} | {id(moe.gate_weight["depth"])}
        # with task attention, every task's TAM prediction reads every pathway: its gates and head are shared
        assert pathway <= (shared if levels else per_task["depth"])
        model.zero_grad()
        loss = out["depth"].mean() + sum(d.mean() for d in output.deep_supervision.get("depth", []))
        loss.backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.task_parameters("semseg"))


def test_expert_usage_counts_every_routed_token_per_layer_and_task():
    model = _model().eval()
    with torch.no_grad():
        usage = model(torch.randn(2, 3, 64, 48)).stats
        only = model(torch.randn(1, 3, 64, 48), tasks=["normals"]).stats
    layers = ["blocks.1", "blocks.3", "blocks.5"]
    assert set(usage) == {f"experts/{b}/{t}{d}" for b in layers for t in TASKS3 for d in ("", "/dropped")}
    tokens = 1 + 4 * 3  # class token + 4 x 3 patches per image
    for b in layers:
        assert usage[f"experts/{b}/semseg"].sum() == 2 * tokens * 2  # 2 images, top-2
        assert usage[f"experts/{b}/semseg/dropped"] == 0  # no capacity: nothing is dropped
        assert only[f"experts/{b}/normals"].sum() == 1 * tokens * 2
    assert {k.split("/")[2] for k in only} == {"normals"}


def test_task_embedding_routing_and_learning(synthetic_batch):
    model = _model(tasks=("semseg", "depth"), routing="task_embedding")
    model.train()
    images = synthetic_batch["image"][:2]
    batch = {t: synthetic_batch[t][:2] for t in ("semseg", "depth")}

    def total():
        out = model(images)
        return sum(model.tasks[t].loss(out.predictions[t], batch[t]) for t in batch) + out.regularizers[MOE_BALANCE]

    embedding = model.decoder.backbone.moe_layers()[1].task_embedding
    start = embedding.detach().clone()
    first, last = adam_steps(model, total, steps=5)
    assert last < first * 0.95
    assert not torch.equal(embedding.detach(), start)  # the task embedding feeds the gate and learns


def test_pretrained_folder_round_trip(tmp_path):
    from mtvision.models import load_model

    model = _model(tasks=("depth", "normals")).eval()
    model.save_pretrained(tmp_path)
    again = load_model(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x).predictions, again(x).predictions
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_an_input_size_off_the_patch_grid_is_padded_and_cropped_back():
    model = _model().eval()
    out = model(torch.randn(1, 3, 40, 50)).predictions
    assert out["semseg"].shape == (1, 5, 40, 50) and out["depth"].shape == (1, 1, 40, 50)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 40, 50)
    full = model(torch.nn.functional.pad(x, (0, 14, 0, 8))).predictions["depth"][..., :40, :50]
    torch.testing.assert_close(model(x).predictions["depth"], full, rtol=1e-4, atol=1e-5)
