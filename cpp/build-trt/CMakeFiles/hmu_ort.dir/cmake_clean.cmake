file(REMOVE_RECURSE
  "CMakeFiles/hmu_ort.dir/src/ort_backend.cpp.o"
  "CMakeFiles/hmu_ort.dir/src/ort_backend.cpp.o.d"
  "libhmu_ort.a"
  "libhmu_ort.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/hmu_ort.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
