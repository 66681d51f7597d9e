// TensorRT backend: deserialize a plan, pick the tightest optimization profile that holds the
// feed's shape (as Python's select_profile does), set input shapes, enqueueV3 on a CUDA stream,
// copy the outputs back. Every TensorRT object, the stream and each device buffer has one RAII
// owner, so a constructor that throws half-way (e.g. load_contract) leaks nothing.
//
// libnvinfer is opened at run time (dlopen) rather than linked: one hmu_infer binary then runs
// the ONNX Runtime backend on hosts without TensorRT, and the program links against headers
// alone (only libcudart is linked). Names, dtypes, ranks and profiles come from the engine;
// the names of the dynamic axes (which a plan does not keep) and the vocabulary size come from
// the manifest.json that `build` writes next to the plan.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <type_traits>
#include <utility>

#include "hmu/backend.hpp"
#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {
namespace {

namespace nv = nvinfer1;

class Logger final : public nv::ILogger {
 public:
  std::string last_error;
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error = msg ? first_line(msg) : "";
  }
};

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(std::string("CUDA ") + what + " failed: " + cudaGetErrorString(status));
}

std::string dtype_name(nv::DataType t) {
  switch (t) {
    case nv::DataType::kFLOAT: return "float32";
    case nv::DataType::kHALF: return "float16";
    case nv::DataType::kINT64: return "int64";
    case nv::DataType::kINT32: return "int32";
    case nv::DataType::kINT8: return "int8";
    case nv::DataType::kUINT8: return "uint8";
    case nv::DataType::kBOOL: return "bool";
    default: return "trt-type-" + std::to_string(static_cast<int>(t));
  }
}

// Owns one cudaMalloc'ed block: movable, not copyable (a copy would free the block twice).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : ptr(std::exchange(other.ptr, nullptr)), bytes(std::exchange(other.bytes, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      ptr = std::exchange(other.ptr, nullptr);
      bytes = std::exchange(other.bytes, 0);
    }
    return *this;
  }
  void reserve(size_t n) {
    if (n <= bytes) return;
    release();
    cuda_check(cudaMalloc(&ptr, n ? n : 1), "cudaMalloc");
    bytes = n;
  }
  void release() {
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
  }
  ~DeviceBuffer() { release(); }
};
static_assert(!std::is_copy_constructible_v<DeviceBuffer> && !std::is_copy_assignable_v<DeviceBuffer>);
static_assert(std::is_nothrow_move_constructible_v<DeviceBuffer> &&
              std::is_nothrow_move_assignable_v<DeviceBuffer>);

struct StreamDeleter {
  void operator()(cudaStream_t stream) const noexcept {
    if (stream) cudaStreamDestroy(stream);
  }
};
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;

class TrtBackend final : public Backend {
 public:
  TrtBackend(const std::string& path, const BackendOptions&) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("cannot open " + path);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

