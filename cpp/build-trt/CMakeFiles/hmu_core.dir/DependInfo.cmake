
# Consider dependencies only in project.
set(CMAKE_DEPENDS_IN_PROJECT_ONLY OFF)

# The set of languages for which implicit dependencies are needed:
set(CMAKE_DEPENDS_LANGUAGES
  )

# The set of dependency files which are needed:
set(CMAKE_DEPENDS_DEPENDENCY_FILES
  "/work/main/cpp/src/backend.cpp" "CMakeFiles/hmu_core.dir/src/backend.cpp.o" "gcc" "CMakeFiles/hmu_core.dir/src/backend.cpp.o.d"
  "/work/main/cpp/src/contract.cpp" "CMakeFiles/hmu_core.dir/src/contract.cpp.o" "gcc" "CMakeFiles/hmu_core.dir/src/contract.cpp.o.d"
  "/work/main/cpp/src/json.cpp" "CMakeFiles/hmu_core.dir/src/json.cpp.o" "gcc" "CMakeFiles/hmu_core.dir/src/json.cpp.o.d"
  "/work/main/cpp/src/npy.cpp" "CMakeFiles/hmu_core.dir/src/npy.cpp.o" "gcc" "CMakeFiles/hmu_core.dir/src/npy.cpp.o.d"
  )

# Targets to which this target links.
set(CMAKE_TARGET_LINKED_INFO_FILES
  )

# Fortran module output directory.
set(CMAKE_Fortran_TARGET_MODULE_DIR "")
