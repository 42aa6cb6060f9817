"""The pipeline library: pure logic (allocation, GRPO, rewards, status) and adapters."""
