"""Expert quantization: formats (format.py), kernels (kernels.py), bit allocation and the quantized-expert cache."""
