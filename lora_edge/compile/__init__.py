"""The compile side (torch, transformers, peft, onnx): base + PEFT adapters -> a package.

``pipeline.export(cfg)`` runs the stages (read, plan slots, merge, quantize, build the graph, write); ``verify``
compares a package with PyTorch + PEFT. Build ``cfg`` with ``lora_edge.recipes.export_config(recipe, ...)`` or
``lora_edge.config.ExportConfig``.
"""
