"""`drivedit inspect model`: the official parameter count and GMACs, every registry size, checkpoints."""
from __future__ import annotations

import re

import pytest

from drivedit.cli import main as cli_main
from drivedit.models.dit import DIT_MODELS


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_xl2_at_256_and_512(capsys):
    code, out, _ = run(capsys, "model", "DiT-XL/2")
    assert code == 0
    assert "675,129,632" in out  # pos_embed included, as the official count
    assert re.search(r"GMACs per forward: 118\.6\d", out)
    code, out, _ = run(capsys, "model", "DiT-XL/2", "--image-size", "512")
    assert code == 0
    assert re.search(r"GMACs per forward: 524\.5\d", out)


def test_all_sizes_table(capsys):
    code, out, _ = run(capsys, "model", "--all")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == list(DIT_MODELS)
    # the paper's table (reference/dit.md): GMACs at 256 px
    for name, gmacs in [("DiT-S/2", "6.06"), ("DiT-B/4", "5.57"), ("DiT-L/2", "80.70"), ("DiT-XL/8", "7.39")]:
        assert rows[name].split()[-1] == gmacs, rows[name]
    assert "675,129,632" in rows["DiT-XL/2"]


def test_pixel_codec_options_and_rope(capsys):
    code, out, _ = run(capsys, "model", "DiT-N/2", "--image-size", "32", "--latent-factor", "1",
                       "--in-channels", "3", "--num-classes", "6", "--posenc", "rope")
    assert code == 0
    # 2 blocks of width 64 on a 16x16 token grid, 3 channels in, 6 out, 7 label rows, no pos_embed
    d = 64
    embed = d * 3 * 4 + d + 256 * d + d + d * d + d + 7 * d
    block = 3 * d * d + 3 * d + d * d + d + 2 * 4 * d * d + 4 * d + d + 6 * d * d + 6 * d
    final = 4 * 6 * d + 4 * 6 + 2 * d * d + 2 * d
    assert f"parameters: {embed + 2 * block + final:,}" in out
    assert "tokens 256" in out and "posenc rope" in out


def test_checkpoint_source(capsys, tmp_path):
    from drivedit.models.checkpoint import export_safetensors
    from drivedit.models.dit import build_dit, dit_config

    path = export_safetensors(build_dit(dit_config("DiT-T/4", input_size=16, num_classes=6)), tmp_path / "t.safetensors")
    code, out, _ = run(capsys, "model", str(path))
    assert code == 0
    assert out.startswith("DiT-T/4 at latent 16x16x4")


@pytest.mark.parametrize("argv, message", [
    (["model", "DiT-XXL/2"], "neither a registry size"),
    (["model", "DiT-B/2", "--image-size", "100"], "--image-size 100 must be a positive multiple"),
    (["model"], "give a model name"),
    (["nothing"], "unknown target 'nothing'"),
])
def test_bad_input_is_explained(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
