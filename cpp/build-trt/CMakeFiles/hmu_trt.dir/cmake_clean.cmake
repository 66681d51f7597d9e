file(REMOVE_RECURSE
  "CMakeFiles/hmu_trt.dir/src/trt_backend.cpp.o"
  "CMakeFiles/hmu_trt.dir/src/trt_backend.cpp.o.d"
  "libhmu_trt.a"
  "libhmu_trt.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/hmu_trt.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
