"""Multi-LoRA: many adapters served at once, base and adapters mixed in one batch.

* **Registry and host cache.** `add_lora(name, path)` reads and validates a PEFT folder (off the
  step thread: the server calls it through `asyncio.to_thread`) and keeps its weights in host
  memory, already fused per layer the way the model fuses its projections: for q/k/v (and
  gate/up) one `A [R, in]` (the slices' A matrices stacked) and one block-diagonal `B [out, R]`
  (each slice's B in its rows and columns, zeros elsewhere), scaling (alpha/r or alpha/sqrt(r))
  folded into B. At most `max_cpu_loras` names are registered; adding one more drops the least
  recently used adapter that has no request in flight.
* **Versions.** Every load of a name is a new `LoRAAdapter` with a higher version. Requests hold
  the version they started with (ref count), so replacing or removing a name lets them finish on
  the old weights; the version is dropped when its last request finishes. The prefix-cache key
  of a sequence is `("lora", name, version)`, so blocks computed under old weights are never reused.
* **Device slots.** `max_loras` adapters live on the compute device at once. The scheduler pins a
  slot when it admits a sequence (`pin`) and unpins it when the sequence stops running; a
  sequence whose adapter gets no slot waits in the queue. An unpinned resident adapter stays
  (warm) until the least recently used one is evicted for another. The step thread copies host
  tensors into the device layout between steps (`prepare`), never reading files.
* **Computing the term.** Per linear the resident adapters are concatenated: `A_all [ΣR, in]`,
  `B_all [out, ΣR]`, and `col_slot [ΣR]` (the slot of each rank column). A step's rows carry a
  slot index (0 = base). Decode rows are grouped by slot; when they use several adapters, one
  product `x @ A_allᵀ`, masked to each row's own columns, then `@ B_allᵀ` added to the base
  output serves them all (3 ops per linear whatever the number of adapters: on CPU the per-op cost
  dominates these skinny products). Prefill chunks, long row runs of one adapter, take their
  adapter's own columns (`A_all[c0:c1]`, the SGMV idea: one pair of products per run). Steps
  without adapter rows skip all of it. See docs/ENGINE.md, "Multi-LoRA", for the measurements.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The model's fused linears and the PEFT projections each one holds, in output order.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """For `LLM.generate(..., lora_request=...)`: the adapter is loaded on first use."""

    name: str
    path: str


@dataclasses.dataclass
class LoRAInfo:
    name: str
    path: str
    rank: int
    target_modules: list[str]
    version: int
    loaded_at: float  # time.time() of the load
    tier: str  # "gpu": resident in a compute-device slot (whatever the device); "cpu": host cache only
    requests_served: int


class LoRAAdapter:
    """One loaded version of a named adapter: host weights fused per (layer, linear)."""

    __slots__ = ("name", "path", "version", "rank", "target_modules", "loaded_at", "weights", "cache_key",
                 "refs", "pins", "slot", "requests_served", "registered")

    def __init__(self, name: str, path: str, version: int, rank: int, target_modules: list[str],
                 weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.name = name
        self.path = path
        self.version = version
        self.rank = rank
        self.target_modules = target_modules
        self.loaded_at = time.time()
        self.weights = weights  # (layer, fused linear) -> (A [R, in], B [out, R]), engine dtype, host
        self.cache_key = ("lora", name, version)  # the prefix cache's extra key
        self.refs = 0  # requests in flight on this version
        self.pins = 0  # running sequences on this version (its device slot cannot be taken)
        self.slot = 0  # device slot (1..max_loras), 0: none
        self.requests_served = 0
        self.registered = True  # False once replaced or removed: dropped when refs reach 0

    def info(self) -> LoRAInfo:
        return LoRAInfo(self.name, self.path, self.rank, list(self.target_modules), self.version, self.loaded_at,
                        "gpu" if self.slot else "cpu", self.requests_served)

    def __repr__(self) -> str:
        return f"LoRAAdapter({self.name!r}, v{self.version}, slot={self.slot})"


class LinearLoRA:
    """The device-side LoRA weights of one fused linear of one layer: the resident adapters
    concatenated along the rank axis (rebuilt by the manager when residency changes)."""

    __slots__ = ("layer", "name", "A", "B", "A_packed", "B_packed", "Bt", "slot_cols", "col_out", "ranges", "layout")

    def __init__(self, layer: int, name: str) -> None:
        self.layer = layer
        self.name = name
        self.A: torch.Tensor | None = None  # [ΣR, in]
        self.B: torch.Tensor | None = None  # [out, ΣR]
        self.A_packed: torch.Tensor | None = None  # oneDNN-blocked copies (CPU bf16)
        self.B_packed: torch.Tensor | None = None
        self.Bt: torch.Tensor | None = None  # [ΣR, out] for the CPU decode kernel
        self.slot_cols: torch.Tensor | None = None  # [slots, 2] long: each slot's columns (kernel)
        self.col_out: torch.Tensor | None = None  # [ΣR, 2] long: outputs where each B column is non-zero
        self.ranges: dict[int, tuple[int, int]] = {}  # slot -> its columns [c0, c1)
        self.layout: _Layout | None = None


class _Layout:
    """Which slot owns each rank column; linears with the same adapters share one (and one mask)."""

    __slots__ = ("col_slot", "slots")

    def __init__(self, col_slot: torch.Tensor, slots: frozenset[int]) -> None:
        self.col_slot = col_slot
        self.slots = slots


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class LoRABatch:
    """One step's adapter rows. Rows are ordered by the model runner so that decode rows of the
    same adapter are contiguous (base rows first) and each prefill chunk is one run."""

    __slots__ = ("num_rows", "segments", "dense", "dense_slots", "dense_slot_t", "dense_slot_long", "masks", "dtype",
                 "kernels")

    def __init__(self, num_rows: int, segments: list[tuple[int, int, int]], dense: tuple[int, int] | None,
                 dense_slots: list[int] | None, device: torch.device, dtype: torch.dtype, kernels=None) -> None:
        self.num_rows = num_rows
        self.segments = segments  # (start, end, slot): runs of one adapter, each its own products
        self.dense = dense  # (start, end): rows served by the masked all-adapter products
        self.dense_slots = frozenset(dense_slots or ())
        self.dense_slot_t = (torch.tensor(dense_slots, dtype=torch.int32, device=device)
                             if dense_slots else None)
        self.masks: dict[int, torch.Tensor | None] = {}
        self.dtype = dtype
        # The CPU decode kernel (bf16/fp16): only each row's own adapter, one call per linear.
        self.kernels = kernels
        self.dense_slot_long = torch.tensor(dense_slots, dtype=torch.long) if kernels is not None and dense_slots else None

    def _mask(self, layout: _Layout) -> torch.Tensor | None:
        key = id(layout)
        if key not in self.masks:
            if self.dense_slots.isdisjoint(layout.slots):
                self.masks[key] = None
            else:
                self.masks[key] = (self.dense_slot_t[:, None] == layout.col_slot[None, :]).to(self.dtype)
        return self.masks[key]

    def apply(self, lora: LinearLoRA, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output for x) plus each row's adapter term."""
        A, B = lora.A, lora.B
        if A is None:
            return y
        for start, end, slot in self.segments:
            cols = lora.ranges.get(slot)
            if cols is None:
                continue
            c0, c1 = cols
            xa = x[start:end] @ A[c0:c1].t()
            y[start:end].addmm_(xa, B[:, c0:c1].t())
        if self.dense is not None and lora.Bt is not None and self.dense_slot_long is not None:
            self.kernels.lora_decode_(y, x, A, lora.Bt, self.dense_slot_long, lora.slot_cols, lora.col_out, self.dense[1])
        elif self.dense is not None:
            mask = self._mask(lora.layout)
            if mask is not None:
                d0, d1 = self.dense
                whole = d0 == 0 and d1 == y.shape[0]
                xd = x if whole else x[d0:d1]
                if lora.A_packed is not None:  # oneDNN: the mask and the add fused into the products
                    xa = torch.ops.mkldnn._linear_pointwise.binary(xd, mask, lora.A_packed, None, "mul")
                    if whole:
                        y = torch.ops.mkldnn._linear_pointwise.binary(xa, y, lora.B_packed, None, "add")
                    else:
                        y[d0:d1].add_(_packed_linear(xa, lora.B_packed))
                else:
                    xa = (xd @ A.t()).mul_(mask)
                    y[d0:d1].addmm_(xa, B.t())
        return y


