"""Tests for the model registry: shapes, log-probabilities, sizes, init, errors."""

import math

import pytest
import torch
from torch import nn

from afl_flwr.constants import MODEL_NAMES
from afl_flwr.models import MODELS, get_model

NUM_CLASSES = 10
BATCH = 3
# (in_channels, height/width): MNIST-shaped and CIFAR-10-shaped images.
IMAGE_SHAPES = {"mnist": (1, 28), "cifar10": (3, 32)}


def _conv(c_in: int, c_out: int, k: int, *, bias: bool) -> int:
    """Parameters of a ``k x k`` convolution."""
    return c_in * c_out * k * k + (c_out if bias else 0)


def _linear(n_in: int, n_out: int) -> int:
    """Parameters of a linear layer with bias."""
    return n_in * n_out + n_out


def _bn(channels: int) -> int:
    """Trainable parameters of batch norm (scale and shift)."""
    return 2 * channels


def _paper_cnn_size(c: int) -> int:
    """Three 3x3 convs with 32 channels and bias, then linear 32 -> 10."""
    convs = _conv(c, 32, 3, bias=True) + 2 * _conv(32, 32, 3, bias=True)
    return convs + _linear(32, NUM_CLASSES)


def _small_cnn_size(c: int) -> int:
    """5x5 convs c -> 32 -> 64 with bias, linear 64*7*7 -> 128 -> 10."""
    convs = _conv(c, 32, 5, bias=True) + _conv(32, 64, 5, bias=True)
    return convs + _linear(64 * 7 * 7, 128) + _linear(128, NUM_CLASSES)


def _resnet20_size(c: int) -> int:
    """ResNet-20: stem, 3 stages x 3 basic blocks, 1x1 shortcuts at 2 transitions."""
    total = _conv(c, 16, 3, bias=False) + _bn(16)
    in_planes = 16
    for planes in (16, 32, 64):
        for _ in range(3):
            total += _conv(in_planes, planes, 3, bias=False) + _bn(planes)
            total += _conv(planes, planes, 3, bias=False) + _bn(planes)
            if in_planes != planes:
                total += _conv(in_planes, planes, 1, bias=False) + _bn(planes)
            in_planes = planes
    return total + _linear(64, NUM_CLASSES)


def _mlp_size(c: int) -> int:
    return _linear(c * 28 * 28, 200) + _linear(200, 200) + _linear(200, NUM_CLASSES)


EXPECTED_SIZE = {
    "paper-cnn": _paper_cnn_size,
    "small-cnn": _small_cnn_size,
    "resnet20": _resnet20_size,
    "mlp": _mlp_size,
}


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_config_knows_every_registered_model_without_importing_torch() -> None:
    assert tuple(sorted(MODELS)) == MODEL_NAMES


def test_expected_sizes_cover_the_registry() -> None:
    # Prepare / Execute
    registered = set(MODELS)

    # Assert: a newly registered model must come with a hand-computed size.
    assert registered == set(EXPECTED_SIZE)


@pytest.mark.parametrize("image", sorted(IMAGE_SHAPES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_is_batch_of_log_probabilities(name: str, image: str) -> None:
    # Prepare
    channels, size = IMAGE_SHAPES[image]
    torch.manual_seed(0)
    model = get_model(name, channels, NUM_CLASSES).eval()
    images = torch.randn(BATCH, channels, size, size)

    # Execute
    with torch.no_grad():
        output = model(images)

    # Assert
    assert output.shape == (BATCH, NUM_CLASSES)
    assert torch.all(output <= 0)
    torch.testing.assert_close(
        output.exp().sum(dim=1), torch.ones(BATCH), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_architecture(name: str, channels: int) -> None:
    # Prepare
    expected = EXPECTED_SIZE[name](channels)

    # Execute
    model = get_model(name, channels, NUM_CLASSES)

    # Assert
    assert _num_parameters(model) == expected


def test_resnet20_has_about_027m_parameters() -> None:
    # Prepare / Execute
    model = get_model("resnet20", 3, NUM_CLASSES)

    # Assert: He et al. (2016), Table 6 lists ResNet-20 at 0.27M parameters.
    assert _num_parameters(model) == 272_474


def test_paper_cnn_has_about_19k_parameters() -> None:
    # Prepare / Execute
    model = get_model("paper-cnn", 1, NUM_CLASSES)

    # Assert: 320 + 9248 + 9248 + 330, summed by hand.
    assert _num_parameters(model) == 19_146


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_cnn_init_is_xavier_uniform_with_zero_bias(seed: int) -> None:
    # Prepare
    torch.manual_seed(seed)

    # Execute
    model = get_model("paper-cnn", 1, NUM_CLASSES)

    # Assert
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 4
    for layer in layers:
        weight = layer.weight
        receptive = weight[0, 0].numel()
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.all(layer.bias == 0)
        assert weight.abs().max().item() <= bound
        # Not PyTorch's default init: that draws from a narrower kaiming range,
        # so Xavier weights spread over most of [-bound, bound].
        assert weight.abs().max().item() > 0.9 * bound


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_are_independent_instances(name: str) -> None:
    # Prepare
    first = get_model(name, 1, NUM_CLASSES)

    # Execute
    second = get_model(name, 1, NUM_CLASSES)

    # Assert
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


def test_unknown_model_raises_with_allowed_names() -> None:
    # Prepare
    name = "vgg16"

    # Execute
    with pytest.raises(ValueError) as excinfo:
        get_model(name, 1, NUM_CLASSES)

    # Assert
    message = str(excinfo.value)
    assert name in message
    for allowed in MODELS:
        assert allowed in message
