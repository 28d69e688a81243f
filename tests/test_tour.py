"""tour.py, the guided tour for readers, runs as written: every claim it prints is asserted inside it."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tour_runs_and_walks_all_six_steps(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "tour.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for step in range(1, 7):
        assert f"\n{step}. " in "\n" + p.stdout
    for where in ("model/quant.py: quantize_int8", "lora/lora.py: LoRALinear", "lora/lora.py: lora_delta"):
        assert where in p.stdout
    assert p.stderr == ""  # no stray warnings for a reader to puzzle over
