file(REMOVE_RECURSE
  "libhmu_ort.a"
)
