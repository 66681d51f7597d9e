// hmu_generate built without TensorRT: --backend trt says how to enable it.
#include "hmu/error.hpp"
#include "hmu/generator.hpp"

namespace hmu {

bool have_trt_step_runner() { return false; }

std::unique_ptr<StepRunner> make_trt_step_runner(const std::string&, const std::string&) {
  throw Error("this hmu_generate was built without TensorRT: rebuild with "
              "-DHMU_WITH_TENSORRT=ON (see docs/cpp.md)");
}

}  // namespace hmu
