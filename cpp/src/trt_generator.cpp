// TensorRT step runner: encoder plan once per request, decoder plan once per token, with the
// KV cache in device buffers that never leave the GPU.
//
// - The encoder's outputs (memory, cross_key.{i}, cross_value.{i}) are written to device
//   buffers that are bound as they are to the decoder's cross inputs; src_mask's device copy
//   serves both engines.
// - past/present ping-pong: two device buffers per cache tensor, each sized for
//   [batch, heads, tgt_len max, head_dim]. Step t binds set t%2 as past_* (past_len t) and set
//   (t+1)%2 as present_* (past_len t+1); a present tensor has other strides than its past, so
//   the cache cannot be appended in place.
// - Each optimization profile gets its own execution context (the decoder's recipe has a
//   first-step profile with past_len 0 and a step profile with past_len >= 1); every step picks
//   the first profile whose min/max hold the step's shapes.
// - Per-row decoder state: every row of this loop is at the same step, so positions [batch, 1]
//   hold past_len and past_mask [batch, past_len] is all ones (one device buffer of ones,
//   filled once per request, serves every step).
// - Per step the host sends [batch] token ids and [batch] positions and receives
//   [batch, vocab] logits; nothing else.
//
// libnvinfer is dlopen()ed as in trt_backend.cpp; config (profile, vocabulary, generation
// defaults) comes from manifest.json next to the plans (a plan keeps no metadata).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>

#include "hmu/error.hpp"
#include "hmu/generator.hpp"
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
    default: return "trt-type-" + std::to_string(static_cast<int>(t));
  }
}

