"""tools/install_detectron2.py --sdist: bad input is refused before anything is built."""
import os
import subprocess
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "install_detectron2.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120)


def test_missing_sdist_is_named(tmp_path):
    missing = tmp_path / "pb1-detectron2-0.6.tar.gz"
    result = run("--sdist", str(missing), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode != 0
    assert f"--sdist {missing}: no such file" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_sdist_with_another_hash_is_refused_and_nothing_is_cached(tmp_path):
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    payload = tmp_path / "setup.py"
    payload.write_text("raise SystemExit('must never run')\n")
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(payload, arcname="pb1-detectron2-0.6/setup.py")
    cache = tmp_path / "cache"
    # --force: past the "Detectron2 is already importable" shortcut, into the build.
    result = run("--sdist", str(fake), "--cache-dir", str(cache), "--force")
    assert result.returncode != 0
    assert str(fake) in result.stderr and "sha256" in result.stderr
    assert "refusing to build it" in result.stderr
    assert not list(cache.rglob("*.whl"))
