"""The build's stages, one module each: every module declares ``STAGE`` (build.context.Stage);
build.pipeline.PIPELINE orders them."""
