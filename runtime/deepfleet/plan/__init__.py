"""`deepfleet plan`: capacity and cost planning on the engine's own sizing code (engine/memory.py, the model
classes built on the meta device)."""
