"""deepcovid.cam: pure image functions, targets and the hook context managers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepcovid import cam as camlib
from deepcovid.errors import ConfigError


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1),
    )


# --- methods and colormaps -------------------------------------------------------------------

def test_every_method_maps_to_its_grad_cam_class():
    import pytorch_grad_cam as pgc

    expected = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
                "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM,
                "scorecam": pgc.ScoreCAM}
    assert set(camlib.CAM_METHODS) == set(expected)
    for name, cls in expected.items():
        assert camlib.cam_class(name) is cls
    assert camlib.cam_class("GradCAM++") is pgc.GradCAMPlusPlus


def test_unknown_method_is_a_config_error_listing_choices():
    with pytest.raises(ConfigError) as ei:
        camlib.cam_class("gradcam-xl")
    for m in camlib.CAM_METHODS:
        assert m in str(ei.value)


def test_scorecam_is_flagged_slow_with_a_message():
    assert camlib.SLOW_CAM_METHODS == frozenset({"scorecam"})
    assert "Score-CAM" in camlib.SLOW_CAM_MESSAGE and len(camlib.SLOW_CAM_MESSAGE) > 40


def test_unknown_colormap_is_a_config_error():
    with pytest.raises(ConfigError, match="inferno"):
        camlib.colorize(np.zeros((4, 4), np.float32), (4, 4), "rainbowz")


# --- colorize / overlay ----------------------------------------------------------------------

def test_colorize_resizes_to_a_non_square_size_and_follows_the_colormap():
    cam = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))  # left cold, right hot
    jet = camlib.colorize(cam, (50, 80), "jet")
    assert jet.shape == (50, 80, 3) and jet.dtype == np.uint8
    # jet: low values blue, high values red (RGB order)
    assert jet[25, 0, 2] > 100 and jet[25, 0, 0] < 50
    assert jet[25, -1, 0] > 100 and jet[25, -1, 2] < 50
    inferno = camlib.colorize(cam, (50, 80), "inferno")
    assert not np.array_equal(jet, inferno)
    assert camlib.colorize(cam, 32, "jet").shape == (32, 32, 3)


@pytest.mark.parametrize("colormap", ["jet", "inferno"])
def test_colorize_equals_opencvs_colour_map_of_the_rounded_resized_cam(colormap):
    """The fast path (clip on the small map, convertScaleAbs, RGB look-up table) gives exactly
    what the textbook steps give: resize, clip(rint(x * 255)), applyColorMap, BGR -> RGB."""
    import cv2

    rng = np.random.default_rng(1)
    cam = rng.random((7, 9)).astype(np.float32) * 1.2 - 0.1  # a few values outside [0, 1]
    cam[cam < 0] = 0.0  # negatives interpolate differently once clipped; they are covered below
    expected_u8 = np.clip(np.rint(cv2.resize(cam, (90, 70), interpolation=cv2.INTER_LINEAR) * 255.0), 0, 255)
    expected = cv2.cvtColor(cv2.applyColorMap(expected_u8.astype(np.uint8), camlib.check_colormap(colormap)),
                            cv2.COLOR_BGR2RGB)
    assert np.array_equal(camlib.colorize(cam, (70, 90), colormap), expected)
    # negative values count as 0, values above 1 as 1
    flat = camlib.colorize(np.full((4, 4), -3.0, np.float32), (8, 8), colormap)
    assert np.array_equal(flat, camlib.colorize(np.zeros((4, 4), np.float32), (8, 8), colormap))
    hot = camlib.colorize(np.full((4, 4), 7.0, np.float32), (8, 8), colormap)
    assert np.array_equal(hot, camlib.colorize(np.ones((4, 4), np.float32), (8, 8), colormap))


def test_overlay_keeps_the_original_shape_and_blends_with_alpha():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    cam = rng.random((64, 64)).astype(np.float32)
    out = camlib.overlay(image, cam, alpha=0.5, colormap="jet")
    assert out.shape == (50, 80, 3) and out.dtype == np.uint8
    heat = camlib.colorize(cam, (50, 80), "jet")
    assert np.array_equal(camlib.overlay(image, cam, alpha=0.0), image)
    assert np.array_equal(camlib.overlay(image, cam, alpha=1.0), heat)
    expected = np.rint(0.5 * image.astype(np.float64) + 0.5 * heat).astype(np.int16)
    assert np.abs(out.astype(np.int16) - expected).max() <= 1
    gray = image[:, :, 0]
    assert camlib.overlay(gray, cam).shape == (50, 80, 3)
    with pytest.raises(ConfigError):
        camlib.overlay(image, cam, alpha=1.5)


# --- activation grids ------------------------------------------------------------------------

def test_activation_grid_shows_the_most_active_channels_labelled():
    torch.manual_seed(0)
    act = torch.rand(32, 10, 12) * 0.1
    act[7] += 5.0  # by far the most active channel
    act[7, :5] += 3.0  # with a pattern of its own
    top1 = camlib.activation_grid(act, "blocks.0", n_channels=1)
    only7 = camlib.activation_grid(act[7:8], "blocks.0", n_channels=1)
    assert top1.dtype == np.uint8 and top1.ndim == 3 and top1.shape[2] == 3
    tile = (slice(28, 28 + 64), slice(2, 2 + 77))  # below the title bar; 64 px high, aspect kept
    assert np.array_equal(top1[tile], only7[tile])
    other = camlib.activation_grid(act[3:4], "blocks.0", n_channels=1)
    assert not np.array_equal(top1[tile], other[tile])
    assert top1[tile].std() > 10  # a real picture, not the background
    # the title bar carries text: it differs between layer names
    a = camlib.activation_grid(act, "conv_stem")
    b = camlib.activation_grid(act, "blocks.1")
    assert not np.array_equal(a[:26], b[:26])
    assert a.shape[0] > camlib.activation_grid(act, "conv_stem", n_channels=4).shape[0]
    # (1, C, h, w) batches are accepted too
    assert np.array_equal(camlib.activation_grid(act[None], "x"), camlib.activation_grid(act, "x"))


def test_activation_grid_tiles_are_the_scaled_channels_and_calls_share_no_pixels():
    import cv2

    torch.manual_seed(1)
    act = torch.randn(4, 8, 8).contiguous(memory_format=torch.contiguous_format)
    grid = camlib.activation_grid(act, "L", n_channels=4, colormap="jet")
    top = act[torch.argsort(act.mean((1, 2)), descending=True)[0]].numpy()
    u8 = np.rint((top - top.min()) / (top.max() - top.min()) * 255).astype(np.uint8)
    big = cv2.resize(u8, (64, 64), interpolation=cv2.INTER_NEAREST)  # 8 px map -> 64 px tile
    ref = cv2.cvtColor(cv2.applyColorMap(big, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    tile = grid[28:28 + 64, 2:2 + 64]
    assert np.abs(tile.astype(int) - ref.astype(int)).max() <= 8  # at most one grey level apart
    # channels_last activations (what the model records) give the same grid
    cl = act[None].contiguous(memory_format=torch.channels_last)
    assert np.array_equal(camlib.activation_grid(cl, "L", n_channels=4, colormap="jet"), grid)
    grid[:] = 0  # the canvas is cached per layer; a caller writing on its grid must not change the next one
    again = camlib.activation_grid(act, "L", n_channels=4, colormap="jet")
    assert np.array_equal(again, camlib.activation_grid(cl, "L", n_channels=4, colormap="jet")) and again.max() > 0


# --- targets ---------------------------------------------------------------------------------

def test_logit_target_signs_and_scalar_per_sample():
    out = torch.tensor([2.5])
    assert camlib.LogitTarget(+1)(out).item() == 2.5
    assert camlib.LogitTarget(-1)(out).item() == -2.5
    assert camlib.LogitTarget(+1)(torch.tensor([[1.0], [3.0]])).tolist() == [1.0, 3.0]
    with pytest.raises(ValueError):
        camlib.LogitTarget(2)


def test_class_target_single_logit_and_k_classes():
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    assert camlib.class_target(1, 1, positive_index=1).sign == 1.0
    assert camlib.class_target(0, 1, positive_index=1).sign == -1.0
    t = camlib.class_target(2, 3)
    assert isinstance(t, ClassifierOutputTarget) and t.category == 2


def test_deferred_target_decides_from_the_first_forward_only():
    model = tiny_net()
    seen = []

    def decide(row):
        seen.append(row.clone())
        return 1 if row[0] > 0 else 0

    x = torch.randn(1, 3, 8, 8)
    with camlib.DeferredTarget(model, decide, num_outputs=1, positive_index=1) as t:
        out = model(x)
        model(torch.randn(1, 3, 8, 8))  # a later forward (Score-CAM) must not change the decision
        value = t(out[0])
    assert len(seen) == 1 and torch.equal(seen[0], out[0].detach())
    assert t.class_index == (1 if out[0, 0] > 0 else 0)
    assert value.item() == pytest.approx(out[0, 0].item() * (1 if t.class_index == 1 else -1))
    assert camlib.count_hooks(model) == 0


# --- hooks -----------------------------------------------------------------------------------

def test_activation_recorder_captures_named_layers_and_removes_its_hooks():
    model = tiny_net()
    x = torch.randn(1, 3, 16, 16)
    with camlib.ActivationRecorder(model, ["1", "3"]) as rec:
        assert camlib.count_hooks(model) == 2
        model(x)
        model(torch.zeros(1, 3, 16, 16))  # only the first forward is kept
    assert camlib.count_hooks(model) == 0
    assert list(rec.outputs) == ["1", "3"]
    assert tuple(rec.outputs["1"].shape) == (1, 4, 16, 16)
    assert tuple(rec.outputs["3"].shape) == (1, 6, 8, 8)
    assert torch.allclose(rec.outputs["1"], torch.relu(model[0](x)))
    with pytest.raises(RuntimeError):
        with camlib.ActivationRecorder(model, ["1"]):
            raise RuntimeError("boom")
    assert camlib.count_hooks(model) == 0
    with pytest.raises(ConfigError, match="no layer"):
        camlib.ActivationRecorder(model, ["nope"])


def test_activation_recorder_top_keeps_only_the_grid_channels_and_their_grid():
    model = tiny_net()
    x = torch.randn(1, 3, 16, 16)
    with camlib.ActivationRecorder(model, ["1", "3"]) as full, camlib.ActivationRecorder(model, ["1", "3"], top=3) as top:
        model(x)
    for name, c in (("1", 4), ("3", 6)):
        a = full.outputs[name][0]
        order = torch.argsort(a.mean(dim=(1, 2)), descending=True)[:3]
        assert top.channels[name] == c and torch.equal(top.outputs[name], a[order])
        # the grid drawn from the top channels is the grid of the whole activation
        assert np.array_equal(camlib.activation_grid(top.outputs[name], name, n_channels=3, channels=c),
                              camlib.activation_grid(a, name, n_channels=3))
    assert full.channels == {}


def test_graph_cut_makes_the_layer_output_a_leaf_and_backward_stays_in_the_tail():
    model = tiny_net().requires_grad_(False)
    cut = model[2]  # second conv
    seen = {}
    h = model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("first", o.requires_grad))
    try:
        with camlib.GraphCut([cut]):
            # registered after GraphCut's (as grad-cam's are): sees the replaced output
            h2 = cut.register_forward_hook(lambda m, i, o: seen.__setitem__("cut", o))
            out = model(torch.randn(1, 3, 8, 8))
            h2.remove()
        assert seen["cut"].is_leaf and seen["cut"].requires_grad and seen["cut"].grad_fn is None
        assert seen["first"] is False  # nothing before the cut is recorded
        out.sum().backward()
        assert seen["cut"].grad is not None
        assert all(p.grad is None for p in model.parameters())
    finally:
        h.remove()
    assert camlib.count_hooks(model) == 0
    # Under no_grad (Score-CAM's scoring forwards) the hook leaves outputs alone.
    with camlib.GraphCut([cut]), torch.no_grad():
        assert not model(torch.randn(1, 3, 8, 8)).requires_grad


def test_inference_view_skips_grad_cams_tree_walks_and_refuses_training():
    from pytorch_grad_cam import GradCAM

    from deepcovid.cam import InferenceView

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="eval mode"):
        InferenceView(net)  # still in training mode, with parameter gradients
    net.eval().requires_grad_(False)
    view = InferenceView(net)
    assert view.eval() is view and not view.training
    with pytest.raises(RuntimeError, match="training mode"):
        view.train()
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(view(x), net(x))
    # grad-cam's eval() and zero_grad() calls reach neither the model nor its modules
    calls = []
    net.train = lambda mode=True: calls.append(("train", mode))
    net.zero_grad = lambda *a, **k: calls.append(("zero_grad",))
    with GradCAM(model=view, target_layers=[net[1]]) as cam:
        cam.model.zero_grad()
    assert calls == []
