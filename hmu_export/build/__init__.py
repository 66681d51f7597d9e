"""Floor 4: the build pipeline (stages in one ordered tuple), its staging folder and context."""
