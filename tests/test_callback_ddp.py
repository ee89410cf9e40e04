"""DDP with two CPU processes (gloo): every rank prunes identically and training goes on."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("mode", ["data-free", "calibrate"])
def test_ddp_two_processes_prune_identically(tmp_path, mode):
    """With calibration data every rank repairs the model on its own batches (BN statistics, bias shifts)."""
    script = os.path.join(os.path.dirname(__file__), "ddp_fit.py")
    env = dict(os.environ, PL_DISABLE_FORK="1")
    out = subprocess.run([sys.executable, script, str(tmp_path), mode], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # both ranks share stdout, so their lines may interleave
    ranks = re.findall(r"RANK (\d) OK params=(\d+) fired=(\d+)", out.stdout)
    assert sorted(r[0] for r in ranks) == ["0", "1"], out.stdout[-2000:]
    assert {(r[1], r[2]) for r in ranks} == {(ranks[0][1], "2")}
