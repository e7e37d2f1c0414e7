"""Formats other tools read and write (docs/interop.md): export a qtool checkpoint as
compressed-tensors, GPTQ or bitsandbytes NF4, and import GPTQ, AWQ and compressed-tensors
checkpoints losslessly as qtool checkpoints.

One module per format, each holding the exact tensor mapping in both directions it supports;
`export` and `community` drive them.
"""
