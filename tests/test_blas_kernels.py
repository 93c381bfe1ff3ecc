"""The OpenBLAS kernel set: AVX2 kernels on AMD Zen 4, where they ran the GEMMs faster than the
AVX-512 ones OpenBLAS picks; OpenBLAS's own pick everywhere else, and a user's setting always."""

import json
import os
import subprocess
import sys

import pytest

from pbp_hpc import blas_kernels

ZEN4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fpu sse avx2 avx512f avx512vl avx512_bf16"}


@pytest.mark.parametrize("cpu, want", [
    (ZEN4, "Haswell"),
    ({**ZEN4, "flags": "fpu sse avx2"}, None),  # Zen 3: family 25 without AVX-512, OpenBLAS already picks AVX2
    ({**ZEN4, "cpu family": "26"}, None),  # Zen 5: full-width AVX-512, not measured
    ({**ZEN4, "vendor_id": "GenuineIntel", "cpu family": "6"}, None),
    ({}, None),  # no /proc/cpuinfo to read
], ids=["zen4", "zen3", "zen5", "intel", "unknown"])
def test_only_zen4_gets_the_avx2_kernels(cpu, want):
    assert blas_kernels.choice({}, False, cpu) == want


def test_a_users_setting_or_a_loaded_openblas_is_left_alone():
    assert blas_kernels.choice({"OPENBLAS_CORETYPE": "SkylakeX"}, False, ZEN4) is None
    assert blas_kernels.choice({}, True, ZEN4) is None  # too late: the kernels were picked at load


def test_the_first_processors_fields_are_read_and_a_missing_file_reads_as_nothing(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu avx512f\n\n"
                 "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert blas_kernels.is_zen4(blas_kernels.cpu_fields(str(f)))
    assert blas_kernels.cpu_fields(str(tmp_path / "absent")) == {}


def _kernels_in_a_fresh_process(env):
    code = ("import json, os, pbp_hpc, numpy, threadpoolctl; print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), "
            "[d.get('architecture') for d in threadpoolctl.threadpool_info() if d.get('internal_api') == 'openblas']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_on_this_machine_a_run_gets_the_kernels_the_rule_names_and_a_users_choice_wins():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    var, archs = _kernels_in_a_fresh_process(env)
    if blas_kernels.is_zen4(blas_kernels.cpu_fields()):
        assert var == "Haswell" and set(archs) <= {"Haswell"}  # (empty where numpy has another BLAS)
    else:
        assert var is None
    var, archs = _kernels_in_a_fresh_process({**env, "OPENBLAS_CORETYPE": "Prescott"})
    assert var == "Prescott" and "Haswell" not in archs
