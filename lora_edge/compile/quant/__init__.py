"""Base-weight quantization: block formats, GPTQ and its calibration."""
