file(REMOVE_RECURSE
  "libhmu_core.a"
)
