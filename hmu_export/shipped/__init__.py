"""Floor 0: files copied verbatim into a Triton model repository; they import nothing from hmu_export."""
