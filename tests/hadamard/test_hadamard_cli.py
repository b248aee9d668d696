from spikequant.cli import main


def test_hadamard_command(capsys):
    assert main(["hadamard", "576", "1536", "18944"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "paley2(q=73)" in out[2] and "checked" in out[2]


def test_hadamard_command_fails_for_13696(capsys):
    assert main(["hadamard", "13696"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "13712" in err[0]


def test_coverage_table(capsys):
    assert main(["hadamard-coverage"]) == 0
    out = capsys.readouterr().out
    assert "| Qwen2.5-7B | 3584 |" in out and "148 x 2^7, paley2(q=73)" in out
    assert "expand to 13712" in out
