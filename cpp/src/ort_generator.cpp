// ONNX Runtime step runner: the encoder once, then decoder steps through one Ort::IoBinding.
//
// The KV cache never leaves ONNX Runtime's memory: every present_* output is bound to the
// session's CPU allocator (ORT allocates it at its final shape), and the resulting Ort::Value
// is bound as the next step's past_* input as it is. The encoder's cross K/V and the source
// mask are bound once per request. The only host traffic per step is the [batch, 1] token
// tensor and the per-row state (positions [batch, 1], past_mask [batch, past_len]: every row
// of this loop is at the same step, so positions = past_len and the mask is all ones) in, and
// the logits the greedy loop reads in place. Finished rows leave the batch (select): the
// cross K/V, the source mask and the cache are copied down to the rows still generating.
#include <onnxruntime_cxx_api.h>

#include <cstring>
#include <map>

#include "hmu/error.hpp"
#include "hmu/generator.hpp"
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
    default: return "onnx-type-" + std::to_string(static_cast<int>(t));
  }
}

// Declared type and dims of one graph input/output (-1 = dynamic).
struct Declared {
  std::string dtype;
  std::vector<int64_t> shape;
};

Declared declared(const Ort::TypeInfo& type) {
  auto info = type.GetTensorTypeAndShapeInfo();
  return {dtype_name(info.GetElementType()), info.GetShape()};
}

std::string key_name(const char* kind, int64_t i) { return kind + std::string(".") + std::to_string(i); }

