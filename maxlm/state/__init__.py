"""What is trained: optimizer, frozen state entries, parameter views (LoRA), the state layout, the jitted steps and
the memory plan. Knows nothing of checkpoints on disk."""
