file(REMOVE_RECURSE
  "CMakeFiles/hmu_infer.dir/src/main.cpp.o"
  "CMakeFiles/hmu_infer.dir/src/main.cpp.o.d"
  "hmu_infer"
  "hmu_infer.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/hmu_infer.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
