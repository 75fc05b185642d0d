"""`drivedit inspect method`: published counts printed from a meta-device build."""
import json

from drivedit.cli import main as cli


def test_inspect_method_prints_published_counts(capsys):
    assert cli(["inspect", "method", "--model", "DiT-XL/2", "--method", "driveditfit", "--rank", "4",
                "--scenarios", "5"]) == 0
    out = capsys.readouterr().out
    assert "2,365,120" in out and "6,912" in out and "2,372,032  (0.35 %" in out
    assert cli(["inspect", "method", "--method", "finediffusion", "--num-classes", "10000", "--superclasses", "11"]) == 0
    out = capsys.readouterr().out
    assert "12,153,632  (1.77 %" in out and "11 superclasses" in out
    assert cli(["inspect", "method", "--method", "bitfit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 489_632


def test_inspect_method_all_and_errors(capsys):
    assert cli(["inspect", "method", "--all", "--model", "DiT-S/2", "--scenarios", "6"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit"):
        assert f"{name} on DiT-S/2" in out
    assert cli(["inspect", "method", "--model", "DiT-XL/2"]) == 2
    assert "give either --method NAME or --all" in capsys.readouterr().err
    assert cli(["inspect", "method", "--method", "lora", "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err
