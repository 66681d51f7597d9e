# Empty compiler generated dependencies file for hmu_ort.
# This may be replaced when dependencies are built.
