"""The ONNX graph writer: the builder and the emitters the model families compose."""
