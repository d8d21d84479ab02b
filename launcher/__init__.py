"""The `fleetlm` command: run one component, or the whole mesh on one machine (`fleetlm up`)."""
