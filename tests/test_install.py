"""The toolkit refuses an older Betty with one line that names the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_betty_0_1_1_is_refused_with_one_line(tmp_path):
    # A betty-ml 0.1.1 distribution found first on the path, as after a plain `pip install betty-ml` on 3.11.
    dist = tmp_path / "betty_ml-0.1.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: betty-ml\nVersion: 0.1.1\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    result = subprocess.run([sys.executable, "run.py", "configs/digits/vqvae.yaml", "--out", str(tmp_path / "run")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "betty-ml 0.1.1" in lines[0] and "pip install --ignore-requires-python betty-ml==0.2.1" in lines[0]
    assert not (tmp_path / "run").exists()

    result = subprocess.run([sys.executable, "-c", "import mqvae"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "betty-ml==0.2.1" in result.stderr.strip().splitlines()[-1]
