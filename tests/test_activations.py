import struct

import pytest
import torch
from safetensors.torch import load_file

from sasgate.activations import StreamingTensorWriter, load_acts, activation_file
from sasgate.errors import ArtifactError
from sasgate.paths import Paths


def test_streamed_file_is_standard_safetensors(tmp_path):
    rows = torch.randn(10, 6)
    path = tmp_path / "a.safetensors"
    w = StreamingTensorWriter(path, 10, 6)
    for chunk in rows.split(3):
        w.write(chunk)
    w.close()
    assert torch.equal(load_file(str(path))["acts"], rows)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + header_len) % 8 == 0


def test_short_write_is_an_error(tmp_path):
    w = StreamingTensorWriter(tmp_path / "a.safetensors", 4, 2)
    w.write(torch.zeros(3, 2))
    with pytest.raises(ArtifactError, match="wrote 3 of 4"):
        w.close()


def test_overlong_write_is_refused(tmp_path):
    w = StreamingTensorWriter(tmp_path / "a.safetensors", 2, 2)
    with pytest.raises(ValueError, match="more rows"):
        w.write(torch.zeros(3, 2))


def test_truncated_file_is_reported_corrupt(tmp_path):
    paths = Paths.at(tmp_path)
    path = activation_file(paths, "eval", "L0.resid_post")
    path.parent.mkdir(parents=True)
    w = StreamingTensorWriter(path, 8, 4)
    w.write(torch.ones(8, 4))
    w.close()
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="corrupt activation file"):
        load_acts(paths, "eval", "L0.resid_post")
