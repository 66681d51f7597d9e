file(REMOVE_RECURSE
  "CMakeFiles/hmu_core.dir/src/backend.cpp.o"
  "CMakeFiles/hmu_core.dir/src/backend.cpp.o.d"
  "CMakeFiles/hmu_core.dir/src/contract.cpp.o"
  "CMakeFiles/hmu_core.dir/src/contract.cpp.o.d"
  "CMakeFiles/hmu_core.dir/src/json.cpp.o"
  "CMakeFiles/hmu_core.dir/src/json.cpp.o.d"
  "CMakeFiles/hmu_core.dir/src/npy.cpp.o"
  "CMakeFiles/hmu_core.dir/src/npy.cpp.o.d"
  "libhmu_core.a"
  "libhmu_core.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/hmu_core.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
