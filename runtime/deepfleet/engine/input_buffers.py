"""The model's per-step inputs in persistent buffers: device tensors allocated once (CUDA graphs read them in
place), filled from pinned host staging by one asynchronous copy per tensor. A copy from pageable memory would
make the host wait for the GPU queue, which would undo the overlap of host work with the GPU's previous step.

Two staging sets alternate: the set used by step N-1 is free again once step N-1's results reached the host,
which the engine waits for before it prepares step N+1.

Layout of one step: the decode rows first (padded up to the CUDA-graph batch size with harmless rows that write
to the scratch block), then the prefill chunks. Block tables are gathered into the staging rows from the
persistent rows of engine/input_batch.py."""

from __future__ import annotations

import torch


class _Staging:
    def __init__(self, max_tokens: int, max_rows: int, width: int, pin: bool, lora: bool):
        def buf(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.ids, self.positions, self.slots = (buf(max_tokens, torch.long) for _ in range(3))
        # ctx_lens [max_rows] then query_start [max_rows + 2] (decode segment, then prefill segment): one copy
        self.row_meta = buf(2 * max_rows + 2, torch.int32)
        self.ctx_lens, self.query_start = self.row_meta[:max_rows], self.row_meta[max_rows:]
        self.ctx_lens.fill_(1)
        self.tables = buf(max_rows * width, torch.int32)  # filled as one contiguous [rows, used width] block
        self.fill = buf(2 * max_rows, torch.long)  # a step's k fill destinations, then their k sources
        names = ["ids", "positions", "slots", "ctx_lens", "tables", "query_start", "fill"]
        if lora:
            self.lora_slots = buf(max_tokens, torch.long)  # each token's adapter slot (deepfleet/lora/)
            names.append("lora_slots")
        self.np = {name: getattr(self, name).numpy() for name in names}


class InputBuffers:
    def __init__(self, max_tokens: int, max_rows: int, width: int, scratch_block: int, block_size: int,
                 device: torch.device, lora_null_slot: int | None = None):
        """`lora_null_slot`: with LoRA on, the "no adapter" slot the token slots start at; None: LoRA off."""
        self.max_tokens, self.max_rows, self.width = max_tokens, max_rows, width
        self.device = device
        pin = device.type == "cuda"
        lora = lora_null_slot is not None
        self._staging = [_Staging(max_tokens, max_rows, width, pin, lora) for _ in range(2)]
        self._turn = 0
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slots = torch.full((max_tokens,), scratch_block * block_size, dtype=torch.long, device=device)
        self.row_meta = torch.zeros(2 * max_rows + 2, dtype=torch.int32, device=device)  # as _Staging.row_meta
        self.ctx_lens, self.query_start = self.row_meta[:max_rows], self.row_meta[max_rows:]
        self.ctx_lens.fill_(1)
        self.block_tables = torch.full((max_rows, width), scratch_block, dtype=torch.int32, device=device)
        self.fill = torch.zeros(2 * max_rows, dtype=torch.long, device=device)
        self.scratch_slot, self.scratch_block = scratch_block * block_size, scratch_block
        self.lora_slots = torch.full((max_tokens,), lora_null_slot, dtype=torch.long, device=device) if lora else None

    def staging(self) -> _Staging:
        """The staging set for the next step (alternating)."""
        self._turn ^= 1
        return self._staging[self._turn]

    def upload(self, st: _Staging, num_tokens: int, num_rows: int, used_width: int, num_fill: int,
               prev_token_ids: torch.Tensor | None) -> None:
        """Copy the staged step to the device buffers; then fill the rows whose input token is still on the
        device (sampled by the previous step, not yet seen by the host) from `prev_token_ids`."""
        nb = True
        self.ids[:num_tokens].copy_(st.ids[:num_tokens], non_blocking=nb)
        self.positions[:num_tokens].copy_(st.positions[:num_tokens], non_blocking=nb)
        self.slots[:num_tokens].copy_(st.slots[:num_tokens], non_blocking=nb)
        if self.lora_slots is not None:
            self.lora_slots[:num_tokens].copy_(st.lora_slots[:num_tokens], non_blocking=nb)
        # ctx_lens and query_start in one copy: the rows past num_rows in between are no step's input (a step
        # stages every row it reads)
        meta_end = self.max_rows + num_rows + 2
        self.row_meta[:meta_end].copy_(st.row_meta[:meta_end], non_blocking=nb)
        if used_width:
            self.block_tables[:num_rows, :used_width].copy_(
                st.tables[: num_rows * used_width].view(num_rows, used_width), non_blocking=nb)
        if num_fill:
            fill = self.fill[: 2 * num_fill]
            fill.copy_(st.fill[: 2 * num_fill], non_blocking=nb)
            self.ids.index_copy_(0, fill[:num_fill], prev_token_ids.index_select(0, fill[num_fill:]))
