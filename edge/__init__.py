"""fleetlm's edge: the OpenAI-compatible HTTP API and the gRPC InferenceService, in front of the fleet."""
