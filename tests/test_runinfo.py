"""run.json records the machine next to the package versions."""

from __future__ import annotations

import json
import os
from pathlib import Path

from backtrack.runinfo import cpu_model, write_run_info


def test_run_json_records_cpu_torch_kernels_threads_and_gpus(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = write_run_info(tmp_path, {"seed": 3}, "test")
    finally:
        torch.set_num_threads(threads)
    info = json.loads(path.read_text())
    machine = info["machine"]
    assert info["versions"]["torch"] and info["seed"] == 3
    assert machine["torch_threads"] == 1  # the setting at write time, not a default
    assert machine["cpu_cores"] == os.cpu_count()
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch_cpu_capability"] in ("DEFAULT", "NO AVX", "AVX2", "AVX512", "ZVECTOR",
                                               "VSX", "SVE256", "SVE128")
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        names = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        assert machine["cpu_model"] == names[0]
    assert machine["cpu_model"]
    if torch.cuda.is_available():
        assert machine["gpus"][0] == torch.cuda.get_device_name(0) and machine["cuda"]
    else:
        assert machine["gpus"] is None


def test_cpu_model_reads_x86_and_arm_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n"
    assert cpu_model(x86) == "AMD EPYC 7B13"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\nModel\t: Raspberry Pi 4 Model B\n"
    assert cpu_model(arm) == "Raspberry Pi 4 Model B"
    assert cpu_model("")  # falls back to platform, never empty
