// The runner-independent half of hmu_generate: build config defaults, option checks and the
// greedy loop (per-row EOS; finished rows leave the batch, as in Python, where the runner can
// select rows; elsewhere they keep being fed EOS so the batch keeps its shape).
#include "hmu/generator.hpp"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "hmu/error.hpp"
#include "hmu/json.hpp"

namespace hmu {

namespace {

// The request schema's limits (hmu_export/shipped/request_options.py; tests/test_cpp_generate.py
// checks that these equal Python's): one rule in Python, Triton and here.
constexpr double kTemperatureMin = 1e-3;  // below: refused, never turned into greedy decoding
constexpr double kTemperatureMax = 1e3;
constexpr double kLengthPenaltyMax = 10.0;
constexpr double kNoiseScaleMax = 100.0;
constexpr double kNoiseAbsMax = 1e4;  // |noise| given as values (noise.npy)

// Shortest text that reads back as the same number (Python's repr of a float, digits-wise).
template <typename T>
std::string num(T v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

// A [generation] number the request schema bounds: Python's words on a value outside [lo, hi].
void check_range(const Json& gen, const char* key, double lo, double hi, const std::string& rule,
                 const std::string& where) {
  const Json* v = gen.find(key);
  if (!v) return;
  if (!v->is_number() || !std::isfinite(v->number))
    throw Error(where + "." + key + " must be a finite number");
  if (!(v->number >= lo && v->number <= hi))
    throw Error(where + "." + key + " must be in " + rule + ", got " + num(v->number));
}

std::vector<int64_t> int_list(const Json& v, const std::string& where) {
  if (!v.is_array()) throw Error(where + " must be a list of token ids");
  std::vector<int64_t> out;
  for (size_t i = 0; i < v.array.size(); ++i)
    out.push_back(v.array[i].as_int(where + "[" + std::to_string(i) + "]"));
  return out;
}

void read_token_rules(const Json& gen, const std::string& where, TokenRules* rules) {
  if (const Json* v = gen.find("repetition_penalty")) {
    if (!v->is_number() || !(v->number > 0))
      throw Error(where + ".repetition_penalty must be a number > 0");
    rules->repetition_penalty = v->number;
  }
  if (const Json* v = gen.find("no_repeat_ngram_size"))
    rules->no_repeat_ngram_size = v->as_int(where + ".no_repeat_ngram_size");
  if (const Json* v = gen.find("min_new_tokens"))
    rules->min_new_tokens = v->as_int(where + ".min_new_tokens");
  if (const Json* v = gen.find("forced_bos_id"))
    rules->forced_bos_id = v->as_int(where + ".forced_bos_id");
  if (const Json* v = gen.find("forced_eos_id"))
    rules->forced_eos_id = v->as_int(where + ".forced_eos_id");
  if (const Json* v = gen.find("suppress_tokens"))
    rules->suppress_tokens = int_list(*v, where + ".suppress_tokens");
  if (const Json* v = gen.find("begin_suppress_tokens"))
    rules->begin_suppress_tokens = int_list(*v, where + ".begin_suppress_tokens");
  if (const Json* v = gen.find("bad_words_ids")) {
    if (!v->is_array()) throw Error(where + ".bad_words_ids must be a list of id lists");
    for (size_t i = 0; i < v->array.size(); ++i) {
      auto seq = int_list(v->array[i], where + ".bad_words_ids[" + std::to_string(i) + "]");
      if (seq.empty()) throw Error(where + ".bad_words_ids holds an empty sequence");
      rules->bad_words_ids.push_back(std::move(seq));
    }
  }
}

}  // namespace

bool TokenRules::active() const {
  return repetition_penalty != 1.0 || no_repeat_ngram_size > 0 || !bad_words_ids.empty() ||
         min_new_tokens > 0 || forced_bos_id >= 0 || forced_eos_id >= 0 ||
         !suppress_tokens.empty() || !begin_suppress_tokens.empty();
}

// The order and semantics of hmu_export/shipped/token_rules.py (Transformers' processors).
void TokenRules::apply(std::vector<double>& s, const std::vector<int64_t>& prefix,
                       int64_t max_new, int64_t eos_id) const {
  const double ninf = -std::numeric_limits<double>::infinity();
  const int64_t cur = static_cast<int64_t>(prefix.size());
  if (repetition_penalty != 1.0) {
    std::vector<int64_t> seen(prefix);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int64_t t : seen)
      s[t] = s[t] < 0 ? s[t] * repetition_penalty : s[t] / repetition_penalty;
  }
  const int64_t n = no_repeat_ngram_size;
  if (n > 0 && cur >= n) {
    for (int64_t i = 0; i + n <= cur; ++i) {
      bool match = true;  // window prefix[i, i+n-1) equals the last n-1 tokens
      for (int64_t j = 0; j < n - 1 && match; ++j) match = prefix[i + j] == prefix[cur - n + 1 + j];
      if (match) s[prefix[i + n - 1]] = ninf;
    }
  }
  for (const auto& seq : bad_words_ids) {
    if (seq.size() == 1 && seq[0] == eos_id) continue;  // Transformers never bans EOS here
    const int64_t k = static_cast<int64_t>(seq.size()) - 1;
    bool hit = k == 0;
    if (!hit && k <= cur) {
      hit = true;
      for (int64_t j = 0; j < k && hit; ++j) hit = prefix[cur - k + j] == seq[j];
    }
    if (hit) s[seq.back()] = ninf;
  }
  if (cur - 1 < min_new_tokens && eos_id >= 0) s[eos_id] = ninf;
  if (forced_bos_id >= 0 && cur == 1) {
    std::fill(s.begin(), s.end(), ninf);
    s[forced_bos_id] = 0.0;
  }
  if (forced_eos_id >= 0 && cur == max_new) {
    std::fill(s.begin(), s.end(), ninf);
    s[forced_eos_id] = 0.0;
  }
  for (int64_t t : suppress_tokens) s[t] = ninf;
  const int64_t begin = forced_bos_id >= 0 ? 2 : 1;
  if (cur == begin)
    for (int64_t t : begin_suppress_tokens) s[t] = ninf;
}

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
    if (const Json* v = gen->find("strategy"); v && v->is_string()) info->strategy = v->string;
    if (const Json* v = gen->find("num_beams"))
      info->num_beams = v->as_int(where + ".generation.num_beams");
    read_token_rules(*gen, where + ".generation", &info->rules);
    // The build's decoding defaults meet the request schema here too (this program decodes
    // greedily, but a build whose defaults Python and Triton refuse is refused here as well).
    const std::string w = where + ".generation";
    check_range(*gen, "temperature", kTemperatureMin, kTemperatureMax,
                "[0.001, 1000] (for the argmax, use strategy greedy)", w);
    check_range(*gen, "length_penalty", -kLengthPenaltyMax, kLengthPenaltyMax, "[-10, 10]", w);
    check_range(*gen, "noise_scale", 0.0, kNoiseScaleMax, "[0, 100] (0 = the HMU's mean path)",
                w);
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
  // Python's words (hmu_export.generate.generator.Generator.options).
  for (const auto& [key, v] : {std::pair<const char*, int64_t>{"bos_id", o.bos_id},
                               std::pair<const char*, int64_t>{"eos_id", o.eos_id}})
    if (vocab > 0 && (v < 0 || v >= vocab))
      throw Error(std::string(key) + " " + std::to_string(v) + " is outside [0, " +
                  std::to_string(vocab) + ")");
  if (info.strategy != "greedy" && !o.greedy_anyway)
    throw Error("the build decodes with strategy '" + info.strategy + "' by default ([generation] "
                "strategy; num_beams " + std::to_string(info.num_beams) + "), hmu_generate "
                "decodes greedily only: pass --greedy to decode greedily anyway, or use the "
                "Python or Triton generate");
  const TokenRules& r = info.rules;
  std::vector<int64_t> ids = r.suppress_tokens;
  ids.insert(ids.end(), r.begin_suppress_tokens.begin(), r.begin_suppress_tokens.end());
  for (const auto& seq : r.bad_words_ids) ids.insert(ids.end(), seq.begin(), seq.end());
  if (r.forced_bos_id >= 0) ids.push_back(r.forced_bos_id);
  if (r.forced_eos_id >= 0) ids.push_back(r.forced_eos_id);
  for (int64_t t : ids)
    if (vocab > 0 && (t < 0 || t >= vocab))
      throw Error("token id " + std::to_string(t) + " in the build's token rules is outside [0, " +
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
  if (const auto it = encoder_feeds.find("noise"); it != encoder_feeds.end() &&
                                                    it->second.dtype == "float32") {
    const float* v = reinterpret_cast<const float*>(it->second.data.data());
    const int64_t n = it->second.numel();
    float worst = 0.0f;
    for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(v[i]));
    if (static_cast<double>(worst) > kNoiseAbsMax)
      throw Error("input 'noise' has values beyond +-10000 (largest |noise| " + num(worst) +
                  "): the HMU noise is N(0, noise_scale^2) with noise_scale at most 100");
  }
  const int64_t batch = encoder_feeds.begin()->second.shape.at(0);
  const int64_t vocab = info.encoder.vocab_size;

