"""Applications of trained runs: predict on images, export to ONNX, tune hyperparameters.
Imports only from the layers below it; the CLI sits above."""
