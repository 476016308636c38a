"""BiSeNet face parsing: release-layout loading, clear errors, the original preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from consistentid_core.errors import CheckpointFormatError, MissingModelError
from consistentid_core.face import PART_COLORS, FaceLabel, FaceParser, colorize_parsing

RELEASE_LAYOUT = Path(__file__).resolve().parents[1] / "fixtures" / "bisenet-state-dict.tsv"


def _random_bisenet() -> nn.Module:
    """facexlib BiSeNet with random weights and random BatchNorm statistics."""
    from facexlib.parsing.bisenet import BiSeNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = BiSeNet(num_class=19)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def release_state_dict() -> dict:
    return _random_bisenet().state_dict()


@pytest.fixture(scope="module")
def parsing_file(tmp_path_factory, release_state_dict) -> Path:
    path = tmp_path_factory.mktemp("face_parsing") / "face_parsing.pth"
    torch.save(release_state_dict, path)
    return path


@pytest.fixture(scope="module")
def parser(parsing_file) -> FaceParser:
    return FaceParser.load(parsing_file)


def _save(tmp_path: Path, state_dict: dict) -> Path:
    path = tmp_path / "face_parsing.pth"
    torch.save(state_dict, path)
    return path


def test_facexlib_bisenet_has_the_release_layout(release_state_dict):
    """facexlib's state dict equals the original class's, entry by entry (191, BN buffers included)."""
    lines = RELEASE_LAYOUT.read_text().splitlines()
    expected = [tuple(line.split("\t")) for line in lines if not line.startswith("#")]
    found = [
        (key, "x".join(map(str, value.shape)) or "scalar", str(value.dtype).replace("torch.", ""))
        for key, value in release_state_dict.items()
    ]
    assert len(found) == 191
    assert found == expected


def test_load_restores_every_tensor_including_bn_buffers(parser, release_state_dict):
    """Strict load: parameters and BatchNorm running statistics come from the file."""
    loaded = parser.net.state_dict()
    assert loaded.keys() == release_state_dict.keys()
    assert all(torch.equal(loaded[key], release_state_dict[key]) for key in loaded)
    assert not parser.net.training


def test_load_accepts_module_prefix(tmp_path, release_state_dict):
    """A DataParallel-style ``module.`` prefix is stripped."""
    prefixed = {f"module.{key}": value for key, value in release_state_dict.items()}
    net = FaceParser.load(_save(tmp_path, prefixed)).net
    key = "cp.resnet.conv1.weight"
    assert torch.equal(net.state_dict()[key], release_state_dict[key])


def test_missing_file_names_file_folder_and_source(tmp_path):
    """The message tells users which file, where it goes and where to get it."""
    with pytest.raises(MissingModelError) as error:
        FaceParser.load(tmp_path / "face_parsing.pth")
    message = str(error.value)
    assert "face_parsing.pth" in message
    assert "models/face_parsing" in message
    assert "JackAILab/ConsistentID" in message


def test_missing_key_is_a_format_error_naming_it(tmp_path, release_state_dict):
    """One absent entry is reported by name and count, not as a raw load_state_dict error."""
    incomplete = dict(release_state_dict)
    del incomplete["ffm.convblk.bn.running_var"]
    with pytest.raises(CheckpointFormatError, match=r"1 missing \(ffm\.convblk\.bn\.running_var\)"):
        FaceParser.load(_save(tmp_path, incomplete))


def test_wrong_shape_is_a_format_error_naming_it(tmp_path, release_state_dict):
    """A tensor of another shape (e.g. a parser with another class count) is named with both shapes."""
    changed = dict(release_state_dict)
    changed["conv_out.conv_out.weight"] = torch.zeros(20, 256, 1, 1)
    expected = r"wrong shape \(conv_out\.conv_out\.weight \(20, 256, 1, 1\) != \(19, 256, 1, 1\)"
    with pytest.raises(CheckpointFormatError, match=expected):
        FaceParser.load(_save(tmp_path, changed))


def test_unrelated_state_dict_is_a_format_error(tmp_path):
    """A state dict of some other model says it is not the BiSeNet parser."""
    with pytest.raises(CheckpointFormatError, match="not the BiSeNet face parser"):
        FaceParser.load(_save(tmp_path, {"weight": torch.zeros(3)}))


def test_truncated_file_is_a_format_error(tmp_path, parsing_file):
    """Half a download reads as corrupt, with advice to download again."""
    path = tmp_path / "face_parsing.pth"
    path.write_bytes(parsing_file.read_bytes()[: parsing_file.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt; download face_parsing.pth again"):
        FaceParser.load(path)


def test_random_bytes_are_a_format_error(tmp_path):
    """A file that is not a pickle/zip at all is a format error, not a crash."""
    path = tmp_path / "face_parsing.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointFormatError, match="not a PyTorch weights file"):
        FaceParser.load(path)


def test_non_dict_pickle_is_a_format_error(tmp_path):
    """A lone tensor saved with torch.save is rejected as not a state dict."""
    with pytest.raises(CheckpointFormatError, match="not a dict of tensors"):
        FaceParser.load(_save(tmp_path, torch.zeros(3)))


class _RecordingNet(nn.Module):
    """Stands in for BiSeNet: records inputs, returns three heads with different argmaxes."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        n, _, h, w = x.shape
        head0 = torch.zeros(n, 19, h, w)
        head0[:, 5] = 1.0
        head0[:, 11, :, : w // 2] = 2.0
        other = torch.zeros(n, 19, h, w)
        other[:, 3] = 1.0
        return head0, other, other


def test_preprocessing_is_pil_bilinear_to_512_then_imagenet_normalise():
    """The network sees exactly the original's tensor: squashed 512x512 bilinear, ToTensor, Normalize."""
    net = _RecordingNet()
    image = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    FaceParser(net).parse(image)
    expected = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )(Image.fromarray(image).resize((512, 512), Image.BILINEAR))
    assert net.inputs[0].shape == (1, 3, 512, 512)
    assert net.inputs[0].dtype == torch.float32
    assert torch.equal(net.inputs[0][0], expected)


