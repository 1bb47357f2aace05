"""Inductor's vector-ISA probe runs once per machine (curvc/runtime/vector_isa.py): a
record of a passing probe lets later processes skip it, and nothing else changes."""
from __future__ import annotations

import pytest
from torch._inductor import config

from curvc.runtime import vector_isa

REPORTED = "avx512 avx2"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fresh cache folder, a CPU reporting two ISAs, and the ISAs inductor would take
    as valid (the probe's result, settable by the test)."""
    monkeypatch.setenv("CURVC_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir(mode=0o700)
    monkeypatch.setattr(vector_isa, "_reported", lambda: REPORTED)
    valid = {"isas": REPORTED}
    monkeypatch.setattr(vector_isa, "_isas", lambda: valid["isas"])
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    return valid


def test_a_passing_probe_is_recorded_and_the_next_process_skips_it(machine):
    record = vector_isa._record()
    assert record is not None and not record.exists()
    with vector_isa.probed():
        assert config.cpp.vec_isa_ok is None  # the first time, inductor probes
    assert record.read_text().strip() == REPORTED
    with vector_isa.probed():
        assert config.cpp.vec_isa_ok is True  # trusted: no child process
    assert config.cpp.vec_isa_ok is None  # only around the compile


def test_a_probe_that_fails_an_isa_the_cpu_reports_records_nothing(machine):
    machine["isas"] = "avx2"  # the AVX-512 build or load failed here
    with vector_isa.probed():
        pass
    assert not vector_isa._record().exists()


def test_a_record_that_does_not_match_this_process_is_dropped(machine):
    record = vector_isa._record()
    record.write_text("avx2\n")
    with vector_isa.probed():
        assert config.cpp.vec_isa_ok is True
    assert not record.exists()  # the next process probes again


def test_the_users_own_setting_decides(machine, monkeypatch):
    monkeypatch.setattr(config.cpp, "vec_isa_ok", False)
    vector_isa._record().write_text(REPORTED + "\n")
    with vector_isa.probed():
        assert config.cpp.vec_isa_ok is False
