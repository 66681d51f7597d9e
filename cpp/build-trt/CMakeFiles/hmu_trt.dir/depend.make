# Empty dependencies file for hmu_trt.
# This may be replaced when dependencies are built.
