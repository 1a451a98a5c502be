import subprocess
import sys

from ringflash.cli import env_report, main


def test_env_report_lists_versions_and_backends(capsys):
    rows = dict(env_report())
    assert rows["torch"] and rows["backend on cpu"] in ("torch", "triton")
    assert "gloo" in rows["torch.distributed"]
    assert main(["env"]) == 0
    assert "backend on cpu" in capsys.readouterr().out


def test_cli_module_runs_and_rejects_unknown_command():
    ok = subprocess.run([sys.executable, "-m", "ringflash.cli", "env"], capture_output=True, text=True)
    assert ok.returncode == 0 and "torch" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ringflash.cli", "frobnicate"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
