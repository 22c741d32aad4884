"""The plan as a table for people and as JSON for programs."""

from __future__ import annotations

from dataclasses import replace

from marjara.planner.activations import activations
from marjara.planner.devices import GIB
from marjara.planner.memory import FRAGMENTATION, RESERVED_GIB
from marjara.planner.recommend import Candidate
from marjara.planner.setup import Setup
from marjara.planner.shapes import active_params, param_counts

DAY = 86400.0


def describe(setup: Setup) -> str:
    c, d = setup.model, setup.device
    counts = param_counts(c)
    moe = (f", MoE {c.num_experts} experts top-{c.top_k} on {len(c.moe_layers)} layers, ep {setup.ep_size}"
           if c.use_moe else "")
    return (f"model {c.preset}: {counts.total / 1e9:.2f}B parameters ({(active_params(c, counts) + counts.embedding) / 1e9:.2f}B "
            f"active){moe}, seq_len {setup.seq_len}, vocab {c.vocab_size}, {setup.precision}, activation checkpointing "
            f"{'on' if setup.grad_checkpointing else 'off'}{_sequence_parallel(setup)}\ncluster: {setup.nodes} x {setup.gpus_per_node} {d.name} "
            f"({d.memory_gib:g} GiB, {d.peak_tflops:g} TFLOP/s bf16 peak, {d.intra_node_gbps:g} GB/s intra-node, "
            f"{d.inter_node_gbps:g} GB/s inter-node per GPU)")


def _sequence_parallel(setup: Setup) -> str:
    text = ""
    if setup.offload_activations:
        text += ", checkpointed activations offloaded to host memory"
    if setup.tiled_mlp:
        text += ", tiled MLP not modelled (its activations counted untiled: an upper bound)"
    if setup.sp_size > 1:
        text += (f"\nsequence parallel (Ulysses): {setup.sp_size} GPUs per sample, {setup.local_seq_len} tokens each, "
                 f"{setup.data_parallel} data-parallel group(s); ZeRO partitions over all {setup.world} GPUs")
    return text


def _flags(s: Setup) -> str:
    """The train.py flags a recommendation adds to the command line."""
    return ((" --grad_checkpointing" if s.grad_checkpointing else "") + (f" --sp_size {s.sp_size}" if s.sp_size > 1 else "")
            + (" --offload_activations" if s.offload_activations else ""))


def _rows(table: list[Candidate], tokens: float | None, mfu: float) -> list[tuple[str, list[str]]]:
    def gib(value: float) -> str:
        return f"{value / GIB:.2f}"

    def each(fn) -> list[str]:
        return [fn(c) for c in table]

    ck, sp = table[0].setup.grad_checkpointing, table[0].setup.sp_size
    rows = [
        (f"micro-batch (sequences per {'GPU' if sp == 1 else f'{sp} GPUs'})", each(lambda c: str(c.micro_batch))),
        ("memory per GPU, GiB", [""] * len(table)),
        ("  parameters", each(lambda c: gib(c.memory.states.parameters))),
        ("  gradients", each(lambda c: gib(c.memory.states.gradients))),
        ("  fp32 master weights", each(lambda c: gib(c.memory.states.fp32_masters))),
        ("  Adam moments", each(lambda c: gib(c.memory.states.optimizer_states))),
        ("  fp32 gradients for the step", each(lambda c: gib(c.memory.states.step_gradients))),
        ("  ZeRO-3 gathered largest layer", each(lambda c: gib(c.memory.states.gathered))),
        ("  (of these, MoE experts)", each(lambda c: gib(c.memory.experts.on_gpu))),
        (f"  activations, checkpointing off{' (in total)' if not ck else ''}",
         each(lambda c: gib(activations(replace(c.setup, grad_checkpointing=False), c.micro_batch).peak))),
        (f"  activations, checkpointing on{' (in total)' if ck else ''}",
         each(lambda c: gib(activations(replace(c.setup, grad_checkpointing=True), c.micro_batch).peak))),
        ("    of which loss and logits", each(lambda c: gib(c.memory.activations.loss))),
        ("  communication buckets", each(lambda c: gib(c.memory.buffers))),
        (f"  fragmentation allowance {FRAGMENTATION:.0%}", each(lambda c: gib(c.memory.fragmentation))),
        ("  total", each(lambda c: gib(c.memory.total))),
        (f"  usable ({RESERVED_GIB:g} GiB kept for CUDA/NCCL)", each(lambda c: gib(c.memory.usable))),
        ("  fits", each(lambda c: "no: " + c.refused if c.refused else "yes" if c.fits else "no")),
        ("largest micro-batch that fits", each(lambda c: str(c.max_micro_batch))),
        ("host memory per node, GiB (offload)",
         each(lambda c: gib((c.memory.states.host + c.memory.activations.host) * c.setup.gpus_per_node))),
        ("sent per GPU per step, GB", [""] * len(table)),
        ("  all-reduce", each(lambda c: f"{c.traffic.all_reduce / 1e9:.2f}")),
        ("  reduce-scatter", each(lambda c: f"{c.traffic.reduce_scatter / 1e9:.2f}")),
        ("  all-gather", each(lambda c: f"{c.traffic.all_gather / 1e9:.2f}")),
        ("  MoE all-to-all", each(lambda c: f"{c.traffic.all_to_all / 1e9:.2f}")),
        ("time per step, s", [""] * len(table)),
        ("  communication", each(lambda c: f"{c.traffic.seconds:.2f}")),
        (f"  compute at {mfu:.0%} MFU", each(lambda c: f"{c.compute_seconds:.2f}")),
        ("tokens/s (all GPUs)", each(lambda c: f"{c.tokens_per_second:,.0f}")),
    ]
    if sp > 1:  # Ulysses' rows, after the others of their kind
        at = next(i for i, (name, _) in enumerate(rows) if name == "time per step, s")
        rows.insert(at, ("  attention all-to-all (sequence parallel)",
                         each(lambda c: f"{c.traffic.sequence_all_to_all / 1e9:.2f}")))
        rows.insert(at + 3, ("  attention all-to-all, not overlapped", each(lambda c: f"{c.traffic.sequence_seconds:.2f}")))
    if tokens:
        rows.append((f"days for {tokens:.3g} tokens", each(lambda c: f"{tokens / c.tokens_per_second / DAY:.1f}")))
    return rows


