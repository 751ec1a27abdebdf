"""Expert quantization at load.

    settings.py    --quant / --quant-group / --calibration, checked (QuantSettings)
    format.py      group-wise affine codes in bit planes, one contiguous buffer per expert (QuantLayout)
    kernels.py     the quantized expert FFN: C on the CPU (_ops.qlinear), Triton on GPUs, the torch twin
    dense.py       --quant-scope all: the dense matmul weights (attention, shared experts, dense MLPs, lm_head)
                   as QuantLinear modules in the same format, quantized at load
    calibrate.py, allocate.py   mixed precision (MC-MoE): a calibration run, an integer program per layer
    prepare.py, store.py        the quantized-expert cache entry: built once, verified, opened as an expert source
"""