    const char* env_lib = std::getenv("HMU_NVINFER_LIB");
    const std::string lib = env_lib && *env_lib
                                ? env_lib
                                : "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
    lib_ = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib_)
      throw Error("TensorRT runtime not found: cannot load " + lib + " (" +
                  first_line(dlerror()) + "); install TensorRT " +
                  std::to_string(NV_TENSORRT_MAJOR) + " or set HMU_NVINFER_LIB");
    using CreateFn = void* (*)(void*, int32_t);
    auto create = reinterpret_cast<CreateFn>(dlsym(lib_, "createInferRuntime_INTERNAL"));
    if (!create) throw Error(lib + " has no createInferRuntime_INTERNAL: not a TensorRT library");
    runtime_.reset(static_cast<nv::IRuntime*>(create(&logger_, NV_TENSORRT_VERSION)));
    if (!runtime_) throw Error("TensorRT: createInferRuntime failed: " + logger_.last_error);
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw Error("TensorRT cannot deserialize " + path + ": " + logger_.last_error +
                  " (plans are tied to the TensorRT version and GPU that built them)");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error("TensorRT: cannot create an execution context");
    cudaStream_t stream = nullptr;
    cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
    stream_.reset(stream);
    load_contract(path);  // may throw: the owners above release what was made so far
  }

  // Members are destroyed in reverse order: buffers, stream, context, engine, runtime.
  // lib_ stays loaded: TensorRT may still run static destructors at exit.
  ~TrtBackend() override = default;

  const ModelInfo& info() const override { return info_; }
  std::string name() const override { return "trt"; }

 protected:
  Feeds run(const Feeds& feeds) override {
    const int profile = pick_profile(info_.profiles, info_.contract, feeds);
    if (profile != context_->getOptimizationProfile() &&
        !context_->setOptimizationProfileAsync(profile, stream_.get()))
      throw Error("TensorRT: cannot select optimization profile " + std::to_string(profile) +
                  ": " + logger_.last_error);
    for (const auto& spec : info_.contract.inputs) {
      const Array& arr = feeds.at(spec.name);
      nv::Dims dims{};
      dims.nbDims = static_cast<int32_t>(arr.shape.size());
      for (size_t i = 0; i < arr.shape.size(); ++i) dims.d[i] = arr.shape[i];
      if (!context_->setInputShape(spec.name.c_str(), dims))
        throw Error("TensorRT rejected the shape " + shape_str(arr.shape) + " of input '" +
                    spec.name + "': " + logger_.last_error);
      DeviceBuffer& buf = buffers_[spec.name];
      buf.reserve(arr.data.size());
      cuda_check(cudaMemcpyAsync(buf.ptr, arr.data.data(), arr.data.size(),
                                 cudaMemcpyHostToDevice, stream_.get()),
                 "cudaMemcpyAsync (input)");
      context_->setTensorAddress(spec.name.c_str(), buf.ptr);
    }
    Feeds result;
    for (const auto& spec : info_.contract.outputs) {
      const nv::Dims dims = context_->getTensorShape(spec.name.c_str());
      Array arr;
      arr.dtype = spec.dtype;
      for (int32_t i = 0; i < dims.nbDims; ++i) {
        if (dims.d[i] < 0) throw Error("TensorRT could not infer the shape of '" + spec.name + "'");
        arr.shape.push_back(dims.d[i]);
      }
      arr.data.resize(static_cast<size_t>(arr.numel()) * arr.itemsize());
      DeviceBuffer& buf = buffers_[spec.name];
      buf.reserve(arr.data.size());
      context_->setTensorAddress(spec.name.c_str(), buf.ptr);
      result[spec.name] = std::move(arr);
    }
    if (!context_->enqueueV3(stream_.get()))
      throw Error("TensorRT enqueueV3 failed: " + logger_.last_error);
    for (auto& [name, arr] : result)
      cuda_check(cudaMemcpyAsync(arr.data.data(), buffers_[name].ptr, arr.data.size(),
                                 cudaMemcpyDeviceToHost, stream_.get()),
                 "cudaMemcpyAsync (output)");
    cuda_check(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
    return result;
  }

 private:
  // Declaration order is destruction order reversed: the logger outlives the runtime, the
  // runtime the engine, the engine its context; device buffers go before the stream.
  Logger logger_;
  void* lib_ = nullptr;
  std::unique_ptr<nv::IRuntime> runtime_;
  std::unique_ptr<nv::ICudaEngine> engine_;
  std::unique_ptr<nv::IExecutionContext> context_;
  StreamPtr stream_;
  std::map<std::string, DeviceBuffer> buffers_;
  ModelInfo info_;

  // Axis names from manifest.json's contract, checked against the engine's own I/O.
  void load_contract(const std::string& path) {
    std::unique_ptr<Json> manifest = read_manifest_near(path);
    const Json* contract = manifest ? manifest->find("contract") : nullptr;
    const Json* config = manifest ? manifest->find("config") : nullptr;
    if (!contract || !config)
      throw Error("no manifest.json with 'contract' and 'config' next to " + path +
                  ": the TensorRT backend needs the build folder, not the plan alone");
    info_.vocab_size = vocab_from_config(*config, "manifest.json config");
    std::map<std::string, std::vector<std::string>> axis_names;
    for (const char* group : {"inputs", "outputs"}) {
      const Json* list = contract->find(group);
      if (!list || !list->is_array()) throw Error("manifest.json contract has no '" +
                                                  std::string(group) + "' list");
      for (const Json& t : list->array) {
        const Json* name = t.find("name");
        const Json* dims = t.find("dims");
        if (!name || !name->is_string() || !dims || !dims->is_array())
          throw Error("manifest.json contract: each tensor needs 'name' and 'dims'");
        auto& names = axis_names[name->string];
        for (const Json& d : dims->array) names.push_back(d.is_string() ? d.string : "");
      }
    }
    const int32_t n = engine_->getNbIOTensors();
    for (int32_t i = 0; i < n; ++i) {
      const char* name = engine_->getIOTensorName(i);
      const bool input = engine_->getTensorIOMode(name) == nv::TensorIOMode::kINPUT;
      TensorSpec spec{name, dtype_name(engine_->getTensorDataType(name)), {}};
      const nv::Dims shape = engine_->getTensorShape(name);
      auto it = axis_names.find(name);
      if (it == axis_names.end())
        throw Error(path + " has tensor '" + spec.name + "' that manifest.json's contract lacks");
      if (static_cast<size_t>(shape.nbDims) != it->second.size())
        throw Error(path + ": '" + spec.name + "' has rank " + std::to_string(shape.nbDims) +
                    " in the engine but " + std::to_string(it->second.size()) +
                    " in manifest.json's contract");
      for (int32_t k = 0; k < shape.nbDims; ++k) {
        Dim d;
        if (shape.d[k] >= 0) d.size = shape.d[k];
        else d.name = it->second[k].empty() ? spec.name + ":" + std::to_string(k) : it->second[k];
        spec.dims.push_back(d);
      }
      (input ? info_.contract.inputs : info_.contract.outputs).push_back(spec);
    }
    // One Profile per engine optimization profile: each named axis's [min, opt, max].
    for (int32_t p = 0; p < engine_->getNbOptimizationProfiles(); ++p) {
      Profile prof;
      for (const auto& spec : info_.contract.inputs) {
        const char* name = spec.name.c_str();
        const nv::Dims lo = engine_->getProfileShape(name, p, nv::OptProfileSelector::kMIN);
        const nv::Dims opt = engine_->getProfileShape(name, p, nv::OptProfileSelector::kOPT);
        const nv::Dims hi = engine_->getProfileShape(name, p, nv::OptProfileSelector::kMAX);
        for (size_t k = 0; k < spec.dims.size() && static_cast<int32_t>(k) < lo.nbDims; ++k) {
          if (!spec.dims[k].dynamic()) continue;
          auto [slot, fresh] = prof.axes.try_emplace(spec.dims[k].name,
                                                     std::array<int64_t, 3>{lo.d[k], opt.d[k],
                                                                            hi.d[k]});
          if (!fresh) {  // several inputs share an axis: the profile allows the intersection
            slot->second[0] = std::max<int64_t>(slot->second[0], lo.d[k]);
            slot->second[2] = std::min<int64_t>(slot->second[2], hi.d[k]);
          }
        }
      }
      info_.profiles.push_back(prof);
    }
  }
};

}  // namespace

bool have_trt_backend() { return true; }

std::unique_ptr<Backend> make_trt_backend(const std::string& plan_path,
                                          const BackendOptions& opts) {
  return std::make_unique<TrtBackend>(plan_path, opts);
}

}  // namespace hmu
