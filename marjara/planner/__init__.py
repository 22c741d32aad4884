"""The scale planner: per-GPU memory, communication and time of a run before it is booked
(`python -m marjara.plan`). Everything here is arithmetic on the model's shapes and the cluster's
figures; nothing builds a model or starts a process group."""
