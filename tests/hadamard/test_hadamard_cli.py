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
    assert out[2].startswith("n=11008 = 172 x 2^6, williamson(43)")
    assert "H_172·H_172ᵀ = 172·I" in out[2] and "H·Hᵀ = 11008·I" in out[2]
    assert "alternatives (modelled cost/element): 344 x 2^5, paley1(q=343) 364;" in out[2]
    assert "paley2(q=73)" in out[4] and "H_11008" not in out[4] and "H·Hᵀ = 18944·I" in out[4]
    assert all("fast transform matches it" in line for line in out)


def test_no_construction_exits_nonzero_with_one_line(capsys):
    assert main(["hadamard", "3776"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert "n=3776" in err[0] and "3840, 3904, 3968" in err[0]


def test_stored_orders_construct_and_check(capsys):
    assert main(["156", "172", "428", "13696"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("n=156 = 156, baumert-hall(13)") and "H·Hᵀ = 156·I exactly" in out[0]
    assert out[1].startswith("n=172 = 172, williamson(43)") and "H·Hᵀ = 172·I exactly" in out[1]
    assert out[2].startswith("n=428 = 428, goethals-seidel(T107)") and "H·Hᵀ = 428·I exactly" in out[2]
    assert out[3].startswith("n=13696 = 428 x 2^5") and "H_428·H_428ᵀ = 428·I exactly" in out[3]


def test_wired_into_the_main_cli(capsys):
    assert spikequant_main(["hadamard", "12", "88"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert spikequant_main(["hadamard-coverage"]) == 0
    out = capsys.readouterr().out
    assert "| Qwen2.5-7B |" in out and "| ChatGLM3-6B | 4096 = 2^12 | 13696 = 428·2^5 |" in out


def test_register_sets_funcs():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hadamard", "12", "--dense-limit", "4"])
    assert args.sizes == [12] and args.func(args) == 0
    args = parser.parse_args(["hadamard-coverage"])
    assert args.func(args) == 0


def test_module_entry_point():
    cmd = [sys.executable, "-m", "spikequant.hadamard.cli", "3776"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "nearest constructible sizes above: 3840" in r.stderr
