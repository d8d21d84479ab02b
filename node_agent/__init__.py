"""fleetlm's node agent: inventory, model engines and the InferenceService of one machine."""
