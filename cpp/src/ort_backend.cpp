// ONNX Runtime backend: the graph itself is the contract (names, element types, symbolic dims);
// the shape profile and vocabulary come from the graph's "hmu_export.config" metadata, or from
// manifest.json next to the graph when the metadata is absent.
#include <onnxruntime_cxx_api.h>

#include <cstring>
#include <map>

#include "hmu/backend.hpp"
#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {
namespace {

std::string dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "onnx-type-" + std::to_string(static_cast<int>(t));
  }
}

ONNXTensorElementDataType onnx_type(const std::string& dtype) {
  static const std::map<std::string, ONNXTensorElementDataType> table = {
      {"float32", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {"float64", ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
      {"float16", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16},
      {"int64", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64},
      {"int32", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32},
      {"int16", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16},
      {"int8", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8},
      {"uint8", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
      {"bool", ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL}};
  auto it = table.find(dtype);
  if (it == table.end()) throw Error("ONNX Runtime backend cannot feed dtype " + dtype);
  return it->second;
}

TensorSpec spec_of(const std::string& name, const Ort::TypeInfo& type) {
  auto info = type.GetTensorTypeAndShapeInfo();
  TensorSpec spec{name, dtype_name(info.GetElementType()), {}};
  const std::vector<int64_t> shape = info.GetShape();
  std::vector<const char*> symbolic(shape.size(), nullptr);
  info.GetSymbolicDimensions(symbolic.data(), symbolic.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    Dim d;
    if (shape[i] >= 0) {
      d.size = shape[i];
    } else {
      // An unnamed dynamic axis binds nothing across inputs: give it a name of its own.
      d.name = symbolic[i] && *symbolic[i] ? symbolic[i] : name + ":" + std::to_string(i);
    }
    spec.dims.push_back(d);
  }
  return spec;
}

class OrtBackend final : public Backend {
 public:
  OrtBackend(const std::string& path, const BackendOptions& opts)
      : env_(ORT_LOGGING_LEVEL_FATAL, "hmu_infer") {
    Ort::SessionOptions so;
    so.SetLogSeverityLevel(4);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    if (opts.threads > 0) {
      so.SetIntraOpNumThreads(opts.threads);
      so.SetInterOpNumThreads(1);
    }
    try {
      session_ = std::make_unique<Ort::Session>(env_, path.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime cannot load " + path + ": " + first_line(e.what()));
    }
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < session_->GetInputCount(); ++i) {
      std::string name = session_->GetInputNameAllocated(i, alloc).get();
      info_.contract.inputs.push_back(spec_of(name, session_->GetInputTypeInfo(i)));
    }
    for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
      std::string name = session_->GetOutputNameAllocated(i, alloc).get();
      info_.contract.outputs.push_back(spec_of(name, session_->GetOutputTypeInfo(i)));
    }
    load_profile(path, alloc);
  }

  const ModelInfo& info() const override { return info_; }
  std::string name() const override { return "ort"; }

 protected:
  Feeds run(const Feeds& feeds) override {
    Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<const char*> in_names, out_names;
    std::vector<Ort::Value> values;
    for (const auto& spec : info_.contract.inputs) {
      const Array& arr = feeds.at(spec.name);
      in_names.push_back(spec.name.c_str());
      // ORT reads the caller's buffer in place (no copy); it never writes to an input.
      values.push_back(Ort::Value::CreateTensor(
          mem, const_cast<uint8_t*>(arr.data.data()), arr.data.size(), arr.shape.data(),
          arr.shape.size(), onnx_type(arr.dtype)));
    }
    for (const auto& spec : info_.contract.outputs) out_names.push_back(spec.name.c_str());
    std::vector<Ort::Value> outs;
    try {
      outs = session_->Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(),
                           values.size(), out_names.data(), out_names.size());
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime failed: " + first_line(e.what()));
    }
    Feeds result;
    for (size_t i = 0; i < outs.size(); ++i) {
      auto info = outs[i].GetTensorTypeAndShapeInfo();
      Array arr;
      arr.dtype = dtype_name(info.GetElementType());
      arr.shape = info.GetShape();
      arr.data.resize(static_cast<size_t>(arr.numel()) * arr.itemsize());
      if (!arr.data.empty())
        std::memcpy(arr.data.data(), outs[i].GetTensorRawData(), arr.data.size());
      result[info_.contract.outputs[i].name] = std::move(arr);
    }
    return result;
  }

 private:
  Ort::Env env_;
  std::unique_ptr<Ort::Session> session_;
  ModelInfo info_;

  void load_profile(const std::string& path, Ort::AllocatorWithDefaultOptions& alloc) {
    Ort::ModelMetadata meta = session_->GetModelMetadata();
    Ort::AllocatedStringPtr config = meta.LookupCustomMetadataMapAllocated("hmu_export.config",
                                                                           alloc);
    if (config) {
      const std::string where = path + " metadata hmu_export.config";
      Json cfg = Json::parse(config.get(), where);
      info_.profiles = profiles_from_config(cfg, where);
      info_.vocab_size = vocab_from_config(cfg, where);
      return;
    }
    std::unique_ptr<Json> manifest = read_manifest_near(path);
    const Json* cfg = manifest ? manifest->find("config") : nullptr;
    if (!cfg)
      throw Error(path + " has no hmu_export.config metadata and no manifest.json with a "
                  "'config' lies next to it: cannot tell its shape profile");
    info_.profiles = profiles_from_config(*cfg, "manifest.json config");
    info_.vocab_size = vocab_from_config(*cfg, "manifest.json config");
  }
};

}  // namespace

std::unique_ptr<Backend> make_ort_backend(const std::string& model_path,
                                          const BackendOptions& opts) {
  return std::make_unique<OrtBackend>(model_path, opts);
}

}  // namespace hmu