def test_labels_are_argmax_of_the_first_output():
    """Labels come from output 0 only, as uint8 maps (N, 512, 512)."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    labels = FaceParser(_RecordingNet()).parse([image, image])
    assert labels.shape == (2, 512, 512)
    assert labels.dtype == np.uint8
    assert (labels[:, :, :256] == 11).all() and (labels[:, :, 256:] == 5).all()


def test_several_images_share_one_forward():
    """A list of images of different sizes is batched into one forward call."""
    net = _RecordingNet()
    FaceParser(net).parse([np.zeros((100, 80, 3), np.uint8), np.zeros((40, 90, 3), np.uint8)])
    assert len(net.inputs) == 1 and net.inputs[0].shape[0] == 2


def test_comfyui_float_batch_gives_the_same_input_as_uint8_images():
    """A float [B, H, W, 3] tensor in 0..1 is split into images and preprocessed like the uint8 files."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    from_uint8, from_float = _RecordingNet(), _RecordingNet()
    FaceParser(from_uint8).parse(list(images))
    labels = FaceParser(from_float).parse(torch.from_numpy(images).float() / 255.0)
    assert labels.shape == (2, 512, 512)
    assert torch.equal(from_uint8.inputs[0], from_float.inputs[0])


def test_batched_parse_equals_single_parses(parser):
    """With the real network, batching changes no label (eval-mode BN, no cross-talk)."""
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2)]
    batched = parser.parse(images)
    assert batched.max() < 19
    assert np.array_equal(batched[1], parser.parse(images[1])[0])


def test_colorize_blends_rgb_photo_and_part_colours():
    """Preview = 0.4 * RGB photo (resized to the labels) + 0.6 * colour; background colour is white."""
    labels = np.zeros((512, 512), dtype=np.uint8)
    labels[100:200, 100:200] = FaceLabel.SKIN
    photo = np.zeros((256, 256, 3), dtype=np.uint8)
    photo[..., 0] = 200  # a red photo: a BGR blend would put 200 in the blue channel
    preview = colorize_parsing(labels, photo)
    assert preview.shape == (512, 512, 3) and preview.dtype == np.uint8
    assert preview[0, 0].tolist() == [round(0.4 * 200 + 0.6 * 255), 153, 153]
    skin = PART_COLORS[FaceLabel.SKIN].astype(float)
    assert preview[150, 150].tolist() == np.round(0.4 * np.array([200, 0, 0]) + 0.6 * skin).tolist()
