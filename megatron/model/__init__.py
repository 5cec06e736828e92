"""GPT model package: embedding, attention, dense MLP, transformer block, LM head."""
from megatron.model.gpt_model import GPTModel, ModelOutput  # noqa: F401
