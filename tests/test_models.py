"""The timm factory, local weights, dropout head, one training step, CAM layers, counts, `cxrdx models`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from cxrdx import cli
from cxrdx.errors import CxrdxError
from cxrdx.losses import create_loss
from cxrdx.models import (
    PAPER_MODELS,
    cam_target_layers,
    count_flops,
    count_params,
    create_model,
    load_weights,
    model_table,
)

SIZE = 64
SMALL = {"coatnet_0_rw_224": {"img_size": SIZE}}  # CoAtNet's attention windows are built for one input size


@pytest.fixture(scope="module")
def paper_models() -> dict[str, nn.Module]:
    """The paper's three backbones, 1 channel, 14 findings, random weights, built for 64 px."""
    return {name: create_model(name, **SMALL.get(name, {})) for name in PAPER_MODELS}


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_defaults_one_channel_fourteen_logits(paper_models):
    for name, model in paper_models.items():
        first = model.get_submodule(model.pretrained_cfg["first_conv"])
        assert first.in_channels == 1, name
        assert model.get_classifier().out_features == 14, name


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_dropout_half_before_the_classifier(paper_models, name):
    """In training mode the classifier sees the pooled features with about half zeroed, the rest doubled."""
    model = paper_models[name]
    seen = []
    handle = model.get_classifier().register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        model.eval()
        with torch.no_grad():
            model(_images(1))
            model.train()
            for module in model.modules():  # same pooled features in both passes: norms stay in eval mode
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
            torch.manual_seed(0)
            model(_images(1))
    finally:
        handle.remove()
        model.eval()
    clean, dropped = seen
    active = clean != 0  # random-init ResNet pools some all-zero channels after its ReLU
    kept = dropped[active] != 0
    torch.testing.assert_close(dropped[active][kept], 2 * clean[active][kept], rtol=1e-4, atol=1e-5)
    assert 0.4 < 1 - kept.float().mean().item() < 0.6


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_one_optimisation_step_changes_weights(name):
    """32 px, batch 2: the smallest input all three accept (CoAtNet built for it through timm's img_size)."""
    model = create_model(name, **({"img_size": 32} if name in SMALL else {})).train()
    positives = np.arange(1, 15) * 3
    loss_fn = create_loss("ours", positives, 100 - positives)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, classifier = model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]
    watched = {k: model.get_parameter(k).detach().clone() for k in (f"{first}.weight", f"{classifier}.weight")}
    targets = torch.zeros(2, 14)
    targets[0, [1, 4]] = 1
    loss = loss_fn(model(torch.randn(2, 1, 32, 32)), targets)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    for key, before in watched.items():
        assert not torch.equal(model.get_parameter(key), before), key


def test_unknown_name_suggests_close_matches():
    with pytest.raises(CxrdxError, match="resnet50") as info:
        create_model("resnet05")
    assert "unknown model 'resnet05'" in str(info.value)


def test_option_the_architecture_rejects_is_a_user_error():
    with pytest.raises(CxrdxError, match="'test_resnet'.*img_size"):
        create_model("test_resnet", img_size=64)


