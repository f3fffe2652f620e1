"""nanochat and Hugging Face checkpoints and tokenizers in and out, never executing code from a file.

`torch_files`: PyTorch's `.pt` zip format read and written without torch (a restricted unpickler
that rebuilds tensors as numpy arrays); `nanochat`: import of nanochat's checkpoint and tokenizer
layout and export back to it; `hf`: export to transformers' NanoChat layout (safetensors).
"""
