// A backend runs one exported graph: validated feeds in, outputs by contract name out.
#pragma once
#include <memory>
#include <string>

#include "hmu/contract.hpp"

namespace hmu {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const ModelInfo& info() const = 0;
  // Validates the feeds against info() first (unless check is false), then runs.
  Feeds infer(const Feeds& feeds, bool check = true);
  virtual std::string name() const = 0;

 protected:
  virtual Feeds run(const Feeds& feeds) = 0;
};

struct BackendOptions {
  int threads = 0;  // 0 = the runtime's default
};

// ONNX Runtime (CPU): contract from the graph, profile from its metadata or manifest.json.
std::unique_ptr<Backend> make_ort_backend(const std::string& model_path,
                                          const BackendOptions& opts);
// TensorRT: contract and profiles from the engine, axis names + vocab from manifest.json.
// Throws hmu::Error when the program was built without TensorRT.
std::unique_ptr<Backend> make_trt_backend(const std::string& plan_path,
                                          const BackendOptions& opts);
bool have_trt_backend();

// manifest.json in the folder of `model_path`, parsed; nullptr when absent.
std::unique_ptr<class Json> read_manifest_near(const std::string& model_path);

}  // namespace hmu
