"""The built wheel works on its own: packaged data files included, entry point installed."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (path,) = dist.glob("abliterate-*.whl")
    return path


def test_wheel_contains_package_data(wheel):
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert "abliterate/data/refusal_markers.txt" in names
    assert "abliterate/data/organism/templates.json" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "abliterate = abliterate.cli:main" in archive.read(entry_points).decode()


def test_installed_wheel_runs_help_and_demo(wheel, organism_dir, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Dependencies come from this environment; abliterate itself only from the wheel.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True
    )
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    where = subprocess.run(
        [py, "-c", "import abliterate; print(abliterate.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(site)
    # console script, as pip would write it
    help_ = subprocess.run([py, "-m", "abliterate", "--help"], cwd=cwd, env=env, capture_output=True, text=True)
    assert help_.returncode == 0 and "demo" in help_.stdout
    demo = subprocess.run(
        [
            py,
            "-m",
            "abliterate",
            "demo",
            "--output_dir",
            "out",
            "--n_trials",
            "8",
            "--cache_dir",
            str(organism_dir.parent),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "refusal rate" in demo.stdout and "KL divergence" in demo.stdout
    assert (cwd / "out" / "model" / "model.safetensors").is_file()
