"""Multi-node launch support: hostfile parsing and the pre-flight checks."""
