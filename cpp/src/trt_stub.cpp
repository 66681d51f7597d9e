// Built when HMU_WITH_TENSORRT is OFF: the program still links and says how to get the backend.
#include "hmu/backend.hpp"
#include "hmu/error.hpp"

namespace hmu {

bool have_trt_backend() { return false; }

std::unique_ptr<Backend> make_trt_backend(const std::string&, const BackendOptions&) {
  throw Error("this hmu_infer was built without TensorRT (configure cpp/ with "
              "-DHMU_WITH_TENSORRT=ON and TensorRT + CUDA headers)");
}

}  // namespace hmu