def table_text(table: list[Candidate], tokens: float | None, mfu: float) -> str:
    rows = _rows(table, tokens, mfu)
    label = max(len(name) for name, _ in rows) + 1
    widths = [max(len(c.name), *(len(values[i]) for _, values in rows)) + 2 for i, c in enumerate(table)]
    lines = [" " * label + "".join(f"{c.name:>{w}}" for c, w in zip(table, widths))]
    lines += [(f"{name:<{label}}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths))).rstrip() for name, values in rows]
    return "\n".join(lines)


def recommendation_text(chosen: Candidate | None, write_path: str | None) -> str:
    if chosen is None:
        return ("recommendation: none fits, not even one sequence per GPU with activation checkpointing, sequence "
                "parallelism and offload; use more GPUs, GPUs with more memory, or a shorter --seq_len")
    s = chosen.setup
    tokens = chosen.global_sequences * s.seq_len
    flags = _flags(s)
    ranks = f"{s.world} GPUs" if s.sp_size == 1 else f"{s.data_parallel} data-parallel group(s) of {s.sp_size} GPUs"
    text = (f"recommendation: {chosen.name}{' with' + flags if flags else ''}, micro-batch "
            f"{chosen.micro_batch} x {chosen.grad_accum} accumulation steps x {ranks} = "
            f"{chosen.global_sequences} sequences ({tokens:,} tokens) per step, {chosen.tokens_per_second:,.0f} tokens/s")
    if write_path:
        text += f"\nds_config written to {write_path}: train.py --deepspeed_config {write_path}{flags}"
    return text


def as_json(setup: Setup, table: list[Candidate], chosen: Candidate | None, tokens: float | None) -> dict:
    def candidate(c: Candidate) -> dict:
        m, a = c.memory, c.memory.activations
        return {
            "name": c.name, "zero_stage": c.setup.zero_stage, "offload_optimizer": c.setup.offload_optimizer,
            "offload_param": c.setup.offload_param, "grad_checkpointing": c.setup.grad_checkpointing,
            "sp_size": c.setup.sp_size, "offload_activations": c.setup.offload_activations,
            "micro_batch": c.micro_batch, "grad_accum": c.grad_accum, "max_micro_batch": c.max_micro_batch,
            "fits": c.fits, "refused": c.refused or None,
            "memory_bytes": {"parameters": m.states.parameters, "gradients": m.states.gradients,
                             "fp32_masters": m.states.fp32_masters, "optimizer_states": m.states.optimizer_states,
                             "step_gradients": m.states.step_gradients, "zero3_gathered": m.states.gathered,
                             "experts": m.experts.on_gpu, "activations_layers": a.layers,
                             "activations_peak": a.peak, "loss_and_logits": a.loss, "buffers": m.buffers,
                             "fragmentation": m.fragmentation, "total": m.total, "usable": m.usable,
                             "host_per_gpu": m.states.host, "host_activations_per_gpu": a.host},
            "traffic_bytes": {"all_reduce": c.traffic.all_reduce, "reduce_scatter": c.traffic.reduce_scatter,
                              "all_gather": c.traffic.all_gather, "all_to_all": c.traffic.all_to_all,
                              "sequence_all_to_all": c.traffic.sequence_all_to_all},
            "sequence_all_to_all_seconds": c.traffic.sequence_seconds,
            "communication_seconds": c.traffic.seconds, "compute_seconds": c.compute_seconds,
            "tokens_per_second": c.tokens_per_second,
            "days": tokens / c.tokens_per_second / DAY if tokens else None,
        }

    counts = param_counts(setup.model)
    return {"model": setup.model.to_dict(), "parameters": counts.total, "seq_len": setup.seq_len,
            "precision": setup.precision, "sp_size": setup.sp_size, "nodes": setup.nodes, "gpus_per_node": setup.gpus_per_node,
            "device": vars(setup.device), "candidates": [candidate(c) for c in table],
            "recommendation": candidate(chosen) if chosen else None}
