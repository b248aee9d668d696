import argparse
import subprocess
import sys

from spikequant.cli import main as spikequant_main
from spikequant.hadamard.cli import main, register


def test_hadamard_command(capsys):
    assert main(["576", "1536", "11008", "14336", "18944"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5
    assert out[0].startswith("n=576 = 36 x 2^4, paley2(q=17): online 23,040 MACs/vector")
    assert "H·Hᵀ = 576·I exactly (full 576 x 576 product)" in out[0]
    assert "paley1(q=343)" in out[2] and "H_344·H_344ᵀ = 344·I" in out[2] and "H·Hᵀ = 11008·I" in out[2]
    assert "paley2(q=73)" in out[4] and "H_11008" not in out[4] and "H·Hᵀ = 18944·I" in out[4]
    assert all("fast transform matches it" in line for line in out)


def test_no_construction_exits_nonzero_with_one_line(capsys):
    assert main(["hadamard", "13696"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert "n=13696" in err[0] and "13760, 13824, 13888" in err[0]


def test_wired_into_the_main_cli(capsys):
    assert spikequant_main(["hadamard", "12", "88"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert spikequant_main(["hadamard-coverage"]) == 0
    out = capsys.readouterr().out
    assert "| Qwen2.5-7B |" in out and "expand +64 -> 13760" in out


def test_register_sets_funcs():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hadamard", "12", "--dense-limit", "4"])
    assert args.sizes == [12] and args.func(args) == 0
    args = parser.parse_args(["hadamard-coverage"])
    assert args.func(args) == 0


def test_module_entry_point():
    cmd = [sys.executable, "-m", "spikequant.hadamard.cli", "13696"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "nearest constructible sizes above: 13760" in r.stderr
