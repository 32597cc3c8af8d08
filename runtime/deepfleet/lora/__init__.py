"""Multi-LoRA serving: PEFT adapters read as published (adapter.py), kept in fixed GPU slots beside the base
model's projections (layers.py, manager.py), applied per token by the batched kernel (kernels/lora.py)."""
