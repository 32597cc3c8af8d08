"""Model definitions (Qwen2/Llama, DeepSeek-V3), the safetensors loader, the tokenizer and tiny test models."""
