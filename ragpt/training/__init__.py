"""Prompt tuning: training examples, the loop, chunked attention, the training job, the LoRA reference."""