def test_imagenet_offline_fails_at_once_and_says_what_to_do(monkeypatch):
    import socket

    import cxrdx.models as models

    def no_network(address, timeout=None):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    build = timm.create_model

    def no_download(*args, pretrained=False, **kwargs):
        assert not pretrained, "no download may be tried when the host cannot be reached"
        return build(*args, **kwargs)

    monkeypatch.setattr(models, "_in_hub_cache", lambda hub_id: False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(timm, "create_model", no_download)
    fix = r"cannot reach huggingface.co.*--set model.pretrained=none, or .*--set model.pretrained=PATH"
    with pytest.raises(CxrdxError, match=fix):
        create_model("resnet18", pretrained="imagenet")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent")
    with pytest.raises(CxrdxError, match=r"cannot reach download.pytorch.org.*--set model.pretrained=none"):
        create_model("resnet50", pretrained="torchvision")


def test_torchvision_efficientnet_b5_converts_exactly(tmp_path):
    """torchvision's EfficientNet-b5 (random weights and batch-norm statistics, no download) loaded into
    timm's efficientnet_b5 with torchvision's batch-norm eps gives the same outputs."""
    torch.manual_seed(0)
    source = torchvision.models.efficientnet_b5().eval()
    state = source.state_dict()
    for key, value in state.items():  # batch norms and biases away from their initial 1 / 0
        if key.endswith("running_var"):
            value.copy_(0.75 + 0.5 * torch.rand_like(value))
        elif key.endswith(("running_mean", "bias")):
            value.copy_(0.1 * torch.randn_like(value))
        elif key.endswith("weight") and value.ndim == 1:
            value.copy_(1 + 0.1 * torch.randn_like(value))
    path = tmp_path / "efficientnet_b5_tv.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor matches
        ours = create_model("efficientnet_b5", pretrained=str(path), num_findings=1000, in_chans=3, bn_eps=1e-3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    gray = create_model("efficientnet_b5", pretrained=str(path), bn_eps=1e-3)  # 1 channel, 14 findings
    torch.testing.assert_close(gray.conv_stem.weight, state["features.0.0.weight"].sum(dim=1, keepdim=True))
    with pytest.raises(CxrdxError, match="set model.kwargs.bn_eps=0.001"):
        create_model("efficientnet_b5", pretrained="torchvision")


def test_first_conv_new_reinitialises_the_stem(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    summed = create_model("resnet18", pretrained=str(path))
    new = create_model("resnet18", pretrained=str(path), first_conv="new")
    torch.testing.assert_close(summed.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert new.conv1.weight.shape == (64, 1, 7, 7) and not torch.allclose(new.conv1.weight, summed.conv1.weight)
    bound = 1 / (49**0.5)  # PyTorch's default init of a new nn.Conv2d(1, 64, 7): uniform within 1/sqrt(fan_in)
    assert new.conv1.weight.abs().max() <= bound
    torch.testing.assert_close(new.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(new.bn1.running_var, state["bn1.running_var"])  # ResNet keeps its stem batch norm
    with pytest.raises(CxrdxError, match="first_conv='rgb'"):
        create_model("resnet18", first_conv="rgb")


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torchvision_resnet_weights_adapt_to_one_channel(tmp_path, wrap):
    source = torchvision.models.resnet18()  # 3 channels, 1000 classes; its key names are timm's
    state = source.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({wrap: state} if wrap else state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete match loads silently
        model = create_model("resnet18", pretrained=str(path))
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(model.bn1.running_var, state["bn1.running_var"])
    assert model.fc.weight.shape == (14, 512)


def test_torchvision_resnet50_key_names_are_timm_names():
    with torch.device("meta"):
        ours = create_model("resnet50", num_findings=1000, in_chans=3).state_dict()
        theirs = torchvision.models.resnet50().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_timm_safetensors_weights_and_report(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", in_chans=3, num_classes=1000)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), path)
    model = create_model("test_efficientnet", num_findings=14)
    report = load_weights(model, path)
    assert report.adapted == ["conv_stem.weight"]
    assert sorted(report.dropped_classifier) == ["classifier.bias", "classifier.weight"]
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight.sum(dim=1, keepdim=True))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(CxrdxError, match="no tensor matches"):
        create_model("test_efficientnet", pretrained=str(path))
    with pytest.raises(CxrdxError, match="not found"):
        create_model("test_resnet", pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(CxrdxError, match="'none', 'imagenet'"):
        create_model("test_resnet", pretrained="imagenet21k")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CxrdxError, match="broken.pth: not a readable"):
        create_model("test_resnet", pretrained=str(tmp_path / "broken.pth"))


def test_partial_match_warns_with_the_missing_keys(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    del state["layer4.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="missing from the file: layer4.0.conv1.weight"):
        create_model("test_resnet", pretrained=str(path))


def _output_shape(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Size:
    shapes = []
    handle = layer.register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    return shapes[-1]


def test_cam_target_layers_of_the_paper_models(paper_models):
    resnet, effnet, coatnet = (paper_models[n] for n in PAPER_MODELS)
    assert cam_target_layers(resnet) == [resnet.layer4]
    assert cam_target_layers(effnet) == [effnet.bn2]
    assert cam_target_layers(coatnet) == [coatnet.stages[-1]]
    for model, channels in ((resnet, 2048), (effnet, 2048), (coatnet, 768)):
        (layer,) = cam_target_layers(model)
        assert _output_shape(model, layer, _images(1)) == (1, channels, 2, 2)


def test_cam_target_layers_generic():
    convnext = create_model("test_convnext")
    assert cam_target_layers(convnext, input_size=SIZE) == [convnext.stages[3]]
    byob = create_model("test_byobnet")
    assert cam_target_layers(byob, input_size=SIZE) == [byob.final_conv]

    plain = nn.Sequential(  # no timm metadata: the last module with an N*C*H*W output, H*W > 1
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 14),
    )
    assert cam_target_layers(plain, input_size=16) == [plain[3]]
    with pytest.raises(CxrdxError, match="reshape transform"):
        cam_target_layers(create_model("test_vit"))


def test_resnet50_counts_match_published_values():
    imagenet = create_model("resnet50", num_findings=1000, in_chans=3)
    assert count_params(imagenet) == 25_557_032  # torchvision / timm resnet50
    assert count_flops(imagenet, 224) / 2 == pytest.approx(4.09e9, rel=0.01)  # timm: 4.1 GMACs; paper: 4112 M


def test_one_channel_and_fourteen_findings_in_the_counts():
    rgb = create_model("resnet18", num_findings=1000, in_chans=3)
    gray = create_model("resnet18")
    # The 7x7 stem (64 kernels at 32x32 output for 64 px) sees one channel instead of three; 14 outputs, not 1000.
    stem, head = 2 * 64 * 49 * 32 * 32, 512 * (1000 - 14)
    assert count_flops(rgb, SIZE) / 2 - count_flops(gray, (1, SIZE, SIZE)) / 2 == stem + head
    assert count_params(rgb) - count_params(gray) == 2 * 64 * 49 + (512 + 1) * (1000 - 14)


def test_model_table_and_cli(capsys):
    (row,) = model_table(["resnet18"], input_size=SIZE)
    assert row == {
        "model": "resnet18",
        "weights": "timm resnet18.a1_in1k",
        "first_conv": "summed",
        "params": count_params(create_model("resnet18")),
        "macs": count_flops(create_model("resnet18"), SIZE) // 2,
        "flops": count_flops(create_model("resnet18"), SIZE),
        "resolution": f"1*{SIZE}*{SIZE}",
        "note": "",
    }
    assert cli.main(["models", "resnet18", "--input-size", str(SIZE), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [row]
    assert cli.main(["models", "resnet18", "--input-size", str(SIZE)]) == 0
    assert "| resnet18 | 11.2 M |" in capsys.readouterr().out
    paper = {r["model"]: (r["weights"], r["first_conv"]) for r in model_table(input_size=SIZE)}
    assert paper == {
        "resnet50": ("torchvision ResNet50_Weights.IMAGENET1K_V1", "new"),
        "efficientnet_b5": ("torchvision EfficientNet_B5_Weights.IMAGENET1K_V1", "new"),
        "coatnet_0_rw_224": ("timm coatnet_0_rw_224.sw_in1k", "summed"),
    }
    assert cli.main(["models", "resnt18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err


def test_fixed_size_model_reports_sizes_it_cannot_run():
    (row,) = model_table(["test_coatnet"], input_size=60)  # not a multiple of the 32-pixel stride
    assert row["macs"] is None and "does not run at 60x60" in row["note"]
    (row,) = model_table(["test_coatnet"], input_size=SIZE)
    assert row["macs"] > 0 and row["note"] == ""
