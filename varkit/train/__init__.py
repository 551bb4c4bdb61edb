"""Training loops (tokenizers, generators, distillation), torchrun-ready."""
