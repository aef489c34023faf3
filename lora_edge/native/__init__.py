"""lora-edge's native ONNX Runtime operators (domain ``lora_edge``): LoRA branches (float16, int8, w8a8), int4
projections and int4's float-offset correction, for CPU packages exported with ``--lora-kernel native``.

- :mod:`.contract`: operator names, features and versions, input names, the w8a8 blob layout (both sides).
- :mod:`.encode`: adapter tensors as the operators read them (numpy only).
- :mod:`.build`: compile ``src/`` for this machine's CPU against ONNX Runtime's C API headers (any release from
  1.21: the C API is ABI-stable, so the library loads into later runtimes).
- :mod:`.register`: device side, register the built library with a session.
"""