size_t dtype_bytes(nv::DataType t) {
  switch (t) {
    case nv::DataType::kFLOAT: case nv::DataType::kINT32: return 4;
    case nv::DataType::kHALF: return 2;
    case nv::DataType::kINT64: return 8;
    default: throw Error("unsupported TensorRT tensor type " + dtype_name(t));
  }
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(man), -24);
  uint32_t bits = exp == 31 ? sign | 0x7f800000u | (man << 13)
                            : sign | ((exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) {
    other.ptr_ = nullptr;
    other.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  ~DeviceBuffer() { release(); }
  void reserve(size_t n) {
    if (n <= bytes_ && ptr_) return;
    release();
    cuda_check(cudaMalloc(&ptr_, n ? n : 1), "cudaMalloc");
    bytes_ = n;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class Stream {
 public:
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s_) cudaStreamDestroy(s_);
  }
  void create() { cuda_check(cudaStreamCreate(&s_), "cudaStreamCreate"); }
  cudaStream_t get() const { return s_; }
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

using Shapes = std::map<std::string, std::vector<int64_t>>;

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

nv::Dims to_dims(const std::vector<int64_t>& shape) {
  nv::Dims d{};
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
  return d;
}

std::vector<int64_t> from_dims(const nv::Dims& d) {
  return std::vector<int64_t>(d.d, d.d + d.nbDims);
}

// One deserialized plan with an execution context per optimization profile (made on demand).
struct Plan {
  std::string path;
  nv::ICudaEngine* engine = nullptr;
  std::vector<nv::IExecutionContext*> contexts;
  std::vector<std::string> inputs, outputs;

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    for (auto* c : contexts) delete c;
    delete engine;
  }
  bool has(const std::string& name) const {
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
      if (name == engine->getIOTensorName(i)) return true;
    return false;
  }
  nv::DataType type(const std::string& name) const { return engine->getTensorDataType(name.c_str()); }
  std::vector<int64_t> declared(const std::string& name) const {
    return from_dims(engine->getTensorShape(name.c_str()));
  }
};

class TrtStepRunner final : public StepRunner {
 public:
  TrtStepRunner(const std::string& encoder_path, const std::string& decoder_path) {
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
    stream_.create();
    load(encoder_path, &enc_);
    load(decoder_path, &dec_);
    read_config(decoder_path);
    describe();
  }

  ~TrtStepRunner() override {
    if (stream_.get()) cudaStreamSynchronize(stream_.get());
  }

  const GeneratorInfo& info() const override { return info_; }
  std::string name() const override { return "trt"; }

  void start(const Feeds& feeds) override {
    batch_ = feeds.at("src_ids").shape.at(0);
    src_len_ = feeds.at("src_ids").shape.at(1);
    Shapes shapes;
    for (const std::string& name : enc_.inputs) shapes[name] = feeds.at(name).shape;
    nv::IExecutionContext* ctx = context(enc_, shapes);
    for (const std::string& name : enc_.inputs) {
      const Array& arr = feeds.at(name);
      if (arr.dtype != dtype_name(enc_.type(name)))
        throw Error("encoder input '" + name + "' is " + arr.dtype + " but the plan takes " +
                    dtype_name(enc_.type(name)));
      DeviceBuffer& buf = buffers_[name];
      buf.reserve(arr.data.size());
      cuda_check(cudaMemcpyAsync(buf.get(), arr.data.data(), arr.data.size(),
                                 cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (input)");
      ctx->setTensorAddress(name.c_str(), buf.get());
    }
    for (const std::string& name : enc_.outputs) {  // memory too: every I/O must be bound
      const std::vector<int64_t> shape = from_dims(ctx->getTensorShape(name.c_str()));
      for (int64_t d : shape)
        if (d < 0) throw Error("TensorRT could not infer the shape of '" + name + "'");
      DeviceBuffer& buf = buffers_["enc:" + name];
      buf.reserve(static_cast<size_t>(numel(shape)) * dtype_bytes(enc_.type(name)));
      ctx->setTensorAddress(name.c_str(), buf.get());
    }
    if (!ctx->enqueueV3(stream_))
      throw Error("TensorRT enqueueV3 failed (encoder): " + logger_.last_error);

    // Cache: two sets (ping-pong) of one buffer per past_* input, for the longest generation.
    const size_t cache_bytes = static_cast<size_t>(batch_ * info_.cache.heads *
                                                   info_.tgt_len_max * info_.cache.head_dim) *
                               dtype_bytes(dec_.type(past_names_[0]));
    for (auto& set : cache_) {
      set.resize(past_names_.size());
      for (auto& buf : set) buf.reserve(cache_bytes);
    }
    buffers_["tgt_ids"].reserve(static_cast<size_t>(batch_) * sizeof(int64_t));
    buffers_["positions"].reserve(static_cast<size_t>(batch_) * sizeof(int64_t));
    ones_.assign(static_cast<size_t>(batch_ * info_.tgt_len_max), 1);
    buffers_["past_mask"].reserve(ones_.size() * sizeof(int64_t));
    cuda_check(cudaMemcpyAsync(buffers_["past_mask"].get(), ones_.data(),
                               ones_.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (past_mask)");
    buffers_["logits"].reserve(static_cast<size_t>(batch_ * info_.encoder.vocab_size) *
                               dtype_bytes(dec_.type("logits")));
    past_len_ = 0;
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (encoder)");
  }

  const float* step(const std::vector<int64_t>& tokens) override {
    if (past_len_ + 1 > info_.tgt_len_max)
      throw Error("decoder step past the profile's tgt_len max (" +
                  std::to_string(info_.tgt_len_max) + ")");
    const int64_t heads = info_.cache.heads, head_dim = info_.cache.head_dim;
    Shapes shapes{{"tgt_ids", {batch_, 1}}, {"src_mask", {batch_, src_len_}},
                  {"positions", {batch_, 1}}, {"past_mask", {batch_, past_len_}}};
    for (const std::string& name : cross_names_) shapes[name] = {batch_, heads, src_len_, head_dim};
    for (const std::string& name : past_names_) shapes[name] = {batch_, heads, past_len_, head_dim};
    nv::IExecutionContext* ctx = context(dec_, shapes);

    auto& past = cache_[past_len_ % 2];
    auto& present = cache_[(past_len_ + 1) % 2];
    cuda_check(cudaMemcpyAsync(buffers_["tgt_ids"].get(), tokens.data(),
                               tokens.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync (tokens)");
    ctx->setTensorAddress("tgt_ids", buffers_["tgt_ids"].get());
    positions_.assign(static_cast<size_t>(batch_), past_len_);
    cuda_check(cudaMemcpyAsync(buffers_["positions"].get(), positions_.data(),
                               positions_.size() * sizeof(int64_t), cudaMemcpyHostToDevice,
                               stream_), "cudaMemcpyAsync (positions)");
    ctx->setTensorAddress("positions", buffers_["positions"].get());
    ctx->setTensorAddress("past_mask", buffers_["past_mask"].get());
    ctx->setTensorAddress("src_mask", buffers_["src_mask"].get());
    for (const std::string& name : cross_names_)
      ctx->setTensorAddress(name.c_str(), buffers_["enc:" + name].get());
    for (size_t j = 0; j < past_names_.size(); ++j) {
      ctx->setTensorAddress(past_names_[j].c_str(), past[j].get());
      ctx->setTensorAddress(present_names_[j].c_str(), present[j].get());
    }
    ctx->setTensorAddress("logits", buffers_["logits"].get());
    const std::vector<int64_t> ls = from_dims(ctx->getTensorShape("logits"));
    const std::vector<int64_t> want{batch_, 1, info_.encoder.vocab_size};
    if (ls != want)
      throw Error("decoder plan gives logits " + shape_str(ls) + ", expected " + shape_str(want));
    const std::vector<int64_t> ps = from_dims(ctx->getTensorShape(present_names_[0].c_str()));
    const std::vector<int64_t> want_p{batch_, heads, past_len_ + 1, head_dim};
    if (ps != want_p)
      throw Error("decoder plan gives " + present_names_[0] + " " + shape_str(ps) +
                  ", expected " + shape_str(want_p));
    if (!ctx->enqueueV3(stream_))
      throw Error("TensorRT enqueueV3 failed (decoder): " + logger_.last_error);

    const size_t n = static_cast<size_t>(batch_ * info_.encoder.vocab_size);
    logits_.resize(n);
    if (dec_.type("logits") == nv::DataType::kHALF) {
      half_.resize(n);
      cuda_check(cudaMemcpyAsync(half_.data(), buffers_["logits"].get(), n * 2,
                                 cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (logits)");
      cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      for (size_t i = 0; i < n; ++i) logits_[i] = half_to_float(half_[i]);
    } else {
      cuda_check(cudaMemcpyAsync(logits_.data(), buffers_["logits"].get(), n * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (logits)");
      cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }
    ++past_len_;
    return logits_.data();
  }

 private:
  // Declaration order is teardown order reversed: buffers, then contexts and engines, then the
  // stream, then the runtime, then the logger it reports to.
  Logger logger_;
  void* lib_ = nullptr;  // stays loaded: TensorRT may still run static destructors at exit
  std::unique_ptr<nv::IRuntime> runtime_;
  Stream stream_;
  Plan enc_, dec_;
  GeneratorInfo info_;
  std::vector<std::string> cross_names_, past_names_, present_names_;
  std::map<std::string, DeviceBuffer> buffers_;
  std::vector<DeviceBuffer> cache_[2];
  std::vector<float> logits_;
  std::vector<uint16_t> half_;
  std::vector<int64_t> positions_, ones_;  // host copies (async uploads read them)
  int64_t batch_ = 0, src_len_ = 0, past_len_ = 0;

  void load(const std::string& path, Plan* plan) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error("cannot open " + path);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    plan->path = path;
    plan->engine = runtime_->deserializeCudaEngine(blob.data(), blob.size());
    if (!plan->engine)
      throw Error("TensorRT cannot deserialize " + path + ": " + logger_.last_error +
                  " (plans are tied to the TensorRT version and GPU that built them)");
    plan->contexts.assign(static_cast<size_t>(plan->engine->getNbOptimizationProfiles()), nullptr);
    for (int32_t i = 0; i < plan->engine->getNbIOTensors(); ++i) {
      const char* name = plan->engine->getIOTensorName(i);
      (plan->engine->getTensorIOMode(name) == nv::TensorIOMode::kINPUT ? plan->inputs
                                                                        : plan->outputs)
          .push_back(name);
    }
  }

  // The first profile whose [min, max] holds every input shape; its context, shapes set.
  nv::IExecutionContext* context(Plan& plan, const Shapes& shapes) {
    const int32_t n = plan.engine->getNbOptimizationProfiles();
    for (int32_t p = 0; p < n; ++p) {
      bool fits = true;
      for (const auto& [name, shape] : shapes) {
        const nv::Dims lo = plan.engine->getProfileShape(name.c_str(), p, nv::OptProfileSelector::kMIN);
        const nv::Dims hi = plan.engine->getProfileShape(name.c_str(), p, nv::OptProfileSelector::kMAX);
        if (lo.nbDims != static_cast<int32_t>(shape.size())) { fits = false; break; }
        for (int32_t k = 0; k < lo.nbDims && fits; ++k)
          fits = shape[k] >= lo.d[k] && shape[k] <= hi.d[k];
        if (!fits) break;
      }
      if (!fits) continue;
      nv::IExecutionContext*& ctx = plan.contexts[static_cast<size_t>(p)];
      if (!ctx) {
        ctx = plan.engine->createExecutionContext();
        if (!ctx) throw Error("TensorRT: cannot create an execution context for " + plan.path);
        if (ctx->getOptimizationProfile() != p && !ctx->setOptimizationProfileAsync(p, stream_))
          throw Error("TensorRT: cannot select optimization profile " + std::to_string(p) +
                      " of " + plan.path + ": " + logger_.last_error);
      }
      for (const auto& [name, shape] : shapes)
        if (!ctx->setInputShape(name.c_str(), to_dims(shape)))
          throw Error("TensorRT rejected the shape " + shape_str(shape) + " of input '" + name +
                      "': " + logger_.last_error);
      return ctx;
    }
    std::string desc;
    for (const auto& [name, shape] : shapes) desc += (desc.empty() ? "" : ", ") + name + " " + shape_str(shape);
    throw Error("no optimization profile of " + plan.path + " holds " + desc);
  }

  void read_config(const std::string& plan_path) {
    const size_t slash = plan_path.find_last_of('/');
    const std::string path =
        (slash == std::string::npos ? std::string(".") : plan_path.substr(0, slash)) +
        "/manifest.json";
    std::ifstream in(path);
    if (!in)
      throw Error("no manifest.json next to " + plan_path +
                  ": the TensorRT generator needs the build folder, not the plans alone");
    std::stringstream text;
    text << in.rdbuf();
    const Json manifest = Json::parse(text.str(), path);
    const Json* config = manifest.find("config");
    if (!config) throw Error(path + " has no 'config'");
    read_build_config(*config, path + " config", &info_);
  }

  void describe() {
    for (const char* name : {"src_ids", "src_mask", "noise"}) {
      if (!enc_.has(name))
        throw Error(enc_.path + " is not an hmu_export encoder plan: no input '" + name + "'");
      TensorSpec spec{name, dtype_name(enc_.type(name)), {}};
      const std::vector<int64_t> shape = enc_.declared(name);
      for (size_t k = 0; k < shape.size(); ++k) {
        Dim dim;
        if (shape[k] >= 0) dim.size = shape[k];
        else dim.name = k == 0 ? "batch" : k == 1 ? "src_len" : std::string(name) + ":" +
                                                                     std::to_string(k);
        spec.dims.push_back(dim);
      }
      info_.encoder.contract.inputs.push_back(spec);
    }
    for (const char* name : {"tgt_ids", "src_mask", "logits"})
      if (!dec_.has(name))
        throw Error(dec_.path + " is not an hmu_export decoder plan: no tensor '" + name + "'");
    require_row_state(dec_.path, [&](const char* n) { return dec_.has(n); });
    int64_t layers = 0;
    while (dec_.has("past_key." + std::to_string(layers))) ++layers;
    if (layers == 0) throw Error(dec_.path + " has no past_key.0 input: not a decoder-step plan");
    const std::vector<int64_t> first = dec_.declared("past_key.0");
    if (first.size() != 4 || first[1] < 1 || first[3] < 1)
      throw Error(dec_.path + ": past_key.0 must be [batch, heads, past_len, head_dim] with "
                  "fixed heads and head_dim, got " + shape_str(first));
    info_.cache = {layers, first[1], first[3]};
    for (int64_t i = 0; i < layers; ++i) {
      const std::string s = std::to_string(i);
      for (const std::string kind : {"key", "value"}) {
        const std::string past = "past_" + kind + "." + s, present = "present_" + kind + "." + s;
        const std::string cross = "cross_" + kind + "." + s;
        if (!dec_.has(past) || dec_.declared(past) != first || !dec_.has(present) ||
            dec_.type(past) != dec_.type(present))
          throw Error(dec_.path + ": '" + past + "' / '" + present + "' missing or unlike " +
                      "past_key.0 " + shape_str(first));
        if (!dec_.has(cross) || !enc_.has(cross) || enc_.type(cross) != dec_.type(cross))
          throw Error("'" + cross + "' is missing from the encoder or decoder plan, or their "
                      "types differ");
        past_names_.push_back(past);
        present_names_.push_back(present);
        cross_names_.push_back(cross);
      }
    }
    const nv::DataType lt = dec_.type("logits");
    if (lt != nv::DataType::kFLOAT && lt != nv::DataType::kHALF)
      throw Error(dec_.path + ": logits must be float32 or float16, got " + dtype_name(lt));
  }
};

}  // namespace

bool have_trt_step_runner() { return true; }

std::unique_ptr<StepRunner> make_trt_step_runner(const std::string& encoder_path,
                                                 const std::string& decoder_path) {
  return std::make_unique<TrtStepRunner>(encoder_path, decoder_path);
}

}  // namespace hmu
