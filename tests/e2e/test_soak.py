"""``bench/soak.py`` at a tiny size (50 devices, an 18-second soak): the real ``registrar
run`` on Mosquitto + SQLite, telemetry, renewals, a revocation and a payload-key rotation
through the real CLI, with zero errors, every message counted by the registrar, memory of
every process sampled, and the curves drawn. Plus the trend fit on known series."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from bench.soak import fit_trend

BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_soak_smoke_run_has_no_errors_and_reports_every_field(tmp_path: Path) -> None:
    png = tmp_path / "soak.png"
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            *("--devices", "50", "--minutes", "0.3", "--interval", "2"),
            *("--renewals-per-min", "60", "--revocations", "1", "--rotate-every", "10"),
            *("--sample-every", "1", "--png", str(png), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["error_kinds"] == {}, result["first_errors"]
    assert result["devices"] == 50 and result["registrations"] == 50
    # ~49 live devices x 18 s / 2 s; every acknowledged message reached the registrar
    assert result["messages_sent"] >= 300
    assert result["messages_received"] == result["messages_sent"]
    assert result["renewals"] >= 5 and result["renewal_ms_median"] > 0
    assert result["rotations"] == 1 and len(result["rotation_seconds"]) == 1
    assert result["key_updates_applied"] >= 49 and result["key_acks"] >= 49
    assert result["revocations"] == 1 and len(result["revocation_cut_seconds"]) == 1
    assert result["registrar_counts"]["revoked_devices"] == 1
    assert result["registrar_counts"]["registrations"]["renewed"] == result["renewals"]
    totals = result["store_totals"]
    assert totals["devices"] == 50
    assert totals["certificates"] == totals["unique_serials"] == 50 + result["renewals"]
    assert result["registrar_exit"] == 0
    assert set(result["memory"]) == {"registrar", "mosquitto", "bench"}
    for name, mem in result["memory"].items():
        assert 1 < mem["start_mb"] < 2000 and mem["max_mb"] >= mem["end_mb"] > 1, name
        assert mem["trend"] in ("no growth", "growth") and mem["trend_samples"] >= 5, name
        assert isinstance(mem["slope_mb_per_min"], float), name
    assert set(result["cpu_percent"]) == {"registrar", "mosquitto", "bench"}
    assert result["samples"] >= 15
    series = result["memory_series"]
    assert len(series["t_s"]) == len(series["bench"]) == result["samples"]
    assert "soak" in series["phase"] and all(v is not None for v in series["registrar"])
    assert Path(result["png"]) == png
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(data) < 200_000


def test_trend_fit_tells_a_leak_from_noise() -> None:
    rng = random.Random(7)
    times = [5.0 * i for i in range(60)]  # five minutes, a sample every 5 s
    flat = [100 + rng.gauss(0, 0.5) for _ in times]
    assert fit_trend(times, flat).verdict == "no growth"
    # 2 MB/min on top of the same noise: 10 MB over the window
    leak = [v + 2 * t / 60 for v, t in zip(flat, times, strict=True)]
    trend = fit_trend(times, leak)
    assert trend.verdict == "growth"
    assert abs(trend.slope_mb_per_min - 2) < 0.2 and trend.change_mb > 9
    # significant but tiny (0.1 MB over the window, < 1 % of 100 MB): an allocator step
    tiny = [100 + 0.02 * t / 60 for t in times]
    assert fit_trend(times, tiny).verdict == "no growth"
    assert fit_trend(times[:2], flat[:2]).verdict == "too few samples"
