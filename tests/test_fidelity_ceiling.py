"""bench/fidelity_ceiling.py: the held-out frames' codec round trips as a labelled folder the detect job scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.fidelity_ceiling import write_round_trips
from drivedit.data.scenes import write_scenes_dataset
from drivedit.eval.folders import load_image


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling") / "real"
    write_scenes_dataset(str(root), num=3, size=64, seed=5)
    return root


def _images(folder, labels):
    return np.stack([load_image(str(folder / "images" / f["name"]), 64) for f in labels]).astype(np.float64)


def test_identity_codec_round_trips_are_the_frames_with_their_labels(frames, tmp_path):
    out = tmp_path / "recon"
    info = write_round_trips(frames, out, "pixel", None)
    real, recon = json.loads((frames / "labels.json").read_text()), json.loads((out / "labels.json").read_text())
    assert info["frames"] == 3 and info["image_size"] == 64
    assert [f["name"] for f in recon] == [f["name"].rsplit(".", 1)[0] + ".png" for f in real]
    assert [f["labels"] for f in recon] == [f["labels"] for f in real]  # boxes and attributes carried over
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f["name"] for f in recon)
    np.testing.assert_array_equal(_images(out, recon), _images(frames, real))  # lossless: PNG of the same pixels
    assert sorted(p.name for p in (out / "labels" / "sem_seg" / "masks").iterdir()) == \
        sorted(p.name for p in (frames / "labels" / "sem_seg" / "masks").iterdir())


def test_tiny_vae_round_trips_are_close_but_not_the_frames(frames, tmp_path):
    out = tmp_path / "recon"
    write_round_trips(frames, out, "autoencoder_kl", "builtin:tiny-vae")
    real, recon = json.loads((frames / "labels.json").read_text()), json.loads((out / "labels.json").read_text())
    a, b = _images(frames, real), _images(out, recon)
    psnr = 10 * np.log10(255.0 ** 2 / ((a - b) ** 2).mean())
    assert 20.0 < psnr < 60.0  # a real round trip through the shipped VAE, not a copy
