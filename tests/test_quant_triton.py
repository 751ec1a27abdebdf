"""moe_engine.quant.triton_qmatmul: the Triton kernel against qlinear_reference over a grid of formats and shapes.

Off-GPU the kernel runs under TRITON_INTERPRET=1 in one subprocess (this file run as a script): the
interpreter is chosen when @triton.jit runs, so setting it in this process would also turn the CUDA
kernel of every later test into the interpreted one. The subprocess writes the error of every case to
a JSON file, and each case is a test here. Where a GPU is visible the same grid (and larger shapes)
runs on it in this process.

Error: max |y - ref| / max |ref| (relative to the output scale). Tolerances: float32 1e-5; float16
2e-3 (both round W to fp16 the same way; the output's fp16 rounding and the reference's); bfloat16
1.6e-2 on GPU. The interpreter rounds float32 -> bfloat16 by truncation (the GPU rounds to nearest),
so bfloat16 gets 4e-2 there, and its tl.dot multiplies bfloat16's raw uint16 storage, so the bfloat16
tl.dot cases run only on GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from moe_engine.quant.format import BITS, QMatrix, QuantLayout, pack_planes, quantize_matrix  # noqa: E402
from moe_engine.quant.kernels import qlinear_reference, quant_expert_ffn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(32, 64), (48, 128), (64, 192)]            # (R, C); 48 rows leave a partial row block
TOKENS = [1, 3, 8, 20]                               # 1..8: the GEMV kernel, 20: tl.dot (two N blocks of 16)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
TOL_INTERPRETED = {**TOL, "bfloat16": 4e-2}
EXPERT_BITS = BITS
EXPERT_TOKENS = [1, 5]


def _case_id(bits, group, n, r, c, dtype):
    return f"b{bits}-g{group}-n{n}-{r}x{c}-{dtype}"


def _grid(shapes, tokens, interpreted: bool) -> list[tuple]:
    """(bits, group, n, r, c, dtype) for every combination where the group divides C."""
    return [(bits, group, n, r, c, dt)
            for bits in BITS for group in (32, 64, 128) for r, c in shapes if c % group == 0
            for n in tokens for dt in DTYPES
            if not (interpreted and dt == "bfloat16" and n > 8)]


def _qmatrix(r: int, c: int, bits: int, group: int, seed: int, device: str) -> QMatrix:
    """A random [r, c] matrix quantized and packed by format.py, on `device`."""
    g = torch.Generator().manual_seed(seed)
    codes, scales, zeros = quantize_matrix(torch.randn(r, c, generator=g), bits, group)
    planes = tuple(p.to(device) for p in pack_planes(codes, bits))
    return QMatrix(r, c, bits, group, planes, scales.to(device), zeros.to(device))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _qlinear_errors(cases, device: str) -> dict[str, float | str]:
    """case id -> relative error of qlinear_triton vs qlinear_reference (or the traceback if it raised)."""
    from moe_engine.quant.triton_qmatmul import qlinear_triton
    out = {}
    for i, (bits, group, n, r, c, dt) in enumerate(cases):
        try:
            m = _qmatrix(r, c, bits, group, seed=i, device=device)
            x = torch.randn(n, c, generator=torch.Generator().manual_seed(10_000 + i)).to(device, DTYPES[dt])
            out[_case_id(bits, group, n, r, c, dt)] = _rel_err(qlinear_triton(x, m), qlinear_reference(x, m))
        except Exception:
            out[_case_id(bits, group, n, r, c, dt)] = traceback.format_exc()
    return out


def _expert_ffn_triton(x: torch.Tensor, buf: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """quant_expert_ffn (silu) with both matmuls through the Triton kernel. x [N, D] -> [N, D]."""
    from moe_engine.quant.triton_qmatmul import qlinear_triton
    gate_up = qlinear_triton(x, layout.w1.views(buf))                # [N, 2I]
    gate, up = gate_up.split(layout.intermediate_size, dim=-1)
    return qlinear_triton(torch.nn.functional.silu(gate) * up, layout.w2.views(buf))


def _expert_errors(device: str) -> dict[str, float | str]:
    """'expert-b{bits}-n{n}' -> relative error of a QuantLayout(192, 128, bits, 64) expert vs the reference."""
    out = {}
    for bits in EXPERT_BITS:
        layout = QuantLayout(192, 128, bits, 64)
        g = torch.Generator().manual_seed(bits)
        gate, up, down = (torch.randn(128, 192, generator=g), torch.randn(128, 192, generator=g),
                          torch.randn(192, 128, generator=g))
        buf = layout.quantize(gate, up, down).to(device)
        for n in EXPERT_TOKENS:
            key = f"expert-b{bits}-n{n}"
            try:
                x = torch.randn(n, 192, generator=g).to(device)
                ref = quant_expert_ffn(x, buf, layout, "silu", kernel="reference")
                out[key] = _rel_err(_expert_ffn_triton(x, buf, layout), ref)
            except Exception:
                out[key] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, float | str]:
    """Errors of every interpreter case, from one `TRITON_INTERPRET=1 python this_file.py OUT.json` run."""
    path = tmp_path_factory.mktemp("triton") / "errors.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(path.read_text())


def _assert_ok(err: float | str, tol: float) -> None:
    assert not isinstance(err, str), err
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


INTERPRETED_CASES = _grid(SHAPES, TOKENS, interpreted=True)


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=[_case_id(*c) for c in INTERPRETED_CASES])
def test_qlinear_interpreted(interpreted, case):
    _assert_ok(interpreted[_case_id(*case)], TOL_INTERPRETED[case[-1]])


@pytest.mark.parametrize("bits", EXPERT_BITS)
@pytest.mark.parametrize("n", EXPERT_TOKENS)
def test_expert_interpreted(interpreted, bits, n):
    _assert_ok(interpreted[f"expert-b{bits}-n{n}"], TOL["float32"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_SHAPES = SHAPES + [(2048, 1024), (1000, 4096)]   # model-sized rows/columns; 1000 rows: a partial block
CUDA_TOKENS = TOKENS + [16, 100]


@needs_cuda
def test_qlinear_cuda():
    errors = _qlinear_errors(_grid(CUDA_SHAPES, CUDA_TOKENS, interpreted=False), "cuda")
    bad = {k: v for k, v in errors.items() if isinstance(v, str) or v > TOL[k.rsplit("-", 1)[1]]}
    assert not bad, bad


@needs_cuda
def test_expert_cuda():
    errors = _expert_errors("cuda")
    bad = {k: v for k, v in errors.items() if isinstance(v, str) or v > TOL["float32"]}
    assert not bad, bad


@needs_cuda
def test_kernels_dispatch_cuda_to_triton():
    """kernels.qlinear sends CUDA tensors to the Triton kernel (same bits as calling it directly)."""
    from moe_engine.quant.kernels import qlinear
    from moe_engine.quant.triton_qmatmul import qlinear_triton
    m = _qmatrix(64, 192, 3, 64, seed=0, device="cuda")
    x = torch.randn(3, 192, device="cuda")
    assert torch.equal(qlinear(x, m), qlinear_triton(x, m))


def test_bad_input_names_the_fix():
    from moe_engine.quant.triton_qmatmul import qlinear_triton
    m = _qmatrix(32, 64, 4, 32, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"x must be \[N, 64\]"):
        qlinear_triton(torch.randn(2, 32), m)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qlinear_triton(torch.randn(2, 64, dtype=torch.float64), m)


if __name__ == "__main__":        # the interpreter run: TRITON_INTERPRET=1 python tests/test_quant_triton.py OUT.json
    torch.set_num_threads(1)
    errors = {**_qlinear_errors(INTERPRETED_CASES, "cpu"), **_expert_errors("cpu")}
    Path(sys.argv[1]).write_text(json.dumps(errors))
