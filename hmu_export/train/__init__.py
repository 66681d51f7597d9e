"""Floor 5: training: HMU-only fine-tuning, and the demo model's data, tokenizer and trainer
(``train-demo``)."""