class OrtStepRunner final : public StepRunner {
 public:
  OrtStepRunner(const std::string& encoder_path, const std::string& decoder_path, int threads)
      : env_(ORT_LOGGING_LEVEL_FATAL, "hmu_generate"),
        cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    Ort::SessionOptions so;
    so.SetLogSeverityLevel(4);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    if (threads > 0) {
      so.SetIntraOpNumThreads(threads);
      so.SetInterOpNumThreads(1);
    }
    encoder_ = load(encoder_path, so);
    decoder_ = load(decoder_path, so);
    enc_inputs_ = io(*encoder_, true);
    enc_outputs_ = io(*encoder_, false);
    dec_inputs_ = io(*decoder_, true);
    dec_outputs_ = io(*decoder_, false);
    read_config(encoder_path);
    describe_encoder(encoder_path);
    describe_decoder(decoder_path);
    binding_ = std::make_unique<Ort::IoBinding>(*decoder_);
  }

  const GeneratorInfo& info() const override { return info_; }
  std::string name() const override { return "ort"; }

  void start(const Feeds& feeds) override {
    const Array& ids = feeds.at("src_ids");
    batch_ = ids.shape.at(0);
    mask_ = feeds.at("src_mask");  // owned: bound to the decoder for the whole request
    Ort::IoBinding enc(*encoder_);
    for (const auto& [name, decl] : enc_inputs_) {
      const Array& arr = name == "src_mask" ? mask_ : feeds.at(name);
      enc.BindInput(name.c_str(), tensor(arr));
    }
    for (const std::string& name : cross_names_) enc.BindOutput(name.c_str(), cpu_);
    run(*encoder_, enc, "encoder");
    std::vector<Ort::Value> cross = enc.GetOutputValues();

    binding_->ClearBoundInputs();
    binding_->ClearBoundOutputs();
    cross_ = std::move(cross);
    for (size_t i = 0; i < cross_names_.size(); ++i)
      binding_->BindInput(cross_names_[i].c_str(), cross_[i]);
    binding_->BindInput("src_mask", tensor(mask_));
    // past_len 0: an empty [batch, heads, 0, head_dim] tensor per cache input.
    past_.clear();
    const std::vector<int64_t> empty{batch_, info_.cache.heads, 0, info_.cache.head_dim};
    for (size_t j = 0; j < past_names_.size(); ++j)
      past_.push_back(Ort::Value::CreateTensor<float>(cpu_, &empty_slot_, 0, empty.data(),
                                                      empty.size()));
    tokens_.assign(static_cast<size_t>(batch_), 0);
    past_len_ = 0;
  }

  const float* step(const std::vector<int64_t>& tokens) override {
    tokens_ = tokens;
    const std::vector<int64_t> shape{batch_, 1};
    Ort::Value tgt = Ort::Value::CreateTensor<int64_t>(cpu_, tokens_.data(), tokens_.size(),
                                                        shape.data(), shape.size());
    binding_->BindInput("tgt_ids", tgt);  // replaces last step's binding of the same name
    positions_.assign(static_cast<size_t>(batch_), past_len_);
    Ort::Value pos = Ort::Value::CreateTensor<int64_t>(cpu_, positions_.data(), positions_.size(),
                                                        shape.data(), shape.size());
    binding_->BindInput("positions", pos);
    past_mask_.assign(static_cast<size_t>(batch_ * past_len_), 1);
    const std::vector<int64_t> mask_shape{batch_, past_len_};
    Ort::Value mask = Ort::Value::CreateTensor<int64_t>(
        cpu_, past_mask_.empty() ? &empty_index_ : past_mask_.data(), past_mask_.size(),
        mask_shape.data(), mask_shape.size());
    binding_->BindInput("past_mask", mask);
    for (size_t j = 0; j < past_names_.size(); ++j)
      binding_->BindInput(past_names_[j].c_str(), past_[j]);
    binding_->ClearBoundOutputs();  // fresh ORT allocations at this step's (longer) shape
    binding_->BindOutput("logits", cpu_);
    for (const std::string& name : present_names_) binding_->BindOutput(name.c_str(), cpu_);
    run(*decoder_, *binding_, "decoder");
    std::vector<Ort::Value> outs = binding_->GetOutputValues();
    logits_ = std::move(outs[0]);
    for (size_t j = 0; j < past_names_.size(); ++j) past_[j] = std::move(outs[1 + j]);
    ++past_len_;
    const std::vector<int64_t> ls = logits_.GetTensorTypeAndShapeInfo().GetShape();
    if (ls.size() != 3 || ls[0] != batch_ || ls[2] != info_.encoder.vocab_size)
      throw Error("decoder returned logits of shape " + shape_str(ls) + ", expected [" +
                  std::to_string(batch_) + ", new_len, " +
                  std::to_string(info_.encoder.vocab_size) + "]");
    // [batch, new_len, vocab] with new_len 1: the rows are the last positions already.
    return logits_.GetTensorData<float>();
  }

  bool select(const std::vector<int64_t>& rows) override {
    for (Ort::Value& v : cross_) v = take_rows(v, rows);
    for (Ort::Value& v : past_) v = take_rows(v, rows);
    const int64_t width = mask_.shape.at(1);
    Array mask{mask_.dtype, {static_cast<int64_t>(rows.size()), width}, {}};
    const size_t row_bytes = static_cast<size_t>(width) * mask_.itemsize();
    mask.data.resize(rows.size() * row_bytes);
    for (size_t k = 0; k < rows.size(); ++k)
      std::memcpy(mask.data.data() + k * row_bytes,
                  mask_.data.data() + static_cast<size_t>(rows[k]) * row_bytes, row_bytes);
    mask_ = std::move(mask);
    batch_ = static_cast<int64_t>(rows.size());
    for (size_t i = 0; i < cross_names_.size(); ++i)
      binding_->BindInput(cross_names_[i].c_str(), cross_[i]);
    binding_->BindInput("src_mask", tensor(mask_));
    return true;
  }

 private:
  Ort::Env env_;
  Ort::MemoryInfo cpu_;
  std::unique_ptr<Ort::Session> encoder_, decoder_;
  std::vector<std::pair<std::string, Declared>> enc_inputs_, enc_outputs_, dec_inputs_,
      dec_outputs_;
  std::vector<std::string> cross_names_, past_names_, present_names_;  // decoder order
  std::unique_ptr<Ort::IoBinding> binding_;
  std::vector<Ort::Value> cross_, past_;
  Ort::Value logits_{nullptr};
  Array mask_;
  std::vector<int64_t> tokens_, positions_, past_mask_;
  float empty_slot_ = 0.0f;
  int64_t empty_index_ = 0;
  int64_t batch_ = 0, past_len_ = 0;
  GeneratorInfo info_;

  std::unique_ptr<Ort::Session> load(const std::string& path, const Ort::SessionOptions& so) {
    try {
      return std::make_unique<Ort::Session>(env_, path.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime cannot load " + path + ": " + first_line(e.what()));
    }
  }

  static std::vector<std::pair<std::string, Declared>> io(Ort::Session& s, bool inputs) {
    Ort::AllocatorWithDefaultOptions alloc;
    std::vector<std::pair<std::string, Declared>> out;
    const size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
    for (size_t i = 0; i < n; ++i) {
      if (inputs)
        out.emplace_back(s.GetInputNameAllocated(i, alloc).get(), declared(s.GetInputTypeInfo(i)));
      else
        out.emplace_back(s.GetOutputNameAllocated(i, alloc).get(),
                         declared(s.GetOutputTypeInfo(i)));
    }
    return out;
  }

  static const Declared* find(const std::vector<std::pair<std::string, Declared>>& list,
                              const std::string& name) {
    for (const auto& [n, d] : list)
      if (n == name) return &d;
    return nullptr;
  }

  Ort::Value tensor(const Array& arr) {
    if (arr.dtype != "int64" && arr.dtype != "float32")
      throw Error("cannot feed dtype " + arr.dtype);
    // ORT reads the caller's buffer in place; it never writes to an input.
    return Ort::Value::CreateTensor(cpu_, const_cast<uint8_t*>(arr.data.data()), arr.data.size(),
                                    arr.shape.data(), arr.shape.size(),
                                    arr.dtype == "int64" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                                         : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  }

  // Rows `rows` of a float32 [batch, ...] tensor, in a new tensor of ORT's allocator.
  static Ort::Value take_rows(const Ort::Value& v, const std::vector<int64_t>& rows) {
    std::vector<int64_t> shape = v.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t batch = shape.at(0);
    const size_t per_row = static_cast<size_t>(
        batch ? static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount()) / batch : 0);
    shape[0] = static_cast<int64_t>(rows.size());
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::Value out = Ort::Value::CreateTensor<float>(alloc, shape.data(), shape.size());
    const float* src = v.GetTensorData<float>();
    float* dst = out.GetTensorMutableData<float>();
    for (size_t k = 0; k < rows.size(); ++k)
      std::memcpy(dst + k * per_row, src + static_cast<size_t>(rows[k]) * per_row,
                  per_row * sizeof(float));
    return out;
  }

  static void run(Ort::Session& s, Ort::IoBinding& b, const char* what) {
    try {
      s.Run(Ort::RunOptions{nullptr}, b);
    } catch (const Ort::Exception& e) {
      throw Error(std::string("ONNX Runtime failed (") + what + "): " + first_line(e.what()));
    }
  }

  void read_config(const std::string& path) {
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::ModelMetadata meta = encoder_->GetModelMetadata();
    Ort::AllocatedStringPtr config = meta.LookupCustomMetadataMapAllocated("hmu_export.config",
                                                                           alloc);
    if (!config)
      throw Error(path + " has no hmu_export.config metadata: cannot tell its shape profile "
                  "and generation defaults (export it with hmu_export)");
    const std::string where = path + " metadata hmu_export.config";
    read_build_config(Json::parse(config.get(), where), where, &info_);
  }

  // Encoder inputs as the contract for validate_feeds; axes named by position (the graph's
  // own dim_params may be exporter names) so the profile check sees batch and src_len.
  void describe_encoder(const std::string& path) {
    for (const char* name : {"src_ids", "src_mask", "noise"}) {
      const Declared* d = find(enc_inputs_, name);
      if (!d) throw Error(path + " is not an hmu_export encoder graph: no input '" + name + "'");
      TensorSpec spec{name, d->dtype, {}};
      for (size_t k = 0; k < d->shape.size(); ++k) {
        Dim dim;
        if (d->shape[k] >= 0) dim.size = d->shape[k];
        else dim.name = k == 0 ? "batch" : k == 1 ? "src_len" : std::string(name) + ":" +
                                                                     std::to_string(k);
        spec.dims.push_back(dim);
      }
      info_.encoder.contract.inputs.push_back(spec);
    }
    if (enc_inputs_.size() != 3)
      throw Error(path + " has " + std::to_string(enc_inputs_.size()) +
                  " inputs; an hmu_export encoder graph has src_ids, src_mask, noise");
  }

  // Layers from the past_key.{i} inputs; heads and head_dim from their declared dims.
  void describe_decoder(const std::string& path) {
    for (const char* name : {"tgt_ids", "src_mask"})
      if (!find(dec_inputs_, name))
        throw Error(path + " is not an hmu_export decoder graph: no input '" + name + "'");
    require_row_state(path, [&](const char* n) { return find(dec_inputs_, n) != nullptr; });
    if (dec_outputs_.empty() || dec_outputs_[0].first != "logits")
      throw Error(path + " is not an hmu_export decoder graph: its first output is not 'logits'");
    int64_t layers = 0;
    while (find(dec_inputs_, key_name("past_key", layers))) ++layers;
    if (layers == 0) throw Error(path + " has no past_key.0 input: not a decoder-step graph");
    const Declared* first = find(dec_inputs_, "past_key.0");
    if (first->shape.size() != 4 || first->shape[1] < 1 || first->shape[3] < 1)
      throw Error(path + ": past_key.0 must be [batch, heads, past_len, head_dim] with fixed "
                  "heads and head_dim, got " + shape_str(first->shape));
    info_.cache = {layers, first->shape[1], first->shape[3]};
    for (int64_t i = 0; i < layers; ++i) {
      for (const char* kind : {"past_key", "past_value"}) {
        const std::string name = key_name(kind, i);
        const Declared* d = find(dec_inputs_, name);
        if (!d || d->dtype != "float32" || d->shape.size() != 4 ||
            d->shape[1] != info_.cache.heads || d->shape[3] != info_.cache.head_dim)
          throw Error(path + ": '" + name + "' is missing or not float32 [batch, " +
                      std::to_string(info_.cache.heads) + ", past_len, " +
                      std::to_string(info_.cache.head_dim) + "]");
        past_names_.push_back(name);
        const std::string present = std::string(kind == std::string("past_key")
                                                    ? "present_key." : "present_value.") +
                                    std::to_string(i);
        if (!find(dec_outputs_, present))
          throw Error(path + " has no output '" + present + "' for its input '" + name + "'");
        present_names_.push_back(present);
      }
      for (const char* kind : {"cross_key", "cross_value"}) {
        const std::string name = key_name(kind, i);
        const Declared* d = find(dec_inputs_, name);
        if (!d) throw Error(path + " has no input '" + name + "'");
        if (!find(enc_outputs_, name))
          throw Error("the encoder graph has no output '" + name + "' that the decoder needs");
        cross_names_.push_back(name);
      }
    }
    const size_t expected = 4 + cross_names_.size() + past_names_.size();
    if (dec_inputs_.size() != expected)
      throw Error(path + " has " + std::to_string(dec_inputs_.size()) + " inputs, expected " +
                  std::to_string(expected) +
                  " (tgt_ids, src_mask, positions, past_mask, cross K/V, past K/V)");
  }
};

}  // namespace

std::unique_ptr<StepRunner> make_ort_step_runner(const std::string& encoder_path,
                                                 const std::string& decoder_path, int threads) {
  return std::make_unique<OrtStepRunner>(encoder_path, decoder_path, threads);
}

}  // namespace hmu
