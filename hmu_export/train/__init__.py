"""Floor 5: training: HMU-only fine-tuning."""
