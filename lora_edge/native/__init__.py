"""lora-edge's native LoRA kernel: the ``lora_edge.LoraDelta`` ONNX Runtime operator (``lora_delta.cc``).

A package exported with ``--lora-kernel native`` runs each LoRA branch as one LoraDelta node with
float16 A and B, split over the session's threads; with ``--lora-dtype int8``, one LoraDeltaQ8 node
with int8 A and B and a float32 scale per rank (half the bytes again; see :func:`encode`); with
``--lora-dtype w8a8`` the same codes in the order of integer dot products, the branch's activations in
int8 too, every branch's part in one adapter input (:func:`w8a8_blob`). The
operators are compiled on the machine that runs packages (``lora-edge build-kernel``, or
:func:`build`) for its own CPU, from the C++ source shipped here and ONNX Runtime's C API headers
(any release from 1.21: the C API is ABI-stable, so a kernel built against 1.21's headers loads
into later runtimes). The runtime registers it when a package asks for it. Each node also adds its
delta onto the base projection's output, which it takes as an input.

Device-side: no torch, no onnx; the build needs a C++17 compiler.
"""
