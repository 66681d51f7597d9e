file(REMOVE_RECURSE
  "libhmu_trt.a"
)
