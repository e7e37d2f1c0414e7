"""Finding and loading the unquantized model: built-in names, GGUF files, HF directories."""