  GenerateResult result;
  result.sequences.assign(static_cast<size_t>(batch), {});
  std::vector<int64_t> tokens(static_cast<size_t>(batch), opts.bos_id);
  std::vector<char> finished(static_cast<size_t>(batch), 0);
  std::vector<int64_t> live(static_cast<size_t>(batch));  // original row of each batch row
  std::iota(live.begin(), live.end(), int64_t{0});
  std::vector<int64_t> keep;
  const TokenRules& rules = info.rules;
  std::vector<double> scores;
  std::vector<int64_t> prefix;

  const auto t0 = std::chrono::steady_clock::now();
  runner.start(encoder_feeds);
  for (int64_t t = 0; t < opts.max_new_tokens; ++t) {
    const float* logits = runner.step(tokens);
    if (t == 0)
      result.first_token_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++result.steps;
    bool all_done = true;
    keep.clear();
    for (size_t i = 0; i < live.size(); ++i) {
      const int64_t r = live[i];
      if (finished[r]) {
        tokens[i] = opts.eos_id;  // a runner that cannot select: keeps the batch shape
        continue;
      }
      const float* row = logits + static_cast<int64_t>(i) * vocab;
      for (int64_t v = 0; v < vocab; ++v)
        if (!std::isfinite(row[v]))
          throw Error("row " + std::to_string(r) + ": the model's logits hold NaN or infinity "
                      "at step " + std::to_string(t + 1) + " (the noise, or the graphs' "
                      "weights, drive the model's float32 arithmetic out of range)");
      int64_t best = 0;  // first maximum, like numpy's argmax
      if (rules.active()) {
        scores.assign(row, row + vocab);
        prefix.assign(1, opts.bos_id);
        prefix.insert(prefix.end(), result.sequences[r].begin(), result.sequences[r].end());
        rules.apply(scores, prefix, opts.max_new_tokens, opts.eos_id);
        for (int64_t v = 1; v < vocab; ++v)
          if (scores[v] > scores[best]) best = v;
      } else {
        for (int64_t v = 1; v < vocab; ++v)
          if (row[v] > row[best]) best = v;
      }
      result.sequences[r].push_back(best);
      tokens[i] = best;
      if (best == opts.eos_id) finished[r] = 1;
      else keep.push_back(static_cast<int64_t>(i));
      all_done = all_done && finished[r];
    }
    if (all_done) break;
    if (t + 1 < opts.max_new_tokens && keep.size() < live.size() && runner.select(keep)) {
      for (size_t k = 0; k < keep.size(); ++k) {
        live[k] = live[static_cast<size_t>(keep[k])];
        tokens[k] = tokens[static_cast<size_t>(keep[k])];
      }
      live.resize(keep.size());
      tokens.resize(keep.size());
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace hmu
