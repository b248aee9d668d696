from spikequant import cli, reports


def test_python_api_reports_say_so(monkeypatch):
    monkeypatch.setattr("sys.argv", ["pytest", "-q", "--weird"])
    assert reports.environment()["command"] == "python API"


def test_the_cli_records_its_command_line_and_only_while_it_runs(monkeypatch):
    seen = {}

    def fake_recipes(args):
        seen["command"] = reports.environment()["command"]
        return 0

    monkeypatch.setattr(cli, "cmd_recipes", fake_recipes)
    assert cli.main(["recipes"]) == 0
    assert seen["command"] == "spikequant recipes"
    assert reports.environment()["command"] == "python API"


def test_cpu_details_from_cpuinfo(tmp_path, monkeypatch):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_int8 sse\n\n"
                 "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    model, flags = reports._cpuinfo(str(f))
    assert model == "Test CPU 9000" and {"avx2", "amx_int8"} <= flags
    monkeypatch.setattr(reports, "_cpuinfo", lambda: (model, flags))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = reports.cpu_info()
    assert info["model"] == "Test CPU 9000"
    assert info["features"] == ["avx2", "avx512f", "amx_int8"]
    assert info["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    line = reports.cpu_line({"cpu": info})
    assert "Test CPU 9000" in line and "amx_int8" in line and "ATEN_CPU_CAPABILITY=avx2" in line


def test_missing_cpuinfo_is_not_an_error(tmp_path):
    assert reports._cpuinfo(str(tmp_path / "none")) == (None, set())
