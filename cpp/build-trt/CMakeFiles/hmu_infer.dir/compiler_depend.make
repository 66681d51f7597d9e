# Empty compiler generated dependencies file for hmu_infer.
# This may be replaced when dependencies are built.
