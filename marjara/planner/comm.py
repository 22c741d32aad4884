"""Bytes each GPU sends per optimizer step, by collective, and the time they take.

Ring collectives over n ranks send (n - 1) / n of the buffer per all-gather or reduce-scatter and
twice that per all-reduce. DeepSpeed 0.19's schedule, per optimizer step of `accum` micro-batches:

- ZeRO-0: one all-reduce of the gradients at the accumulation boundary.
- ZeRO-1: a reduce-scatter of the gradients at the boundary, an all-gather of the updated
  16-bit partitions after the step.
- ZeRO-2: a reduce-scatter after every micro-batch's backward (gradients are partitioned as they
  are produced), the all-gather after the step.
- ZeRO-3: per micro-batch, an all-gather of the parameters in forward and again in backward, and
  a reduce-scatter of the gradients; parameters under the persistence threshold stay out of it.
- MoE: per MoE layer and micro-batch, four all-to-alls of the dispatched tokens (dispatch and
  combine, forward and backward) inside each expert-parallel group; expert gradients and
  parameters move within the expert-data-parallel group (world / ep_size ranks).
- Sequence parallelism (--sp_size N): per layer and micro-batch, Ulysses' four attention
  all-to-alls inside the sequence group, which compute waits for (marjara/planner/sequence.py);
  ZeRO's collectives stay over the whole world, as DeepSpeed partitions over data x sequence ranks.

A group that fits in one node runs at the intra-node bandwidth, any other at the inter-node one
(the slowest link of a ring sets its pace). The step time assumes communication overlaps compute
(DeepSpeed's overlap_comm, prefetching): step = max(compute, communication).
"""

from __future__ import annotations

from dataclasses import dataclass

from marjara.planner.activations import expert_slots_per_token
from marjara.planner.model_states import persistent_numels
from marjara.planner.sequence import all_to_all_bytes_per_layer
from marjara.planner.setup import Setup
from marjara.planner.shapes import param_counts

GB = 1e9


@dataclass
class Traffic:
    all_reduce: float = 0.0       # bytes sent per GPU per optimizer step
    reduce_scatter: float = 0.0
    all_gather: float = 0.0
    all_to_all: float = 0.0
    seconds: float = 0.0          # at the cluster's bandwidths
    sequence_all_to_all: float = 0.0  # Ulysses' attention all-to-alls (marjara/planner/sequence.py)
    sequence_seconds: float = 0.0     # their time, which compute waits for

    @property
    def total(self) -> float:
        return self.all_reduce + self.reduce_scatter + self.all_gather + self.all_to_all + self.sequence_all_to_all


def bandwidth(setup: Setup, group: int, spans_nodes: bool | None = None) -> float:
    """Bytes/s of a collective over `group` ranks (consecutive ranks fill a node first)."""
    inside = group <= setup.gpus_per_node if spans_nodes is None else not spans_nodes
    return (setup.device.intra_node_gbps if inside else setup.device.inter_node_gbps) * GB


def _zero_traffic(setup: Setup, numel: float, ranks: int, accum: int, persistent: float, traffic: Traffic) -> None:
    if ranks <= 1 or numel == 0:
        return
    s, stage = setup.bytes_per_value, setup.zero_stage
    ring = (ranks - 1) / ranks
    sent = Traffic()
    if stage == 0:
        sent.all_reduce = 2 * ring * s * numel
    elif stage in (1, 2):
        sent.reduce_scatter = ring * s * numel * (accum if stage == 2 else 1)
        sent.all_gather = ring * s * numel
    else:
        gathered = numel - persistent
        sent.all_gather = 2 * ring * s * gathered * accum
        sent.reduce_scatter = ring * s * numel * accum
    # An expert-data-parallel group of world / ep ranks strides over nodes like the whole world does.
    seconds = sent.total / bandwidth(setup, ranks, spans_nodes=setup.world > setup.gpus_per_node)
    traffic.all_reduce += sent.all_reduce
    traffic.reduce_scatter += sent.reduce_scatter
    traffic.all_gather += sent.all_gather
    traffic.seconds += seconds


def step_traffic(setup: Setup, micro_batch: int, accum: int) -> Traffic:
    c = setup.model
    counts = param_counts(c)
    persistent_dense, persistent_expert = persistent_numels(setup)
    traffic = Traffic()
    _zero_traffic(setup, counts.non_expert, setup.world, accum, persistent_dense, traffic)
    if counts.expert:
        _zero_traffic(setup, counts.expert / setup.ep_size, setup.world // setup.ep_size, accum, persistent_expert,
                      traffic)
    ep = setup.ep_size
    if c.use_moe and ep > 1:
        tokens = micro_batch * setup.seq_len
        dispatched = expert_slots_per_token(setup, tokens) * tokens * c.d_model * setup.bytes_per_value
        sent = 4 * (ep - 1) / ep * dispatched * len(c.moe_layers) * accum
        traffic.all_to_all += sent
        traffic.seconds += sent / bandwidth(setup, ep)
    return traffic


def add_sequence_traffic(setup: Setup, micro_batch: int, accum: int, traffic: Traffic) -> None:
    """Ulysses' attention all-to-alls of one optimizer step (marjara/planner/sequence.py), and their
    time on the sequence group's links."""
    if setup.sp_size == 1:
        return
    passes = 3 if setup.grad_checkpointing else 2  # forward, backward, and the recomputed forward
    sent = all_to_all_bytes_per_layer(setup, micro_batch) * setup.model.n_layers * passes * accum
    traffic.sequence_all_to_all += sent
    traffic.sequence_seconds += sent / bandwidth(setup, setup.sp_size)
