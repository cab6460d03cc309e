"""Watching and steering a long run, each piece on its own and hooked into the trainer by a line or two:
loss-spike skipping (spikes), expert-health alarms (health), routing record and replay (routing_record),
Weights & Biases (wandb_logger), profiler traces (profiler)."""
