"""fleetlm's control plane: node registry, placement and the operators' AdminService, state in etcd."""
