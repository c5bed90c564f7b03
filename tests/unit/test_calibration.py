"""The engine calibration file (shadow/calibration.py): written, read back, refused for
any other setup or when it is not a noise scale; and applied to the floor (shadow/report.py)."""

from __future__ import annotations

import numpy as np
import pytest

from shadow.calibration import CalibrationError, load_calibration
from shadow.report import build_report, paired
from shadow.verdict import VerdictPolicy
from tests.verdict_streams import FACTS, calibration, records


def test_a_calibration_round_trips_and_matches_its_own_setup(tmp_path):
    path = tmp_path / "cal" / "calibration.json"
    calibration().save(path)
    loaded = load_calibration(path, FACTS)
    assert loaded == calibration()
    assert "vllm 0.20.0 bfloat16 compiled on cpu" in loaded.describe() and "0.58x" in loaded.describe()


@pytest.mark.parametrize("field, value", [("compile_mode", "eager"), ("dtype", "float16"), ("engine_version", "0.21.0"),
                                          ("device", "cuda"), ("engine", "transformers"), ("reference", "other")])
def test_a_calibration_measured_on_another_setup_is_refused(tmp_path, field, value):
    path = tmp_path / "calibration.json"
    calibration().save(path)
    with pytest.raises(CalibrationError, match=f"measured on another setup: this run has {field} '{value}'"):
        load_calibration(path, FACTS.model_copy(update={field: value}))


def test_a_broken_or_meaningless_calibration_is_refused(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="cannot read the calibration"):
        load_calibration(path)
    calibration(kl_ratio=0.0).save(path)
    with pytest.raises(CalibrationError, match="not a noise scale"):
        load_calibration(path)
    with pytest.raises(CalibrationError, match="cannot read"):
        load_calibration(tmp_path / "missing.json")


def test_the_report_judges_against_the_calibrated_floor_and_says_so():
    recs = records(24, scale=0.58)  # an engine 0.58x as noisy as the transformers floor
    policy = VerdictPolicy()
    plain = build_report(recs, model="m", reference="r", noise_dtype="bfloat16", policy=policy)
    cal = build_report(recs, model="m", reference="r", noise_dtype="bfloat16", policy=policy, calibration=calibration())
    assert plain.verdict.floor.kind == "transformers" and cal.verdict.floor.kind == "calibrated"
    assert cal.verdict.kl_ratio.estimate == pytest.approx(plain.verdict.kl_ratio.estimate / 0.58)
    assert cal.verdict.reasons[-1].startswith("noise floor: the reference in bfloat16 run by transformers, calibrated to")
    table, scaled = paired(recs), paired(recs, calibration())
    assert np.allclose(scaled.noise_kl, 0.58 * table.noise_kl)
    assert np.allclose(scaled.noise_top1_different, 0.8 * table.noise_top1_different)
    # the noise floor's own statistics are reported as measured
    assert cal.noise_floor == plain.noise_floor
