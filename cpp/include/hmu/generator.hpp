// Greedy generation over the split graphs of an hmu_export build: encoder.onnx (run once per
// request: src_ids, src_mask, noise -> cross_key.{i}, cross_value.{i}) and decoder.onnx (one
// step: tgt_ids, src_mask, positions, past_mask, cross K/V, past_key.{i}, past_value.{i} ->
// logits, present_*). positions [batch, new_len] and past_mask [batch, past_len] are the
// per-row decoder state (rows at different steps may share a batch); this loop keeps every
// row at the same step, so it feeds positions = past_len and an all-ones past_mask.
//
// A StepRunner owns the runtime and keeps the KV cache in runtime-owned buffers (ONNX Runtime:
// IoBinding with ORT-allocated outputs fed back as the next step's inputs; TensorRT: device
// buffers bound with setTensorAddress, ping-pong past/present). The greedy loop itself
// (generate_greedy) is shared by every runner.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hmu/contract.hpp"
#include "hmu/error.hpp"

namespace hmu {

class Json;

// Cache shapes, read from the decoder graph's declared past_key.{i} inputs (never computed
// from d_model / heads).
struct CacheLayout {
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
};

// Token rules of the build's [generation] config (hmu_export/shipped/token_rules.py; for a Hugging
// Face source, its generation_config.json): Transformers' semantics and order, applied to the
// raw logits of the greedy loop (in double, as Python does on float64).
struct TokenRules {
  double repetition_penalty = 1.0;
  int64_t no_repeat_ngram_size = 0;
  std::vector<std::vector<int64_t>> bad_words_ids;
  int64_t min_new_tokens = 0;
  int64_t forced_bos_id = -1;  // -1 = off
  int64_t forced_eos_id = -1;
  std::vector<int64_t> suppress_tokens;
  std::vector<int64_t> begin_suppress_tokens;

  bool active() const;
  // `scores` [vocab] for the next token of a row whose decoder input so far is `prefix`
  // (start token first); `max_new` is the request's max_new_tokens.
  void apply(std::vector<double>& scores, const std::vector<int64_t>& prefix, int64_t max_new,
             int64_t eos_id) const;
};

// What a runner knows about its graphs.
struct GeneratorInfo {
  ModelInfo encoder;          // the encoder's inputs, the profile (batch, src_len) and vocab
  int64_t tgt_len_max = -1;   // profile tgt_len max: BOS + the generated tokens fill it
  int64_t bos_id = 1;         // [generation] defaults from the graph's build config
  int64_t eos_id = 2;
  int64_t max_new_tokens = 0;  // 0 = min(32, tgt_len_max)
  std::string strategy = "greedy";  // the build's default decoding ([generation] strategy)
  int64_t num_beams = 1;
  TokenRules rules;
  CacheLayout cache;
};

// Throws the one-line hmu::Error that refuses a decoder graph / plan made before per-row
// decoder state (no positions / past_mask input): it must be rebuilt. `has` tells whether the
// graph has an input of that name.
template <typename Has>
void require_row_state(const std::string& path, Has has) {
  std::string missing;
  for (const char* name : {"positions", "past_mask"})
    if (!has(name)) missing += (missing.empty() ? "" : " / ") + std::string(name);
  if (!missing.empty())
    throw Error(path + " has no " + missing + " input (built before per-row decoder state): "
                "rebuild it with this version");
}

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  virtual const GeneratorInfo& info() const = 0;
  virtual std::string name() const = 0;
  // Runs the encoder on validated feeds; the cache restarts empty (past_len 0).
  virtual void start(const Feeds& encoder_feeds) = 0;
  // One decoder step, one token per row: returns the logits of the new position,
  // [batch, vocab] row-major float32, owned by the runner and valid until the next call.
  virtual const float* step(const std::vector<int64_t>& tokens) = 0;
  // Keeps batch rows `rows` (ascending indices into the current batch) for the next steps, as
  // Python's Stepper.select: finished rows leave the batch. False when the runner cannot; the
  // loop then keeps every row, feeding finished ones EOS. Row-independent graphs give the same
  // tokens either way; int8 graphs quantize activations per tensor, over the whole batch, so
  // there only the same batch schedule as Python's gives Python's tokens.
  virtual bool select(const std::vector<int64_t>& rows) {
    (void)rows;
    return false;
  }
};

struct GenerateOptions {
  int64_t max_new_tokens = -1;  // -1 = from the graph's [generation] config
  int64_t bos_id = -1;
  int64_t eos_id = -1;
  // Decode greedily even when the build's default strategy is beam search or sampling
  // (without it such a build is refused: its tokens would differ from Python's).
  bool greedy_anyway = false;
};

struct GenerateResult {
  // Generated tokens per row: no BOS; EOS kept when produced, nothing after it.
  std::vector<std::vector<int64_t>> sequences;
  int64_t steps = 0;          // decoder calls
  double seconds = 0.0;       // encoder + every step
  double first_token_seconds = 0.0;
};

// Fills the profile, vocabulary and [generation] defaults of `info` from a build config JSON
// (the "hmu_export.config" metadata, or manifest.json's "config").
void read_build_config(const Json& config, const std::string& where, GeneratorInfo* info);

// Defaults filled in from info, then checked (one-line hmu::Error on a bad value).
GenerateOptions resolve_options(const GeneratorInfo& info, const GenerateOptions& requested);

// Validates the encoder feeds (contract, profile, mask, vocabulary) and runs greedy decoding.
GenerateResult generate_greedy(StepRunner& runner, const Feeds& encoder_feeds,
                               const GenerateOptions& options);

std::unique_ptr<StepRunner> make_ort_step_runner(const std::string& encoder_path,
                                                 const std::string& decoder_path, int threads);
// TensorRT plans (encoder.fp16.plan / decoder.fp16.plan) with manifest.json next to them.
// Throws hmu::Error when the program was built without TensorRT.
std::unique_ptr<StepRunner> make_trt_step_runner(const std::string& encoder_path,
                                                 const std::string& decoder_path);
bool have_trt_step_runner();

}  // namespace hmu
