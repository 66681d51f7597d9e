# Empty dependencies file for hmu_core.
# This may be replaced when dependencies are built.
