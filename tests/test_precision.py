"""Precision resolution: which CPUs count as computing bf16 natively, the fp32 fallback and `auto`."""

from __future__ import annotations

import json

import pytest
import torch

from bertforge import precision
from bertforge.errors import BertforgeError
from bertforge.monitor import read_metrics
from bertforge.pretrain import PretrainConfig, pretrain
from training_data import build_data

CPU = torch.device("cpu")
FAST = dict(model="tiny", batch_size=4, lr=1e-3, warmup_steps=2, max_steps=3, log_every=1, dropout=0.0)


def _cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
    """Makes PyTorch report this CPU (the detection reads nothing else)."""
    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("synthetic") / "DATA")


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "split" not in r]


@pytest.fixture(scope="module")
def fp32_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "RUN"
    return pretrain(PretrainConfig(data=data, out=out, **FAST)), _losses(out)


def test_the_torch_cpu_feature_tests_this_module_reads_exist():
    assert isinstance(torch.backends.cpu.get_cpu_capability(), str)
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)


@pytest.mark.parametrize("capability, avx512_bf16, amx, named, native", [
    ("DEFAULT", False, False, "DEFAULT", False),
    ("AVX2", False, False, "AVX2", False),
    ("AVX512", False, False, "AVX512", False),        # AVX-512 without its bf16 extension (Skylake, Ice Lake)
    ("AVX512", True, False, "AVX512+AVX512_BF16", True),
    ("AVX512", True, True, "AVX512+AVX512_BF16+AMX", True),
])
def test_native_bf16_needs_avx512_bf16_or_amx(monkeypatch, capability, avx512_bf16, amx, named, native):
    _cpu(monkeypatch, capability, avx512_bf16, amx)
    assert precision.cpu_capability() == named
    assert precision.native_bf16(CPU) is native
    assert precision.fastest_precision(CPU) == ("bf16" if native else "fp32")
    assert precision.resolve_precision("bf16", CPU) == ("bf16" if native else "fp32")
    assert precision.resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert precision.resolve_precision("fp32", CPU) == "fp32"


def test_without_native_bf16_the_fallback_is_said_in_one_line(monkeypatch):
    _cpu(monkeypatch, "AVX2")
    line = precision.describe("bf16", CPU)
    assert "\n" not in line and "bf16 computes in fp32 here: this CPU (AVX2) has no native bf16" in line
    assert precision.describe("auto", CPU) == "bertforge: precision fp32 (auto) on cpu AVX2"
    _cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert precision.describe("bf16", CPU) == "bertforge: precision bf16 on cpu AVX512+AVX512_BF16"


def test_the_environment_overrides_the_detection(monkeypatch):
    _cpu(monkeypatch, "AVX2")
    monkeypatch.setenv(precision.OVERRIDE_ENV, "1")
    assert precision.resolve_precision("bf16", CPU) == "bf16"
    _cpu(monkeypatch, "AVX512", avx512_bf16=True, amx=True)
    monkeypatch.setenv(precision.OVERRIDE_ENV, "0")
    assert precision.resolve_precision("auto", CPU) == "fp32"
    assert "(AVX512+AVX512_BF16+AMX; BERTFORGE_CPU_BF16=0) has no native bf16" in precision.describe("bf16", CPU)
    monkeypatch.setenv(precision.OVERRIDE_ENV, "yes")
    with pytest.raises(BertforgeError, match="BERTFORGE_CPU_BF16 must be 1"):
        precision.native_bf16(CPU)


def test_bad_precisions_are_refused():
    with pytest.raises(BertforgeError, match="fp16 needs a CUDA device"):
        precision.resolve_precision("fp16", CPU)
    with pytest.raises(BertforgeError, match="unknown precision 'fp8'"):
        precision.resolve_precision("fp8", CPU)


@pytest.mark.parametrize("capability, fastest", [((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_picks_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, fastest):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == fastest


def test_pretrain_bf16_without_native_bf16_runs_fp32_and_records_the_cpu(data, fp32_run, tmp_path, monkeypatch,
                                                                         capsys):
    reference, reference_losses = fp32_run
    _cpu(monkeypatch, "AVX2")
    result = pretrain(PretrainConfig(data=data, out=tmp_path / "bf16", precision="bf16", **FAST))
    err = capsys.readouterr().err
    assert "bertforge: --precision bf16 computes in fp32 here: this CPU (AVX2) has no native bf16" in err
    assert _losses(tmp_path / "bf16") == reference_losses and len(reference_losses) == 3  # fp32, bit for bit
    assert result.eval_metrics == reference.eval_metrics
    record = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert record["machine"] == {"device": "cpu", "cpu_capability": "AVX2", "precision": "fp32"}
    assert record["pretrain"]["precision"] == "bf16"  # what was asked: a resume asks the same
    assert "on cpu AVX2 (fp32)" in result.summary


def test_pretrain_auto_with_native_bf16_computes_in_bf16(data, fp32_run, tmp_path, monkeypatch, capsys):
    _cpu(monkeypatch, "AVX512", avx512_bf16=True)
    pretrain(PretrainConfig(data=data, out=tmp_path / "RUN", precision="auto", **FAST))
    assert "bertforge: precision bf16 (auto) on cpu AVX512+AVX512_BF16" in capsys.readouterr().err
    assert _losses(tmp_path / "RUN") != fp32_run[1]  # bf16 rounding
    record = json.loads((tmp_path / "RUN" / "config.json").read_text())
    assert record["machine"]["precision"] == "bf16" and record["pretrain"]["precision"] == "auto"