def _nonzero_output_ranges(B: torch.Tensor) -> torch.Tensor:
    """[ΣR, 2]: per column of B [out, ΣR], the output rows [first, last + 1) that can be non-zero
    (empty for an all-zero column). A fused linear's B is block-diagonal, so the decode kernel
    computes each adapter's q, k and v columns only over their own outputs."""
    nonzero = (B != 0).t()  # [ΣR, out]
    out = B.shape[0]
    any_nz = nonzero.any(dim=1)
    first = nonzero.int().argmax(dim=1)
    last = out - nonzero.flip(1).int().argmax(dim=1)
    return torch.stack([torch.where(any_nz, first, 0), torch.where(any_nz, last, 0)], dim=1).long()


# Decode rows of at least this many distinct adapters take the masked all-adapter products;
# fewer are served run by run (see the module docstring and docs/ENGINE.md).
DENSE_MIN_ADAPTERS = 2


class LoRAManager:
    """Registry, host cache, device slots and the per-linear device layouts. Thread-safe: `add`,
    `remove`, `acquire`, `release` and the listings run on any thread; `pin`, `unpin`, `prepare` and
    `batch` on the step thread."""

    def __init__(self, model, *, max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                 device: torch.device, dtype: torch.dtype, pack: bool = False, kernels=None) -> None:
        cfg = model.cfg
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.device = device
        self.dtype = dtype
        self.pack = pack  # oneDNN-packed copies for the dense products (the CPU bf16 fast path)
        self.kernels = kernels  # our CPU kernels (bf16/fp16): decode rows through lora_decode_
        self.num_layers = cfg.num_layers
        q, kv, h, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
        # (in, out) of each projection, and where its output sits inside its fused linear.
        self.module_shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
        }
        self.fused_out = {"qkv": q + 2 * kv, "o": h, "gate_up": 2 * inter, "down": h}
        self.offsets = {"q_proj": 0, "k_proj": q, "v_proj": q + kv, "o_proj": 0, "gate_proj": 0,
                        "up_proj": inter, "down_proj": 0}
        self._lock = threading.RLock()
        self._registry: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._versions: dict[str, int] = {}
        self._slots: list[LoRAAdapter | None] = [None] * (max_loras + 1)  # index 0: the base model
        self._slot_use: OrderedDict[int, None] = OrderedDict()  # resident slots, least recently used first
        self._dirty = False
        self.linears: list[LinearLoRA] = []
        for i, layer in enumerate(model.layers):
            for name in FUSED_LINEARS:
                lora = LinearLoRA(i, name)
                getattr(layer, name).lora = lora
                self.linears.append(lora)
        self.num_slot_loads = 0  # adapters copied into a device slot (a measure of slot churn)

    # ---- registry (any thread) ------------------------------------------------------------
    def add(self, name: str, path: str) -> LoRAInfo:
        """Read, validate and host-cache the adapter at `path` under `name` (a new version if the
        name exists). Raises FileNotFoundError or ValueError saying why."""
        from app.adapters.peft import read_peft_adapter

        if not isinstance(name, str) or not name:
            raise ValueError("a LoRA adapter needs a non-empty name")
        peft = read_peft_adapter(path, self.module_shapes, self.num_layers, self.max_lora_rank)
        weights = self._fuse(peft.weights)
        with self._lock:
            if name not in self._registry and len(self._registry) >= self.max_cpu_loras:
                victim = next((a for a in self._registry.values() if a.refs == 0), None)
                if victim is None:
                    raise ValueError(
                        f"cannot load LoRA adapter {name!r}: the host cache holds max_cpu_loras="
                        f"{self.max_cpu_loras} adapters and every one has requests in flight; remove one or "
                        "raise max_cpu_loras")
                log.warning("LoRA host cache full (%d): dropping least recently used adapter %r",
                            self.max_cpu_loras, victim.name)
                self._unregister(victim)
            version = self._versions.get(name, 0) + 1
            self._versions[name] = version
            adapter = LoRAAdapter(name, str(path), version, peft.rank, peft.target_modules, weights)
            old = self._registry.pop(name, None)
            if old is not None:
                self._unregister(old)
            self._registry[name] = adapter
            log.info("LoRA adapter %r v%d loaded from %s (rank %d, %s)", name, version, path, peft.rank,
                     ", ".join(peft.target_modules))
            return adapter.info()

    def remove(self, name: str) -> bool:
        """Unregister `name`; requests in flight on it finish first. False if unknown."""
        with self._lock:
            adapter = self._registry.get(name)
            if adapter is None:
                return False
            self._unregister(adapter)
            return True

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._registry

    def get(self, name: str) -> LoRAAdapter | None:
        with self._lock:
            return self._registry.get(name)

    def list(self) -> list[LoRAInfo]:
        with self._lock:
            return [a.info() for a in self._registry.values()]

    def acquire(self, name: str) -> LoRAAdapter:
        """The current version of `name`, held for one request (release it when the request ends)."""
        with self._lock:
            adapter = self._registry.get(name)
            if adapter is None:
                known = ", ".join(self._registry) or "none loaded"
                raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {known})")
            self._registry.move_to_end(name)
            adapter.refs += 1
            return adapter

    def release(self, adapter: LoRAAdapter) -> None:
        with self._lock:
            adapter.refs -= 1
            self._drop_if_unused(adapter)

    def _unregister(self, adapter: LoRAAdapter) -> None:
        if self._registry.get(adapter.name) is adapter:
            del self._registry[adapter.name]
        adapter.registered = False
        self._drop_if_unused(adapter)

    def _drop_if_unused(self, adapter: LoRAAdapter) -> None:
        if not adapter.registered and adapter.refs == 0 and adapter.slot and adapter.pins == 0:
            self._free_slot(adapter.slot)

    def _free_slot(self, slot: int) -> None:
        adapter = self._slots[slot]
        if adapter is not None:
            adapter.slot = 0
        self._slots[slot] = None
        self._slot_use.pop(slot, None)
        self._dirty = True

    def _fuse(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]):
        """PEFT's per-projection (A, B) → per fused linear (A stacked, B block-diagonal), engine dtype."""
        fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(self.num_layers):
            for name, modules in FUSED_LINEARS.items():
                present = [m for m in modules if (layer, m) in weights]
                if not present:
                    continue
                a_all = torch.cat([weights[(layer, m)][0] for m in present])
                b_all = torch.zeros(self.fused_out[name], a_all.shape[0], dtype=torch.float32)
                col = 0
                for m in present:
                    b = weights[(layer, m)][1]
                    off = self.offsets[m]
                    b_all[off: off + b.shape[0], col: col + b.shape[1]] = b
                    col += b.shape[1]
                fused[(layer, name)] = (a_all.to(self.dtype).contiguous(), b_all.to(self.dtype).contiguous())
        return fused

    # ---- device slots (step thread) -------------------------------------------------------
    def pin(self, adapter: LoRAAdapter) -> bool:
        """Hold a device slot for one more running sequence of `adapter`; False when every slot is
        pinned by other adapters (the sequence must wait)."""
        with self._lock:
            if adapter.slot:
                adapter.pins += 1
                self._slot_use.move_to_end(adapter.slot)
                return True
            slot = next((i for i in range(1, self.max_loras + 1) if self._slots[i] is None), 0)
            if not slot:
                slot = next((i for i in self._slot_use if self._slots[i].pins == 0), 0)
                if not slot:
                    return False
                self._free_slot(slot)
            self._slots[slot] = adapter
            adapter.slot = slot
            adapter.pins = 1
            self._slot_use[slot] = None
            self._dirty = True
            self.num_slot_loads += 1
            return True

    def unpin(self, adapter: LoRAAdapter) -> None:
        with self._lock:
            adapter.pins -= 1
            self._drop_if_unused(adapter)

    def prepare(self) -> None:
        """Bring the device layouts up to date with the slots (between steps, on the step thread)."""
        if not self._dirty:
            return
        with self._lock:
            resident = [(i, a) for i, a in enumerate(self._slots) if a is not None]
            self._dirty = False
        layouts: dict[tuple, _Layout] = {}
        for lora in self.linears:
            parts = [(slot, a.weights[(lora.layer, lora.name)]) for slot, a in resident
                     if (lora.layer, lora.name) in a.weights]
            if not parts:
                lora.A = lora.B = lora.A_packed = lora.B_packed = lora.layout = lora.Bt = lora.slot_cols = lora.col_out = None
                lora.ranges = {}
                continue
            ranges, col = {}, 0
            for slot, (a, _) in parts:
                ranges[slot] = (col, col + a.shape[0])
                col += a.shape[0]
            key = tuple((slot, c1 - c0) for slot, (c0, c1) in ranges.items())
            layout = layouts.get(key)
            if layout is None:
                col_slot = torch.cat([torch.full((r,), slot, dtype=torch.int32) for slot, r in key]).to(self.device)
                layout = layouts[key] = _Layout(col_slot, frozenset(ranges))
            lora.A = torch.cat([a for _, (a, _) in parts]).to(self.device)
            lora.B = torch.cat([b for _, (_, b) in parts], dim=1).to(self.device)
            lora.ranges = ranges
            lora.layout = layout
            lora.A_packed = lora.B_packed = None
            lora.Bt = lora.slot_cols = lora.col_out = None
            if self.kernels is not None:
                lora.Bt = lora.B.t().contiguous()
                cols = torch.zeros(self.max_loras + 1, 2, dtype=torch.long)
                for slot, (c0, c1) in ranges.items():
                    cols[slot, 0], cols[slot, 1] = c0, c1
                lora.slot_cols = cols
                lora.col_out = _nonzero_output_ranges(lora.B)
            if self.pack:
                from app.engine.layers.linear import pack_for_cpu

                lora.A_packed = pack_for_cpu(lora.A)
                lora.B_packed = pack_for_cpu(lora.B) if lora.A_packed is not None else None
                if lora.B_packed is None:
                    lora.A_packed = None

    def batch(self, row_slots: list[int], num_decode: int) -> LoRABatch | None:
        """The step's LoRA rows from each row's slot (decode rows first, grouped by slot)."""
        runs: list[list[int]] = []  # [start, end, slot]
        for i, slot in enumerate(row_slots):
            if runs and runs[-1][2] == slot and runs[-1][1] == i and i != num_decode:
                runs[-1][1] = i + 1
            elif slot:
                runs.append([i, i + 1, slot])
        if not runs:
            return None
        decode_runs = [r for r in runs if r[1] <= num_decode]
        segments = [tuple(r) for r in runs if r[1] > num_decode]
        dense = dense_slots = None
        if len(decode_runs) >= DENSE_MIN_ADAPTERS or (self.kernels is not None and decode_runs):
            # All decode rows, base rows too (their mask is zero): a decode-only step then adds
            # the term in the B product itself.
            dense = (0, num_decode)
            dense_slots = row_slots[:num_decode]
        else:
            segments = [tuple(r) for r in decode_runs] + segments
        return LoRABatch(len(row_slots), segments, dense, dense_slots, self.device, self.dtype, self.kernels)
