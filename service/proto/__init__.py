"""The Open Inference Protocol's gRPC messages: inference.proto and the modules generated from it (make proto)."""
