"""Training code: the demo model's data, tokenizer and trainer (``train-demo``)."""
