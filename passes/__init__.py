"""Graph passes over ONNX models, the target table and the quantization-parameter table."""
