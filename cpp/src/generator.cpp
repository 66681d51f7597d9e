// The runner-independent half of hmu_generate: build config defaults, option checks and the
// greedy loop (per-row EOS; finished rows keep being fed EOS so the batch keeps its shape).
#include "hmu/generator.hpp"

#include <algorithm>
#include <chrono>

#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {

void read_build_config(const Json& config, const std::string& where, GeneratorInfo* info) {
  info->encoder.profiles = profiles_from_config(config, where);
  info->encoder.vocab_size = vocab_from_config(config, where);
  const Json* profile = config.find("profile");
  const Json* tgt = profile ? profile->find("tgt_len") : nullptr;
  if (!tgt || !tgt->is_array() || tgt->array.size() != 3)
    throw Error(where + ".profile has no tgt_len [min, opt, max]: cannot bound generation");
  info->tgt_len_max = tgt->array[2].as_int(where + ".profile.tgt_len");
  if (const Json* gen = config.find("generation")) {
    if (const Json* v = gen->find("bos_id")) info->bos_id = v->as_int(where + ".generation.bos_id");
    if (const Json* v = gen->find("eos_id")) info->eos_id = v->as_int(where + ".generation.eos_id");
    if (const Json* v = gen->find("max_new_tokens"))
      info->max_new_tokens = v->as_int(where + ".generation.max_new_tokens");
  }
}

GenerateOptions resolve_options(const GeneratorInfo& info, const GenerateOptions& requested) {
  GenerateOptions o = requested;
  if (o.bos_id == -1) o.bos_id = info.bos_id;
  if (o.eos_id == -1) o.eos_id = info.eos_id;
  if (o.max_new_tokens == -1)
    o.max_new_tokens = info.max_new_tokens > 0 ? info.max_new_tokens
                                               : std::min<int64_t>(32, info.tgt_len_max);
  const int64_t vocab = info.encoder.vocab_size;
  // Python's words (hmu_export.generate.Generator.options).
  for (const auto& [key, v] : {std::pair<const char*, int64_t>{"bos_id", o.bos_id},
                               std::pair<const char*, int64_t>{"eos_id", o.eos_id}})
    if (vocab > 0 && (v < 0 || v >= vocab))
      throw Error(std::string(key) + " " + std::to_string(v) + " is outside [0, " +
                  std::to_string(vocab) + ")");
  if (o.max_new_tokens < 1 || o.max_new_tokens > info.tgt_len_max)
    throw Error("max_new_tokens must be in [1, " + std::to_string(info.tgt_len_max) +
                "] (the profile's tgt_len max), got " + std::to_string(o.max_new_tokens));
  return o;
}

GenerateResult generate_greedy(StepRunner& runner, const Feeds& encoder_feeds,
                               const GenerateOptions& requested) {
  const GeneratorInfo& info = runner.info();
  const GenerateOptions opts = resolve_options(info, requested);
  validate_feeds(info.encoder, encoder_feeds);
  const int64_t batch = encoder_feeds.begin()->second.shape.at(0);
  const int64_t vocab = info.encoder.vocab_size;

  GenerateResult result;
  result.sequences.assign(static_cast<size_t>(batch), {});
  std::vector<int64_t> tokens(static_cast<size_t>(batch), opts.bos_id);
  std::vector<char> finished(static_cast<size_t>(batch), 0);

  const auto t0 = std::chrono::steady_clock::now();
  runner.start(encoder_feeds);
  for (int64_t t = 0; t < opts.max_new_tokens; ++t) {
    const float* logits = runner.step(tokens);
    if (t == 0)
      result.first_token_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++result.steps;
    bool all_done = true;
    for (int64_t r = 0; r < batch; ++r) {
      if (finished[r]) {
        tokens[r] = opts.eos_id;  // keeps the batch shape; never reported
        continue;
      }
      const float* row = logits + r * vocab;
      int64_t best = 0;  // first maximum, like numpy's argmax
      for (int64_t v = 1; v < vocab; ++v)
        if (row[v] > row[best]) best = v;
      result.sequences[r].push_back(best);
      tokens[r] = best;
      if (best == opts.eos_id) finished[r] = 1;
      all_done = all_done && finished[r];
    }
    if (all_done) break;
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace hmu
