"""Imported by the forkserver too when a CPU run trains Hugging Face models (launch/process.py):
transformers' model classes, imported and a tiny Llama built once in the server, so that each
cell's process does not import them again (a cell's first HF model cost 1.1 s of its set-up on
this 2-core CPU; hf-tiny.yaml ran in 36 s instead of 63 s). As in preload.py: one thread, CUDA
not asked, and not PEFT: it imports bitsandbytes, which asks CUDA for its devices."""
import torch

from .preload import THREADS  # noqa: F401 - preload.py has run: torch warmed, one thread


def _warm() -> None:
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig
        config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=16, max_position_embeddings=8)
        model = AutoModelForCausalLM.from_config(config)
        model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    finally:
        torch.cuda.is_available = available


_warm()
