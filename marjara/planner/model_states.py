"""Per-GPU bytes of parameters, gradients, fp32 masters and Adam states under ZeRO 0-3, with and
without CPU offload, following what DeepSpeed 0.19's optimizers allocate:

- 16-bit runs keep fp32 masters (4 B) and Adam's two moments (8 B) per parameter, and build an
  fp32 copy of the gradient for the step (4 B). ZeRO-0 (DeepSpeed's FP16_Optimizer) holds all of
  them whole; ZeRO-1 partitions masters, moments and the step gradient; ZeRO-2 also the 16-bit
  gradients; ZeRO-3 also the 16-bit parameters, and builds the fp32 step gradient one sub-group
  (`sub_group_size`) at a time.
- fp32 runs have no 16-bit copy: ZeRO-1/2 still clone their fp32 partition as the optimizer's
  master; ZeRO-3 uses the partition itself (marjara/train/engine.py), ZeRO-0 the parameters.
- ZeRO-3 keeps parameters smaller than `stage3_param_persistence_threshold` whole on every rank
  (besides their partition), and gathers the others when used: the largest layer's parameters and
  gradients, in 16 bits, are the least that must fit at once (DeepSpeed's estimator counts the same).
- Offloading the optimizer moves masters and moments to host memory, and the step gradient: under
  ZeRO 2/3 the gradient partitions themselves, kept there in fp32; offloading parameters (ZeRO-3) moves the 16-bit
  partitions there too.
- Experts are replicated over world / ep_size ranks (the expert-data-parallel group), each rank
  holding num_experts / ep_size of them; ZeRO partitions them over that group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from marjara.planner.setup import Setup
from marjara.planner.shapes import param_counts, parameter_numels


@dataclass
class ModelStates:
    parameters: float = 0.0
    gradients: float = 0.0
    fp32_masters: float = 0.0
    optimizer_states: float = 0.0
    step_gradients: float = 0.0       # the fp32 gradient built for the optimizer step
    gathered: float = 0.0             # ZeRO-3: the largest layer's gathered parameters and gradients
    host: float = 0.0                 # offloaded to CPU memory, per GPU

    def __add__(self, other: "ModelStates") -> "ModelStates":
        return ModelStates(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def on_gpu(self) -> float:
        return (self.parameters + self.gradients + self.fp32_masters + self.optimizer_states + self.step_gradients
                + self.gathered)

    @property
    def held(self) -> float:
        """Parameters, masters and moments on the GPU: what stays between steps whatever the batch."""
        return self.parameters + self.fp32_masters + self.optimizer_states


def shard_states(setup: Setup, numel: float, replicas: int, persistent: float = 0.0) -> ModelStates:
    """States of `numel` parameters that one replica holds, ZeRO-partitioned over `replicas` ranks;
    `persistent` of them are ZeRO-3 parameters kept whole on every rank."""
    s, stage, n = setup.bytes_per_value, setup.zero_stage, replicas
    half = s == 2
    share = numel / n
    st = ModelStates()
    if stage == 0:
        st.parameters, st.gradients, st.optimizer_states = s * numel, s * numel, 8 * numel
        st.fp32_masters = st.step_gradients = 4 * numel if half else 0.0
        return st
    # A persistent parameter is gathered whole beside its partition (which is all of it on one rank).
    st.parameters = s * numel if stage < 3 else s * (share + (persistent if n > 1 else 0.0))
    st.gradients = s * numel if stage == 1 else s * share
    st.fp32_masters = 0.0 if (stage == 3 and not half) else 4 * share
    st.optimizer_states = 8 * share
    if half:
        st.step_gradients = 4 * (min(share, setup.zero["sub_group_size"]) if stage == 3 else share)
    if setup.offload_optimizer:
        moved = st.fp32_masters + st.optimizer_states
        if stage >= 2:  # the gradient partition lives on the host in fp32 and is the step's gradient
            moved += 4 * share
            st.gradients = 0.0
        else:
            moved += st.step_gradients
        st.fp32_masters = st.optimizer_states = st.step_gradients = 0.0
        st.host += moved
    if setup.offload_param and stage == 3:
        st.host += s * share
        st.parameters = s * persistent
    return st


def persistent_numels(setup: Setup) -> tuple[int, float]:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (those under
    stage3_param_persistence_threshold): non-expert ones, and this rank's share of the experts'."""
    threshold = setup.zero["stage3_param_persistence_threshold"]
    numels = parameter_numels(setup.model)
    dense = sum(n for n, expert in numels if not expert and n < threshold)
    return dense, sum(n for n, expert in numels if expert and n < threshold) / setup.ep_size


def model_states(setup: Setup) -> ModelStates:
    """This GPU's model states: non-expert parameters over all ranks, experts over world / ep_size."""
    counts = param_counts(setup.model)
    persistent_dense, persistent_expert = persistent_numels(setup)
    states = shard_states(setup, counts.non_expert, setup.world, persistent_dense)
    if counts.expert:
        states = states + shard_states(setup, counts.expert / setup.ep_size, setup.world // setup.ep_size,
                                       persistent_expert)
    if setup.zero_stage == 3:
        states.gathered = 2 * setup.bytes_per_value * counts.largest_layer
    return states


def expert_states(setup: Setup) -> ModelStates:
    """The experts' part of model_states (for the breakdown)."""
    counts = param_counts(setup.model)
    if not counts.expert:
        return ModelStates()
    return shard_states(setup, counts.expert / setup.ep_size, setup.world // setup.ep_size, persistent_numels(setup)[1])
