"""What runs the system: the local stack, the release step, the ``lookalike`` CLI, the sample catalog."""
