"""Pure quantization math: tensors in, tensors out. No nn.Module, no I/O."""
