"""Plumbing shared by fleetlm's services: the error vocabulary, gRPC server bootstrap, logging."""
